"""One predictor run: load a trace, split by request, fit, evaluate, write a prediction table.

Used by ``moesim-train`` (``predictors/train_app.py``) and by the tests; it knows nothing
about Hydra. The learned predictor imports torch lazily, so the baselines run without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.predictors.baselines import fit_frequency, rank_frequency, rank_recency
from moesim.predictors.data import PredictorError, TraceData, file_digest, load_data, split_requests
from moesim.predictors.metrics import MetricSpec, evaluate
from moesim.predictors.registry import Ranking, get_method, register_method
from moesim.traces.predictions import PredictionWriter, trace_identity
from moesim.traces.store import atomic_path

FEATURE_AVAILABLE_AT = {
    "pre_attn": "pre_attention:same_layer",  # layer l's input norm, before attention
    "router_in": "routed:same_layer",  # the router's own input: no lead time
}
BASELINE_AVAILABLE_AT = {
    "frequency": "static:any_layer",
    "recency": "previous_token:same_layer",
}


@dataclass(frozen=True)
class RunConfig:
    """Everything one predictor run depends on (model settings as plain dicts)."""

    trace: Path
    method: str = "pre_attention"
    feature: str = "pre_attn"
    model: dict = field(default_factory=dict)  # PreAttentionConfig fields
    train: dict = field(default_factory=dict)  # TrainConfig fields
    split: tuple[float, float, float] = (0.75, 0.125, 0.125)
    split_seed: int = 0
    eval_parts: tuple[str, ...] = ("val", "test")
    overprov: tuple[int, ...] = ()
    predictions: Path | None = None
    predict_requests: str = "all"  # all | test
    width: int | None = None  # ids per prediction row; None = top_k
    cache_dir: Path | None = None
    retrain: bool = False
    progress: bool = True
    threads: int = 1  # torch threads while training (not part of the cache key)


@dataclass
class RunOutput:
    metrics: pd.DataFrame
    predictions: Path | None
    available_at: str
    train_seconds: float
    cached: bool
    split: dict[str, tuple[int, ...]]
    model_path: Path | None = None


def _dataclass_from(cls: type, values: dict, what: str):
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PredictorError(f"unknown {what} parameter(s) {unknown}; known: {sorted(known)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**fixed)
    except (TypeError, ValueError) as exc:
        raise PredictorError(f"{what}: {exc}") from None


def _configs(model_cls: type, train_cls: type, cfg: RunConfig) -> tuple[Any, Any]:
    """``predictor.model`` / ``predictor.train`` as checked dataclasses (one clear error)."""
    mcfg = _dataclass_from(model_cls, cfg.model, "predictor.model")
    tcfg = _dataclass_from(train_cls, cfg.train, "predictor.train")
    for what, c in (("predictor.model", mcfg), ("predictor.train", tcfg)):
        try:
            c.check()
        except ValueError as exc:
            raise PredictorError(f"{what}: {exc}") from None
    return mcfg, tcfg


def _rank_pre_attention(
    cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]
) -> tuple[np.ndarray, float, bool, Path]:
    """Full ranking ``[N, E]`` of every row from a (cached or fresh) pre-attention model."""
    from moesim.predictors.pre_attention import PreAttentionConfig  # torch only here
    from moesim.predictors.train import (
        TrainConfig,
        cache_dir,
        cache_key,
        predict_logits,
        ranks_from,
        train_pre_attention,
    )

    mcfg, tcfg = _configs(PreAttentionConfig, TrainConfig, cfg)
    meta = data.trace.meta
    full = None
    if mcfg.ranking == "routers":
        full = _router_logits(data)
    ranks = ranks_from(data.rows.experts, meta.num_experts, full)
    key = cache_key({
        "method": "pre_attention", "model": asdict(mcfg), "train": asdict(tcfg),
        "data": data.fingerprint, "feature": cfg.feature,
        "train_ids": np.unique(data.rows.request[train]).tolist(),
        "val_ids": np.unique(data.rows.request[val]).tolist(),
    })
    res = train_pre_attention(
        data.features, data.rows.layer, data.rows.experts, ranks,
        np.flatnonzero(train), np.flatnonzero(val),
        num_layers=meta.num_moe_layers, num_experts=meta.num_experts, model_cfg=mcfg,
        train_cfg=tcfg, key=key, directory=cache_dir(cfg.cache_dir), retrain=cfg.retrain,
        progress=cfg.progress, threads=cfg.threads, log=log,
    )
    logits = predict_logits(res.model, data.features, data.rows.layer)
    ranked = np.argsort(-logits, axis=1, kind="stable").astype(np.int16)
    return ranked, res.train_seconds, res.cached, res.path


def _rank_speculation(
    cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray, float, bool, Path, str]:
    """Ranking ``[N, E]`` from the inter-layer speculation model (``predictors/speculation.py``):
    rows of the first ``horizon`` layers (nothing routed ``horizon`` layers before) are ``-1``.
    Also returns the mask of predicted rows and the table's ``available_at`` tag."""
    from moesim.predictors.speculation import (  # torch only here
        SpecTrainConfig,
        SpeculationConfig,
        available_at,
        build_inputs,
        context_rows,
        predict_logits,
        train_speculation,
    )
    from moesim.predictors.train import cache_dir, cache_key

    mcfg, tcfg = _configs(SpeculationConfig, SpecTrainConfig, cfg)
    rows, meta = data.rows, data.trace.meta
    e = meta.num_experts
    ctx, has = context_rows(rows.request, rows.token, rows.layer, meta.num_moe_layers,
                            mcfg.context, mcfg.horizon)
    if not has[train].any():
        raise PredictorError(
            f"speculation: no train rows at layer >= horizon {mcfg.horizon} "
            f"({meta.num_moe_layers} MoE layers)"
        )
    tr, va = np.flatnonzero(train & has), np.flatnonzero(val & has)
    key = cache_key({
        "method": "speculation", "model": asdict(mcfg), "train": asdict(tcfg),
        "data": data.fingerprint,
        "train_ids": np.unique(rows.request[train]).tolist(),
        "val_ids": np.unique(rows.request[val]).tolist(),
    })
    res = train_speculation(
        build_inputs(rows.experts, rows.layer, ctx, tr, e), rows.experts[tr],
        build_inputs(rows.experts, rows.layer, ctx, va, e), rows.experts[va],
        num_layers=meta.num_moe_layers, num_experts=e, model_cfg=mcfg, train_cfg=tcfg, key=key,
        directory=cache_dir(cfg.cache_dir), retrain=cfg.retrain, progress=cfg.progress,
        threads=cfg.threads, log=log,
    )
    idx = np.flatnonzero(has)
    ranked = np.full((len(rows), e), -1, dtype=np.int16)
    logits = predict_logits(res.model, build_inputs(rows.experts, rows.layer, ctx, idx, e))
    ranked[idx] = np.argsort(-logits, axis=1, kind="stable").astype(np.int16)
    return ranked, has, res.train_seconds, res.cached, res.path, available_at(mcfg.horizon)


