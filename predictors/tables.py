"""Prediction tables on demand, so that a simulation sweep can name a predictor instead of a file:
``moesim-sim predictions.path=predictor:<name>`` (``<name>`` = a ``predictors/conf/predictor``
config, or ``fate``).

The table is built once per (trace content, predictor config, split) and cached under
``$MOESIM_CACHE/predictions`` (default ``~/.cache/moesim/predictions``); the model behind it is
cached by ``predictors.pipeline`` as usual, so a sweep trains each predictor once. A file lock
makes parallel sweep workers wait for the one that builds a table instead of building it twice.
Only the predictor that needs torch imports it (lazily, in ``predictors.pipeline``).

Learned predictors train on the train split of the trace (``predictors/conf/config.yaml``:
75/12.5/12.5 % of the requests, seed 0) and predict every request; :func:`held_out_requests`
gives the test requests, which ``moesim-sim`` replays by default (``predictions.requests=test``)
so that a simulated prediction is never one the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moesim.predictors.data import PredictorError, file_digest, split_requests
from moesim.traces.cache import cache_root, entry_lock, sweep_temporaries

SPEC_PREFIX = "predictor:"
CONF_DIR = Path(__file__).parent / "conf"
NO_TRAINING = ("fate",)  # tables computed from the trace alone (numpy)
TABLE_VERSION = 1  # bump when the table a config produces changes


def parse_spec(text: str | None) -> str | None:
    """``predictor:<name>`` -> ``<name>``; anything else -> None."""
    if text is None or not str(text).startswith(SPEC_PREFIX):
        return None
    name = str(text)[len(SPEC_PREFIX):].strip()
    if not name:
        raise PredictorError("predictions.path: 'predictor:' needs a predictor name")
    return name


def predictor_names() -> list[str]:
    """Every name ``predictor:<name>`` accepts."""
    return sorted([p.stem for p in (CONF_DIR / "predictor").glob("*.yaml")] + list(NO_TRAINING))


def predictor_config(name: str) -> DictConfig:
    """A predictor config with its ``defaults`` chain merged (the files use ``- base`` then
    ``- _self_``, as Hydra would compose them)."""
    path = CONF_DIR / "predictor" / f"{name}.yaml"
    if not path.is_file():
        raise PredictorError(
            f"unknown predictor {name!r} (known: {', '.join(predictor_names())})"
        )
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", []) or [])
    merged = OmegaConf.create()
    for item in defaults or ["_self_"]:
        merged = OmegaConf.merge(merged, own if item == "_self_" else predictor_config(str(item)))
    if "_self_" not in defaults:
        merged = OmegaConf.merge(merged, own)
    return merged


def split_settings() -> tuple[tuple[float, float, float], int]:
    """The default request split of ``moesim-train`` (fractions, seed)."""
    cfg = OmegaConf.load(CONF_DIR / "config.yaml")
    fr = tuple(float(x) for x in cfg.split.fractions)
    return (fr[0], fr[1], fr[2]), int(cfg.split.seed)


def held_out_requests(request_ids: list[int]) -> tuple[int, ...]:
    """The test requests of the default split (never seen by a predictor in training)."""
    fractions, seed = split_settings()
    return split_requests(request_ids, fractions, seed).test


def table_root() -> Path:
    return cache_root() / "predictions"


def _plain_config(name: str) -> dict:
    if name in NO_TRAINING:
        return {"method": name}
    return OmegaConf.to_container(predictor_config(name), resolve=True)  # type: ignore[return-value]


def table_key(trace: Path, name: str) -> str:
    """Hash of everything the table depends on: the trace's content and its router-weights side
    file (Fate and ``ranking=routers`` read it), the predictor config, the split, the table code
    version."""
    from moesim.traces.collect.collector import routers_path

    trace = Path(trace)
    if not trace.is_file():
        raise PredictorError(f"trace file not found: {trace}")
    side = routers_path(trace)
    fractions, seed = split_settings()
    text = json.dumps({
        "trace": file_digest(trace), "routers": file_digest(side) if side.is_file() else None,
        "predictor": _plain_config(name), "split": fractions, "seed": seed,
        "version": TABLE_VERSION,
    }, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def table_for(trace: Path, name: str, log: Callable[[str], None] = print,
              progress: bool = True) -> Path:
    """Path of ``name``'s prediction table for ``trace``, built (and cached) on first use."""
    trace = Path(trace)
    key = table_key(trace, name)
    out = table_root() / f"{name}-{key}.parquet"
    log_wait = out.with_name(f".{out.name}.lock").exists() and not out.is_file()
    if log_wait:
        log(f"waiting for another process building {out.name} ...")
    with entry_lock(out):
        if out.is_file():
            return out
        sweep_temporaries(out)  # of a killed build of this very table
        log(f"building the {name} prediction table for {trace.name} (once) -> {out}")
        if name == "fate":
            from moesim.predictors.fate import fate_predictions

            try:
                fate_predictions(trace, out)
            except ValueError as exc:
                raise PredictorError(f"fate: {exc}") from None
            return out
        from moesim.predictors.pipeline import run

        run(run_config(name, trace, eval_parts=("test",), predictions=out, progress=progress),
            log=log)
    return out


def run_config(name: str, trace: Path, **settings: Any):
    """The ``predictors.pipeline.RunConfig`` of predictor ``name`` on ``trace`` with the default
    split, as ``moesim-train predictor=<name>`` would build it; ``settings`` set other fields."""
    from moesim.predictors.pipeline import RunConfig

    if name in NO_TRAINING:
        raise PredictorError(f"{name} has no training run (its table comes from the trace)")
    plain = _plain_config(name)
    fractions, seed = split_settings()
    return RunConfig(
        trace=Path(trace), method=str(plain["method"]), feature=str(plain.get("feature") or ""),
        model=dict(plain.get("model") or {}), train=dict(plain.get("train") or {}),
        split=fractions, split_seed=seed, **settings,
    )
