"""Batched workloads built by the compiled union pass equal a plain numpy reference."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.sim.workload import _units, build_workload
from tests.helpers import random_trace


def _reference(trace, batch: int, replay: str, chunk: int, warmup: int) -> dict:
    """The per-step unions the simple way: np.unique per step and layer, first-use order."""
    num_l, num_e = trace.meta.num_moe_layers, trace.meta.num_experts
    pending = list(trace.requests)[::-1]
    running: list = []
    out: dict = {"keys": [], "counts": [], "pairs": [], "tokens": [], "counted": [],
                 "joins": {}, "context": []}
    while pending or running:
        joined = []
        while pending and len(running) < batch:
            req = pending.pop()
            running.append((req, _units(req.phase, replay, chunk), 0))
            joined.append(req.request_id)
        if joined:
            out["joins"][len(out["keys"])] = joined
        rows = [req.experts[u[i][0]:u[i][1]] for req, u, i in running]
        out["tokens"].append(sum(len(r) for r in rows))
        out["context"].append(max(u[i][1] for _, u, i in running))
        out["counted"].append(any(u[i][0] >= warmup for _, u, i in running))
        block = np.concatenate(rows).astype(np.int64)
        keys, counts, pairs = [], [], []
        for j in range(num_l):
            ids = block[:, j, :].ravel()
            ids = ids[ids >= 0]
            uniq, first, cnt = np.unique(ids, return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")
            keys.append((uniq[order] + j * num_e).tolist())
            counts.append(cnt[order].tolist())
            pairs.append(len(ids))
        out["keys"].append(keys)
        out["counts"].append(counts)
        out["pairs"].append(pairs)
        running = [(r, u, i + 1) for r, u, i in running if i + 1 < len(u)]
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5),
       replay=st.sampled_from(["decode", "prefill"]), chunk=st.integers(0, 3),
       warmup=st.integers(0, 3), requests=st.integers(1, 6), prefill=st.integers(0, 4))
def test_batched_steps_equal_the_reference(seed, batch, replay, chunk, warmup, requests,
                                           prefill):
    trace = random_trace(num_requests=requests, tokens=6, layers=3, experts=7, top_k=2,
                         seed=seed, prefill_tokens=prefill)
    if batch == 1 and replay == "decode":
        batch = 2  # batch 1 decode has its own path
    w = build_workload(trace, batch=batch, replay=replay, prefill_chunk=chunk,
                       warmup_tokens=warmup)
    ref = _reference(trace, batch, replay, chunk, warmup)
    assert w.num_steps == len(ref["keys"])
    for s in range(w.num_steps):
        for j in range(trace.meta.num_moe_layers):
            n = len(ref["keys"][s][j])
            assert w.keys[s, j, :n].tolist() == ref["keys"][s][j]
            assert (w.keys[s, j, n:] == -1).all()
            assert w.counts[s, j, :n].tolist() == ref["counts"][s][j]
            assert (w.counts[s, j, n:] == 0).all()
    assert w.keys.shape[2] == max(1, max(len(k) for step in ref["keys"] for k in step))
    assert w.pairs.tolist() == ref["pairs"]
    assert w.tokens.tolist() == ref["tokens"]
    assert w.context.tolist() == ref["context"]
    assert w.counted.tolist() == ref["counted"]
    assert w.joins == ref["joins"]