def moe_beyond_vector(cfg: RunConfig) -> str:
    """The token vector a ``moe_beyond`` run uses (``auto`` resolved against the trace)."""
    from moesim.traces.store import feature_specs

    choice = str(cfg.model.get("token_vector", "auto"))
    if choice == "auto":
        return "router_in" if "router_in" in feature_specs(cfg.trace) else "text"
    return choice


def _rank_moe_beyond(
    cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]
) -> tuple[np.ndarray, float, bool, Path, str]:
    """Ranking ``[N, E]`` from MoE-Beyond's transformer (``predictors/moe_beyond.py``) and the
    table's ``available_at`` tag."""
    from moesim.predictors.moe_beyond import (  # torch only here
        OOV,
        MoEBeyondConfig,
        MoEBeyondTrainConfig,
        available_at,
        predict_logits,
        sequences,
        text_vocab,
        train_moe_beyond,
        windows,
    )
    from moesim.predictors.train import cache_dir, cache_key

    mcfg, tcfg = _configs(MoEBeyondConfig, MoEBeyondTrainConfig, cfg)
    rows, meta = data.rows, data.trace.meta
    vec_name = data.feature or "text"
    vocab = 0
    if data.features is not None:
        vectors = np.asarray(data.features, dtype=np.float32)
    else:
        texts = _row_texts(data)
        table = text_vocab([texts[i] for i in np.flatnonzero(train)])
        vectors = np.array([table.get(t, OOV) for t in texts], dtype=np.int64)
        vocab = len(table) + 1
    key = cache_key({
        "method": "moe_beyond", "model": asdict(mcfg), "train": asdict(tcfg),
        "data": data.fingerprint, "vector": vec_name,
        "train_ids": np.unique(rows.request[train]).tolist(),
        "val_ids": np.unique(rows.request[val]).tolist(),
    })
    causal = mcfg.context == "causal"
    res = train_moe_beyond(
        vectors, rows.layer, rows.token, rows.experts,
        sequences(rows.request, rows.token, np.flatnonzero(train), mcfg.max_length),
        windows(rows.request, rows.token, np.flatnonzero(val), mcfg.max_length),
        vocab=vocab, num_layers=meta.num_moe_layers, num_experts=meta.num_experts,
        model_cfg=mcfg, train_cfg=tcfg, key=key, directory=cache_dir(cfg.cache_dir),
        retrain=cfg.retrain, progress=cfg.progress, threads=cfg.threads, log=log,
    )
    everything = windows(rows.request, rows.token, np.arange(len(rows)), mcfg.max_length)
    logits = predict_logits(res.model, everything, vectors, rows.layer, rows.token, len(rows),
                            causal)
    ranked = np.argsort(-logits, axis=1, kind="stable").astype(np.int16)
    return ranked, res.train_seconds, res.cached, res.path, available_at(mcfg.context, vec_name)


