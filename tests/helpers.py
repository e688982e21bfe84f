"""Small in-memory traces the tests build themselves."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from moesim.traces.trace import DECODE, PREFILL, RequestRouting, Trace, TraceMeta


def random_trace(
    num_requests: int = 3,
    tokens: int = 20,
    layers: int = 4,
    experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    skew: float = 1.0,
    expert_bytes: int = 1000,
    prefill_tokens: int = 0,
) -> Trace:
    """Zipf-skewed routing: every token picks ``top_k`` distinct experts per layer."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1) ** skew
    reqs = []
    for r in range(num_requests):
        ex = np.empty((tokens, layers, top_k), dtype=np.int16)
        for j in range(layers):
            perm = rng.permutation(experts)  # layer-specific popularity
            p = weights[perm] / weights.sum()
            for t in range(tokens):
                ex[t, j] = rng.choice(experts, size=top_k, replace=False, p=p)
        phase = np.full(tokens, DECODE, dtype=np.uint8)
        phase[:prefill_tokens] = PREFILL
        reqs.append(RequestRouting(r, ex, phase))
    meta = TraceMeta(
        model="synthetic",
        moe_layers=tuple(range(layers)),
        num_experts=experts,
        top_k=top_k,
        expert_bytes=expert_bytes,
    )
    return Trace(meta, reqs)


def write_deepseek_shaped(path: Path, requests: int, tokens: int, seed: int) -> Path:
    """A trace file of synthetic routing with DeepSeek-V2-Lite's shape (26 MoE layers, 64
    experts, top-6, its expert bytes), so the app finds a model card; parent folders made."""
    from moesim.traces import write_trace

    tr = random_trace(num_requests=requests, tokens=tokens, layers=26, experts=64, top_k=6,
                      seed=seed)
    meta = replace(tr.meta, model="deepseek_v2_lite", moe_layers=tuple(range(1, 27)),
                   expert_bytes=17301504)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_trace(path, meta, tr.requests)
    return path


def trace_from_lists(routing: list[list[list[list[int]]]], experts: int, expert_bytes: int = 1000
                     ) -> Trace:
    """``routing[request][token][layer]`` = list of expert ids."""
    reqs = []
    for r, toks in enumerate(routing):
        arr = np.array(toks, dtype=np.int16)
        reqs.append(RequestRouting(r, arr, np.full(arr.shape[0], DECODE, dtype=np.uint8)))
    layers, k = reqs[0].experts.shape[1:]
    meta = TraceMeta("tiny", tuple(range(layers)), experts, k, expert_bytes=expert_bytes)
    return Trace(meta, reqs)


def noisy_predictions(trace: Trace, rng: np.random.Generator, wrong: float, width: int):
    """A prediction table for ``trace``, right with probability 1 - ``wrong`` per slot and
    padded with random other experts up to ``width`` (every request covered)."""
    from moesim.traces.predictions import PredictionTable

    e = trace.meta.num_experts
    out = PredictionTable()
    for r in trace.requests:
        ex = r.experts.astype(np.int64)
        t, num_l, _ = ex.shape
        pred = np.full((t, num_l, width), -1, dtype=np.int16)
        for i in range(t):
            for j in range(num_l):
                ids = [x for x in ex[i, j] if rng.random() >= wrong]
                ids += [x for x in rng.permutation(e) if x not in ids]
                pred[i, j] = ids[:width]
        out[r.request_id] = pred
    return out


def sweep_tables(sweep: Path, status: bool = False) -> dict[str, object]:
    """Every run's tables of a sweep folder (their ``run.*`` timing columns dropped) and saved
    config and overrides, with ``status`` each run's status too: what two launchers of the
    same sweep must agree on."""
    import json

    import pandas as pd

    out: dict[str, object] = {}
    for run in sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(run.glob("*.parquet")):
            df = pd.read_parquet(path)
            out[f"{run.name}/{path.name}"] = df.drop(
                columns=[c for c in df if c.startswith("run.")])
        for name in ("config.yaml", "overrides.yaml"):
            out[f"{run.name}/{name}"] = (run / ".hydra" / name).read_text()
        if status:
            out[f"{run.name}/status"] = json.loads((run / "status.json").read_text())["status"]
    return out
