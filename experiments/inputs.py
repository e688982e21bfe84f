"""Resolve the inputs of a run: trace file (importing a raw source once, cached by content),
model card and hardware profile.

Relative paths (``trace.path``, ``predictions.path``, a model card given as a YAML path) are
taken against the directory the command was started in (:func:`moesim.experiments.paths.
resolve_path`), so ``hydra.job.chdir=true``, sweep workers and submitit jobs read the same files.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moesim import hw_profiles
from moesim.experiments.paths import TRACES_ENV, resolve_path, traces_dir
from moesim.traces import TraceError
from moesim.traces.cache import cache_root, entry_lock, sweep_temporaries
from moesim.traces.model_card import ModelCard, card_from_mapping, load_card
from moesim.traces.predictions import DEFAULT_MIN_COVERAGE, PredictionTable, read_predictions_meta
from moesim.traces.store import read_request_ids
from moesim.traces.trace import Trace, TraceMeta

# Part of an imported trace's cache key: bump when importers write different files for the
# same source (v2: prediction tables record the identity of the trace they belong to).
IMPORT_VERSION = "v2"


def cache_dir() -> Path:
    """The user cache (``$MOESIM_CACHE`` or ``~/.cache/moesim``; see traces.cache)."""
    return cache_root()


def _digest(src: Path) -> str:
    """Content hash of a file or of every file below a folder (names and bytes). A run asks
    for its source's trace up to three times (run hash, trace, prediction table); the hash is
    remembered per (path, every file's name, size and modification time), so a raw folder is
    read once per process and re-read when any file in it changes."""
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    stamp = tuple((str(f.relative_to(src) if f != src else f.name), st.st_size, st.st_mtime_ns)
                  for f in files for st in (f.stat(),))
    return _digest_of(str(src), stamp)


@functools.lru_cache(maxsize=16)
def _digest_of(src: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    root = Path(src)
    h = hashlib.blake2b(digest_size=16)
    for name, _size, _mtime in stamp:
        h.update(name.encode())
        with (root / name if root.is_dir() else root).open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def trace_file(path: str, fmt: str, *, features: bool = False) -> Path:
    """A parquet trace for ``path``: itself if it already is one, else a cached import.

    ``trace=embedded`` is the routing shipped with the package (no torch); with ``features``
    (a run that uses prediction tables) it is the full trace with hidden states that those
    tables are made from, regenerated once into the cache (needs the collect extra)."""
    if fmt == "embedded":
        from moesim.traces.collect.embedded import embedded_routing, ensure_embedded_trace

        return ensure_embedded_trace() if features else embedded_routing()
    src = resolve_path(path)
    if not src.exists():
        hint = ""
        if fmt not in (None, "parquet"):  # a raw source: the named real traces live here
            hint = f" (named traces are read from ${TRACES_ENV}, now {traces_dir()})"
        raise TraceError(f"trace.path: {src} does not exist{hint}")
    if src.is_file() and src.suffix == ".parquet":
        return src
    if fmt in (None, "parquet"):
        raise TraceError(f"trace.path: {src} is not a .parquet trace; set trace.format")
    out = cache_dir() / "traces" / f"{fmt}-{IMPORT_VERSION}-{_digest(src)}.parquet"
    if not out.exists():
        with entry_lock(out):  # concurrent runs import once; the others wait, then read it
            if not out.exists():
                sweep_temporaries(out)  # of a killed import of this very entry
                print(f"importing {src} ({fmt}) into {out} (once)")
                from moesim.traces import import_trace  # the importers, only when importing

                import_trace(fmt, src, out)
    return out


def run_trace_file(cfg: DictConfig) -> Path:
    """The trace file of a run (:func:`trace_file`; a run with ``predictions.path`` set replays
    the embedded trace its tables were made from)."""
    uses_tables = bool((cfg.get("predictions") or {}).get("path"))
    return trace_file(cfg.trace.path, cfg.trace.get("format"), features=uses_tables)


def _predictor_spec(cfg: DictConfig) -> str | None:
    """The predictor named by ``predictions.path=predictor:<name>``, if any."""
    from moesim.predictors.tables import parse_spec  # numpy + omegaconf only (no torch)

    return parse_spec((cfg.get("predictions") or {}).get("path"))


def prediction_file(cfg: DictConfig, trace_path: Path) -> Path | None:
    """``predictions.path`` if set (a file, or ``predictor:<name>``: that predictor's table for
    this trace, built and cached on first use), else the table an importer wrote beside the
    trace."""
    given = (cfg.get("predictions") or {}).get("path")
    if name := _predictor_spec(cfg):
        from moesim.predictors.tables import table_for

        return table_for(trace_path, name, progress=bool(cfg.get("progress", True)))
    if given:
        path = resolve_path(given)
        if not path.is_file():
            raise TraceError(f"predictions.path: {path} does not exist")
        return path
    side = trace_path.with_suffix(".predictions.parquet")
    return side if side.is_file() else None


def load_run_predictions(cfg: DictConfig, trace: Trace) -> PredictionTable | None:
    """The run's prediction table, checked against the trace it is replayed on (identity,
    layers, ids, width, dtypes; its coverage of the replayed requests is checked when the
    simulation builds its view, against ``predictions.min_coverage``)."""
    from moesim.traces import load_predictions

    return _run_table(cfg, trace.meta, load_predictions)


def open_run_predictions(cfg: DictConfig, meta: TraceMeta) -> Any:
    """A streamed run's prediction table: opened, checked as :func:`load_run_predictions`
    checks it, and read chunk by chunk (``sim.predictions.PredictionFile``)."""
    from moesim.sim.predictions import PredictionFile

    return _run_table(cfg, meta, PredictionFile)


def _run_table(cfg: DictConfig, meta: TraceMeta, reader: Callable[..., Any]) -> Any:
    """``reader`` (the whole table, or a streamed run's file) on the run's prediction file,
    with its trace's identity, digest and the run's coverage threshold; None without one."""
    trace_path = run_trace_file(cfg)
    path = prediction_file(cfg, trace_path)
    if path is None:
        return None
    from moesim.predictors.data import file_digest

    node = cfg.get("predictions") or {}
    return reader(path, meta.moe_layers, trace_meta=meta, trace_path=trace_path,
                  trace_digest=file_digest(trace_path),
                  min_coverage=float(node.get("min_coverage", DEFAULT_MIN_COVERAGE)))


def _table_test_requests(cfg: DictConfig) -> set[int] | None:
    """The held-out requests a ``moesim-train`` table names in its notes (None: not one)."""
    given = (cfg.get("predictions") or {}).get("path")
    if not given or not resolve_path(given).is_file():
        return None
    notes = read_predictions_meta(resolve_path(given)).get("notes") or {}
    ids = str(notes.get("test_requests") or "") if isinstance(notes, dict) else ""
    return {int(x) for x in ids.split(",") if x.strip()} or None


def replays_held_out(cfg: DictConfig) -> bool:
    """Whether ``requests=auto`` replays a predictor's held-out requests only (a
    ``predictor:<name>`` table, or a table whose notes name its test requests), as
    :func:`load_run_trace` does: a subset a streamed run cannot select."""
    return _predictor_spec(cfg) is not None or bool(_table_test_requests(cfg))


def load_run_trace(cfg: DictConfig) -> Trace:
    """The trace of a run. ``requests=held_out`` (and ``auto`` with
    ``predictions.path=predictor:<name>``) replays only the predictors' held-out test requests,
    whatever the policy, so a learned prediction is never replayed on a request it was trained
    on and every run of a sweep sees the same requests; ``auto`` with a ``moesim-train`` table
    file replays the test requests its notes name."""
    path = run_trace_file(cfg)
    which = str(cfg.get("requests") or "auto")
    if which not in ("auto", "held_out", "all"):
        raise TraceError(f"requests must be auto, held_out or all: {which!r}")
    keep: set[int] | None = None
    if which == "held_out" or (which == "auto" and _predictor_spec(cfg)):
        from moesim.predictors.tables import held_out_requests

        keep = set(held_out_requests(read_request_ids(path)))
    elif which == "auto":
        keep = _table_test_requests(cfg)
    # Only the requests the run replays are decoded (the first max_requests, or the kept ones).
    from moesim.traces import load_trace

    trace = load_trace(path, max_requests=cfg.get("max_requests"), requests=keep)
    if cfg.get("max_requests") is not None or cfg.get("max_tokens") is not None:
        trace = trace.subset(cfg.get("max_requests"), cfg.get("max_tokens"))
    return trace


def model_card(cfg: DictConfig, trace: Trace) -> ModelCard:
    node: Any = cfg.get("model")
    if node is None:
        card = load_card(trace.meta.model)
    elif isinstance(node, str):
        card = load_card(resolve_path(node) if node.endswith((".yaml", ".yml")) else node)
    else:
        card = card_from_mapping(OmegaConf.to_container(node, resolve=True), where="model")
    meta = trace.meta
    if meta.top_k < card.top_k and meta.notes.get("top_k_reduced_from") == str(card.top_k):
        # the engine ran fewer experts than the model's native top-k (llama.cpp
        # --n-expert-used); the run simulates the k that was recorded
        card = replace(card, top_k=meta.top_k)
    if (card.num_experts, card.top_k) != (meta.num_experts, meta.top_k):
        raise TraceError(
            f"model card {card.name!r} has {card.num_experts} experts / top-{card.top_k} but the "
            f"trace has {meta.num_experts} / top-{meta.top_k}"
        )
    return card


def with_card_bytes(trace: Trace, card: ModelCard) -> Trace:
    """Expert bytes always come from the card's shapes."""
    return Trace(replace(trace.meta, expert_bytes=card.expert_bytes), trace.requests)