def _row_texts(data: TraceData) -> list[str | None]:
    """Token text of every row (``token_vector=text``); a clear error when the trace has none."""
    by_req = {r.request_id: r.tokens for r in data.trace.requests}
    if any(t is None for t in by_req.values()):
        raise PredictorError(
            f"{data.path}: moe_beyond with token_vector=text needs token texts (the trace's "
            "'token' column); this trace has none"
        )
    return [by_req[int(q)][int(t)] for q, t in zip(data.rows.request, data.rows.token,
                                                     strict=True)]


def _router_logits(data: TraceData) -> np.ndarray:
    """Full router logits from ``feat.router_in`` and the ``.routers.npz`` side file."""
    from moesim.predictors.data import full_ranking_from_routers
    from moesim.traces.collect.collector import load_routers, routers_path
    from moesim.traces.store import load_features

    side = routers_path(data.path)
    if not side.is_file():
        raise PredictorError(f"ranking=routers needs the router weights file {side}")
    try:
        router_in = load_features(data.path, "router_in")
    except Exception as exc:
        raise PredictorError(f"ranking=routers needs feat.router_in: {exc}") from None
    meta = data.trace.meta
    return full_ranking_from_routers(
        router_in, data.rows.layer, load_routers(side), meta.moe_layers
    )


