"""The embedded real trace: the committed small MoE model run over the committed prompts.

Two files, one routing:

- the **shipped routing** (``assets/moesim_tiny_moe-<key>.routing.parquet``, ~0.5 MB, package
  data): the full trace's routing, scores, tokens and labels without the hidden states, written
  by :func:`write_shipped` from the full trace. ``trace=embedded`` replays it, so the first
  ``moesim-sim`` takes seconds and needs no torch. ``<key>`` is :func:`embedded_key` of the
  weights, prompts and settings it came from; ``tests/collect/test_embedded.py`` checks the name
  against the current assets and its content against a fresh collection, and
  ``python -m moesim.traces.collect.embedded --check`` regenerates it in full and compares.
- the **full trace** (~17 MB with hidden states ``feat.pre_attn``/``feat.router_in`` and the
  routers file): what the predictors train on. It is regenerated on first use on the CPU (about
  a minute; needs torch and transformers, the ``collect`` extra) into the cache and keyed by the
  same hash, so a changed model or setting never reuses a stale file. A run that uses a
  prediction table replays this one (its tables name this file as their trace).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from moesim.traces.cache import cache_root as user_cache_root
from moesim.traces.cache import entry_lock
from moesim.traces.collect.collector import CollectSettings, collect, routers_path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "moesim_tiny_moe"
PROMPTS_FILE = ASSETS / "prompts_stdlib.jsonl"
MODEL_NAME = "moesim_tiny_moe"
COLLECT_VERSION = 1  # bump when the collector's output for the same inputs changes
SHIPPED_SUFFIX = ".routing.parquet"
# Notes of the full trace that name this machine or its library versions: the shipped file
# keeps the facts, not where they were produced.
_LOCAL_NOTES = ("model_path", "prompts", "routers_file", "transformers")


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else the user cache's ``traces`` folder (:func:`traces.cache.cache_root`),
    where ``moesim-sim``, ``moesim-train`` and the benchmarks all find the same one copy."""
    return Path(cache_dir) if cache_dir is not None else user_cache_root() / "traces"


def embedded_settings(out: Path, limit: int | None = None) -> CollectSettings:
    """Collection settings of the embedded trace: 64 prompts x (prompt + 32 greedy bytes)."""
    return CollectSettings(
        model_path=str(MODEL_DIR),
        prompts=str(PROMPTS_FILE),
        out=str(out),
        model_name=MODEL_NAME,
        tokenizer="bytes",
        dtype="float32",
        device="cpu",
        limit=limit,
        max_prompt_tokens=128,
        max_new_tokens=32,
        stop_at_eos=False,
        hidden_states=True,
        router_probs=False,
        progress=False,
        threads=1,
    )