def hw_profile(cfg: DictConfig) -> hw_profiles.HwProfile:
    from moesim.experiments.configs import BROKEN

    node = OmegaConf.to_container(cfg.hw, resolve=True)
    if isinstance(node, dict) and BROKEN in node:  # its file is not YAML (configs.py)
        raise hw_profiles.ProfileError(str(node[BROKEN]))
    return hw_profiles.profile_from_mapping(node, name=str(node.get("name", "hw")))


# A packed sweep's worker (experiments/packing.py) hashes each input once per sweep, not two or
# three times per run (a raw trace folder: a stat of each of its ~1000 files, ~20 ms): inside
# inputs_hashed_once(hashes), sim_app.input_digest keeps its results in the sweep's dict. A file
# changed while that sweep runs is noticed by the next sweep, as a rerun notices it. (Here, not
# in sim_app: run as ``python -m``, sim_app is ``__main__``, whose functions joblib's pickler
# sends by value with the globals they use, and a ContextVar cannot be pickled.)
_SWEEP_INPUT_HASHES: ContextVar[dict[tuple[str, ...], str] | None] = ContextVar(
    "moesim_sweep_input_hashes", default=None)


@contextmanager
def inputs_hashed_once(hashes: dict[tuple[str, ...], str]) -> Iterator[None]:
    """Within: ``sim_app.input_digest`` of a run whose inputs were hashed before in ``hashes``
    returns that hash (the inputs are named by trace path and format, prediction table and
    requests)."""
    token = _SWEEP_INPUT_HASHES.set(hashes)
    try:
        yield
    finally:
        _SWEEP_INPUT_HASHES.reset(token)


def sweep_input_hashes() -> dict[tuple[str, ...], str] | None:
    """The current packed sweep's input hashes (None outside :func:`inputs_hashed_once`)."""
    return _SWEEP_INPUT_HASHES.get()