def write_predictions(
    path: Path, data: TraceData, ranked: np.ndarray, requests: tuple[int, ...], width: int,
    method: str, available_at: str, notes: dict[str, str],
) -> None:
    """Prediction table (``traces.predictions`` schema) of ``requests``, first ``width`` ids."""
    rows = data.rows
    meta = data.trace.meta
    wanted = set(requests)
    starts = np.flatnonzero(np.r_[True, rows.request[1:] != rows.request[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    with atomic_path(path) as tmp:
        pw = PredictionWriter(tmp, meta.moe_layers, available_at=available_at,
                              trace=trace_identity(meta, file_digest(data.path)))
        try:
            for req, a, b in zip(rows.request[starts], starts, ends, strict=True):
                if int(req) not in wanted:
                    continue
                t = int(rows.token[a:b].max()) + 1
                dense = np.full((t, meta.num_moe_layers, width), -1, dtype=np.int16)
                dense[rows.token[a:b], rows.layer[a:b]] = ranked[a:b, :width]
                pw.add(int(req), dense)
            pw.close({
                "model": meta.model, "source": str(data.path), "predictor": method,
                "available_at": available_at, "notes": notes,
            })
        except BaseException:
            pw.abort()
            raise


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> RunOutput:
    """Fit ``cfg.method`` on the train split and evaluate it on ``cfg.eval_parts``."""
    method = get_method(cfg.method)
    if cfg.predict_requests not in ("all", "test"):
        raise PredictorError("predictions.requests must be 'all' or 'test'")
    if not method.takes_params and (cfg.model or cfg.train):
        raise PredictorError(f"{cfg.method} takes no model or train parameters")
    if method.reads_trace_file and not Path(cfg.trace).is_file():
        raise PredictorError(f"trace file not found: {cfg.trace}")
    data = load_data(cfg.trace, method.feature(cfg) if method.feature else None)
    meta = data.trace.meta
    rows = data.rows
    if len(rows) == 0:
        raise PredictorError(f"{cfg.trace}: trace has no rows")
    split = split_requests([r.request_id for r in data.trace.requests], cfg.split, cfg.split_seed)
    train, val = rows.mask(split.train), rows.mask(split.val)
    r = method.fn(cfg, data, train, val, log)
    ranked, seconds, cached, model_path = r.ranked, r.seconds, r.cached, r.model_path
    available_at = r.available_at
    scored = r.scored if r.scored is not None else np.ones(len(rows), dtype=bool)
    spec = MetricSpec(meta.num_experts, meta.top_k, tuple(cfg.overprov))
    records = []
    for part in cfg.eval_parts:
        m = rows.mask(split.part(part)) & scored
        for rec in evaluate(ranked[m], rows.experts[m], rows.layer[m], spec, meta.moe_layers):
            records.append({"method": cfg.method, "split": part, **rec})
    metrics = pd.DataFrame(records)
    metrics["train_seconds"] = seconds
    metrics["cached_model"] = cached
    metrics["available_at"] = available_at
    out_path = None
    if cfg.predictions is not None:
        width = meta.top_k if cfg.width is None else int(cfg.width)
        if not 1 <= width <= meta.num_experts:
            raise PredictorError(f"predictions.width must be in 1..{meta.num_experts}: {width}")
        reqs = split.test if cfg.predict_requests == "test" else tuple(
            r.request_id for r in data.trace.requests
        )
        notes = {
            "split": f"train {len(split.train)} / val {len(split.val)} / test "
                     f"{len(split.test)} requests, seed {cfg.split_seed}",
            "test_requests": ",".join(map(str, split.test)),
            "requests": cfg.predict_requests,
            "model": str(model_path) if model_path else "",
        }
        write_predictions(cfg.predictions, data, ranked, reqs, width, cfg.method, available_at,
                          notes)
        out_path = cfg.predictions
    return RunOutput(
        metrics, out_path, available_at, seconds, cached,
        {"train": split.train, "val": split.val, "test": split.test}, model_path,
    )


# --- the shipped methods (plugins add theirs with the same decorator) -------------------------


def _pre_attention_feature(cfg: RunConfig) -> str:
    if cfg.feature not in FEATURE_AVAILABLE_AT:
        raise PredictorError(
            f"feature {cfg.feature!r}: pre_attention supports {sorted(FEATURE_AVAILABLE_AT)}")
    return cfg.feature


def _moe_beyond_feature(cfg: RunConfig) -> str | None:
    vec = moe_beyond_vector(cfg)
    return None if vec == "text" else vec


@register_method("pre_attention", takes_params=True, feature=_pre_attention_feature)
def _pre_attention(cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray,
                   log: Callable[[str], None]) -> Ranking:
    ranked, seconds, cached, path = _rank_pre_attention(cfg, data, train, val, log)
    return Ranking(ranked, FEATURE_AVAILABLE_AT[cfg.feature], seconds, cached, path)


@register_method("speculation", takes_params=True)
def _speculation(cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray,
                 log: Callable[[str], None]) -> Ranking:
    ranked, scored, seconds, cached, path, available_at = _rank_speculation(
        cfg, data, train, val, log)
    return Ranking(ranked, available_at, seconds, cached, path, scored)


@register_method("moe_beyond", takes_params=True, reads_trace_file=True,
                 feature=_moe_beyond_feature)
def _moe_beyond(cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray,
                log: Callable[[str], None]) -> Ranking:
    ranked, seconds, cached, path, available_at = _rank_moe_beyond(cfg, data, train, val, log)
    return Ranking(ranked, available_at, seconds, cached, path)


def _baseline(name: str) -> Callable[..., Ranking]:
    def fn(cfg: RunConfig, data: TraceData, train: np.ndarray, val: np.ndarray,
           log: Callable[[str], None]) -> Ranking:
        t0 = time.perf_counter()
        meta, rows = data.trace.meta, data.rows
        table = fit_frequency(rows, train, meta.num_moe_layers, meta.num_experts)
        rank = rank_frequency if name == "frequency" else rank_recency
        ranked = rank(table, rows, np.ones(len(rows), dtype=bool))
        return Ranking(ranked, BASELINE_AVAILABLE_AT[name], time.perf_counter() - t0)
    return fn


for _name in ("frequency", "recency"):
    register_method(_name)(_baseline(_name))
