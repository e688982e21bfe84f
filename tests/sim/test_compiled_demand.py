"""Demand-only LRU/FIFO on the compiled engine (sim.compiled) give the SimPy engine's metrics,
run for run, over a wide grid of shapes (the first compiled path; see test_compiled_engine for
every policy)."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.sim import FixedCompute, FixedLink, simulate
from tests.helpers import random_trace


def _same(a: dict, b: dict) -> list[str]:
    bad = []
    for key, x in a.items():
        if key == "sim_engine":
            continue
        y = b[key]
        if isinstance(x, float) and (math.isnan(x) and math.isnan(y)):
            continue
        if isinstance(x, float) and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
            continue
        if x != y:
            bad.append(f"{key}: {x} != {y}")
    return bad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    layers=st.integers(1, 4),
    experts=st.integers(4, 12),
    top_k=st.integers(1, 3),
    policy=st.sampled_from(["lru", "fifo"]),
    mode=st.sampled_from(["timed", "zero_latency"]),
    partition=st.sampled_from(["global", "per_layer"]),
    batch=st.integers(1, 3),
    replay=st.sampled_from(["decode", "prefill"]),
    engines=st.integers(1, 3),
    extra=st.integers(0, 10),
    pin=st.booleans(),
    warmup=st.integers(0, 3),
)
def test_compiled_replay_equals_engine(seed, layers, experts, top_k, policy, mode, partition,
                                       batch, replay, engines, extra, pin, warmup):
    trace = random_trace(num_requests=3, tokens=8, layers=layers, experts=experts, top_k=top_k,
                         seed=seed, prefill_tokens=3)
    width = min(top_k * batch * 8, experts)  # a prefill chunk may use every expert
    per = width + engines
    cap = min(per * (layers if partition == "per_layer" else 1) + extra, layers * experts)
    kw = dict(
        capacity=cap, mode=mode, partition=partition, batch=batch, replay=replay,
        warmup_tokens=warmup, pin_layer=pin or mode == "timed",
        link=FixedLink(2e-4, 1e9, engines),
        compute=FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4,
                             dense_s=5e-4),
        dense_before=[1] + [0] * (layers - 1),
    )
    fast = simulate(trace, policy, **kw)
    ref = simulate(trace, policy, engine="python", **kw)
    assert fast.summary["sim_engine"] == "compiled"
    assert ref.summary["sim_engine"] == "python"
    assert _same(ref.summary, fast.summary) == []
    assert ref.per_layer.drop(columns="stall_time_s").equals(
        fast.per_layer.drop(columns="stall_time_s"))