@functools.lru_cache(maxsize=4)
def embedded_key(limit: int | None = None) -> str:
    """Hash of weights + config + prompts + settings (+ collector version); computed once per
    process (the assets are package data that do not change under a running program)."""
    h = hashlib.sha256()
    for f in (MODEL_DIR / "model.safetensors", MODEL_DIR / "config.json", PROMPTS_FILE):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    s = asdict(embedded_settings(Path("x.parquet"), limit))
    for k in ("out", "model_path", "prompts", "progress", "threads"):
        s.pop(k)
    h.update(json.dumps({"settings": s, "v": COLLECT_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def ensure_embedded_trace(cache_dir: Path | None = None, *, limit: int | None = None) -> Path:
    """Path of the embedded trace (with ``feat.pre_attn``/``feat.router_in`` and routers file).

    Regenerated on first use (seconds to a minute on 2 CPU cores), then returned from the cache
    at once. ``limit`` (first N prompts) is for quick tests and is part of the cache key.
    """
    suffix = "" if limit is None else f"-first{int(limit)}"
    out = cache_root(cache_dir) / f"{MODEL_NAME}-{embedded_key(limit)}{suffix}.parquet"
    if out.is_file() and routers_path(out).is_file():
        return out
    # Its own lock (not the collector's output lock, which collect() takes): concurrent first
    # uses generate once; the others wait and then find the file.
    from moesim.extras import require

    require(("torch", "transformers", "safetensors"), "collect",
            "the embedded trace with hidden states (prediction tables, moesim-train)")
    with entry_lock(out.with_name(out.name + ".ensure")):
        if not (out.is_file() and routers_path(out).is_file()):
            print(f"generating the embedded trace with hidden states (once, about a minute on "
                  f"the CPU) into {out}", file=sys.stderr)
            collect(embedded_settings(out, limit))
    return out


def shipped_path(key: str | None = None) -> Path:
    """Where the shipped routing of the embedded trace for ``key`` (default: the current
    assets' :func:`embedded_key`) lives: package data beside the model."""
    return ASSETS / f"{MODEL_NAME}-{key or embedded_key()}{SHIPPED_SUFFIX}"


def write_shipped(full: Path, out: Path | None = None) -> Path:
    """The generator of the shipped routing: ``full`` (a collected embedded trace) without its
    hidden states, machine-specific notes made relative, written atomically to ``out``
    (default :func:`shipped_path`)."""
    from moesim.traces.store import load_trace, write_trace

    trace = load_trace(full)
    notes = {k: v for k, v in trace.meta.notes.items() if k not in _LOCAL_NOTES}
    notes["embedded_key"] = embedded_key()
    notes["derived"] = ("the embedded trace's routing without hidden states "
                        "(traces/collect/embedded.py write_shipped)")
    notes["prompts"] = f"traces/collect/assets/{PROMPTS_FILE.name} ({len(trace)} prompts)"
    meta = replace(trace.meta, source=f"traces.collect from traces/collect/assets/{MODEL_NAME}",
                   notes=notes)
    out = shipped_path() if out is None else Path(out)
    write_trace(out, meta, trace.requests)
    return out


def embedded_routing() -> Path:
    """The trace ``trace=embedded`` replays: the shipped routing when it matches the current
    assets (always, in a release); else (a retrained model in a checkout) the routing of the
    full trace, which needs the ``collect`` extra."""
    shipped = shipped_path()
    if shipped.is_file():
        return shipped
    return ensure_embedded_trace()


def same_routing(a: Path, b: Path, max_requests: int | None = None) -> list[str]:
    """Differences between two embedded traces' routing (empty: the same requests, experts,
    scores, phases, tokens and labels, and the same model facts); ``max_requests``: compare
    only the first N requests of each (a collection with ``limit=N``)."""
    from moesim.traces.store import load_trace

    ta, tb = load_trace(a, max_requests), load_trace(b, max_requests)
    diffs = []
    for field in ("model", "moe_layers", "num_experts", "top_k", "expert_bytes", "dense_layers"):
        if getattr(ta.meta, field) != getattr(tb.meta, field):
            diffs.append(f"meta.{field}: {getattr(ta.meta, field)} != {getattr(tb.meta, field)}")
    if len(ta) != len(tb):
        return [*diffs, f"requests: {len(ta)} != {len(tb)}"]
    import numpy as np

    for ra, rb in zip(ta.requests, tb.requests, strict=True):
        for field in ("request_id", "label", "tokens"):
            if getattr(ra, field) != getattr(rb, field):
                diffs.append(f"request {ra.request_id}: {field} differs")
        for field in ("experts", "phase", "scores"):
            if not np.array_equal(getattr(ra, field), getattr(rb, field)):
                diffs.append(f"request {ra.request_id}: {field} differs")
    return diffs


def main(argv: list[str] | None = None) -> int:
    """``python -m moesim.traces.collect.embedded [--check | --write]``: regenerate the full
    trace (torch) and compare the shipped routing with it, or (re)write the shipped file."""
    ap = argparse.ArgumentParser(prog="python -m moesim.traces.collect.embedded",
                                 description=main.__doc__)
    ap.add_argument("--write", action="store_true", help="write the shipped routing file")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the full trace goes")
    args = ap.parse_args(argv)
    full = ensure_embedded_trace(args.cache_dir)
    if args.write:
        for old in ASSETS.glob(f"{MODEL_NAME}-*{SHIPPED_SUFFIX}"):
            old.unlink()
        print(f"wrote {write_shipped(full)}")
        return 0
    shipped = shipped_path()
    if not shipped.is_file():
        print(f"error: {shipped} is missing (write it with --write)", file=sys.stderr)
        return 1
    if diffs := same_routing(shipped, full):
        print("error: the shipped routing differs from a fresh collection:\n  "
              + "\n  ".join(diffs[:20]), file=sys.stderr)
        return 1
    print(f"ok: {shipped.name} equals the routing of a fresh collection ({full})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
