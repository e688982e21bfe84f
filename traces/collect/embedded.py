"""The embedded real trace: the committed small MoE model run over the committed prompts.

The trace itself (~15 MB with hidden states) is not committed; it is regenerated on first use on
the CPU (well under a minute) into a cache directory and keyed by a hash of the weights, the
prompts and the collection settings, so a changed model or setting never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from moesim.traces.cache import cache_root as user_cache_root
from moesim.traces.cache import entry_lock
from moesim.traces.collect.collector import CollectSettings, collect, routers_path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "moesim_tiny_moe"
PROMPTS_FILE = ASSETS / "prompts_stdlib.jsonl"
MODEL_NAME = "moesim_tiny_moe"
COLLECT_VERSION = 1  # bump when the collector's output for the same inputs changes


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


def embedded_key(limit: int | None = None) -> str:
    """Hash of weights + config + prompts + settings (+ collector version)."""
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
    with entry_lock(out.with_name(out.name + ".ensure")):
        if not (out.is_file() and routers_path(out).is_file()):
            collect(embedded_settings(out, limit))
    return out
