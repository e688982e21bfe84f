"""Properties the first property suite left out (issue 12): monotonicity in capacity and link
bandwidth, batches on the general engine, and imperfect or foreign prediction tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies.registry import discover
from moesim.sim import FixedCompute, FixedLink, SimulationError, simulate
from moesim.sim.predictions import PredictionView
from moesim.sim.workload import build_workload
from moesim.traces.predictions import PredictionTable
from tests.helpers import noisy_predictions, random_trace
from tests.sim.parts import check_parts

discover()
PREDICTION_POLICIES = ("moe_beyond_replay", "prediction_prefetch")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

traces = st.builds(
    random_trace,
    num_requests=st.integers(1, 3),
    tokens=st.integers(2, 12),
    layers=st.integers(1, 4),
    experts=st.integers(4, 10),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    skew=st.floats(0.0, 2.0),
)


def _total(trace) -> int:
    return trace.meta.num_moe_layers * trace.meta.num_experts


@SETTINGS
@given(trace=traces, ev=st.sampled_from(["lru", "belady"]), data=st.data())
def test_hit_rate_never_falls_as_capacity_grows(trace, ev, data):
    """LRU and Belady are stack algorithms: a bigger cache holds a superset, so hits never fall
    (without layer pinning, which is not part of either policy). FIFO is not one (Belady's
    anomaly), so it is left out on purpose."""
    caps = sorted(data.draw(st.lists(st.integers(2, _total(trace)), min_size=2, max_size=4)))
    hits = [
        simulate(trace, ev, capacity=c, mode="zero_latency", pin_layer=False).summary["hits"]
        for c in caps
    ]
    assert hits == sorted(hits), (caps, hits)


@SETTINGS
@given(trace=traces, extra=st.integers(0, 12))
def test_unpinned_belady_is_the_optimum_of_every_eviction_pinned_or_not(trace, extra):
    """The bound the README names: Belady without layer pinning has no more misses than any
    demand-only eviction policy, with or without pinning (pinning only removes choices)."""
    cap = min(trace.meta.top_k + 1 + extra, _total(trace))
    best = simulate(trace, "belady", capacity=cap, mode="zero_latency",
                    pin_layer=False).summary["misses"]
    for ev in ("lru", "fifo", "lfu", "belady", "least_stale"):
        for pin in (True, False):
            s = simulate(trace, ev, capacity=cap, mode="zero_latency", pin_layer=pin).summary
            assert best <= s["misses"], (ev, pin)


@SETTINGS
@given(trace=traces, ev=st.sampled_from(["lru", "fifo", "lfu", "belady", "least_stale"]),
       extra=st.integers(0, 10), engines=st.integers(1, 3),
       bws=st.lists(st.floats(1e5, 1e9), min_size=2, max_size=4),
       engine=st.sampled_from(["auto", "python"]))
def test_stall_never_rises_with_more_bandwidth_for_demand_only(trace, ev, extra, engines, bws,
                                                              engine):
    """Demand-only policies decide hits without looking at time, so a faster link can only
    bring each miss earlier (SimPy and compiled engines alike)."""
    cap = min(trace.meta.top_k + engines + extra, _total(trace))
    stalls = []
    for bw in sorted(bws):
        s = simulate(trace, ev, capacity=cap, mode="timed", link=FixedLink(1e-5, bw, engines),
                     compute=FixedCompute(attention_s=1e-4, expert_s=1e-4),
                     engine=engine).summary
        stalls.append(s["stall_time_s"])
    assert all(b <= a * (1 + 1e-12) + 1e-15 for a, b in itertools.pairwise(stalls)), stalls


@SETTINGS
@given(trace=traces, ev=st.sampled_from(["lru", "fifo"]), batch=st.integers(2, 4),
       extra=st.integers(0, 20))
def test_batches_on_the_general_engine_match_the_compiled_replay(trace, ev, batch, extra):
    """Batch > 1 runs the per-step union of experts; both engines must agree on it."""
    w = build_workload(trace, batch=batch)
    need = int(w.max_width().max()) + 1
    cap = min(need + extra, _total(trace))
    kw = {"capacity": cap, "mode": "timed", "batch": batch, "link": FixedLink(1e-5, 1e6, 1),
          "compute": FixedCompute(attention_s=1e-4, expert_s=1e-4)}
    py = simulate(trace, ev, engine="python", **kw)
    fast = simulate(trace, ev, **kw)
    assert fast.summary["sim_engine"] == "compiled" and py.summary["sim_engine"] == "python"
    check_parts(py)
    assert py.summary["accesses"] == int((w.keys >= 0).sum())
    assert py.summary["token_expert_pairs"] == trace.num_rows * trace.meta.top_k
    for key in ("hits", "misses", "accesses", "evictions", "demand_bytes"):
        assert py.summary[key] == fast.summary[key], key
    assert py.summary["stall_time_s"] == pytest.approx(fast.summary["stall_time_s"], rel=1e-9)




@SETTINGS
@given(trace=traces, pf=st.sampled_from(PREDICTION_POLICIES), wrong=st.floats(0.0, 1.0),
       width=st.integers(1, 4), extra=st.integers(0, 12), seed=st.integers(0, 1000),
       mode=st.sampled_from(["timed", "zero_latency"]))
def test_imperfect_tables_keep_the_accounting(trace, pf, wrong, width, extra, seed, mode):
    width = min(width, trace.meta.num_experts)
    table = noisy_predictions(trace, np.random.default_rng(seed), wrong, width)
    cap = min(trace.meta.top_k + width + 1 + extra, _total(trace))
    kw = {"capacity": cap, "mode": mode, "predictions": table}
    if mode == "timed":
        kw.update(link=FixedLink(1e-5, 1e6, 1), compute=FixedCompute(attention_s=1e-4,
                                                                      expert_s=1e-4))
    res = simulate(trace, {"name": pf, "point": "routed"} if pf == "prediction_prefetch"
                   else pf, **kw)
    check_parts(res)
    assert res.summary["prediction_coverage"] == 1.0
    if mode == "zero_latency" and wrong == 0.0 and width >= trace.meta.top_k:
        assert res.summary["hit_rate"] == 1.0  # a perfect same-layer table, loaded at once


@SETTINGS
@given(trace=traces, shift=st.integers(1, 5))
def test_foreign_ids_are_an_error_not_the_next_layers_expert(trace, shift):
    """An id >= E at layer l must not alias expert id - E of layer l + 1 (or crash at the last
    layer): it is a clear error, wherever it is."""
    table = noisy_predictions(trace, np.random.default_rng(0), 0.0, 1)
    rid = trace.requests[-1].request_id
    table[rid][-1, -1, 0] = trace.meta.num_experts + shift - 1
    with pytest.raises(SimulationError, match="outside"):
        simulate(trace, "moe_beyond_replay", capacity=_total(trace), mode="zero_latency",
                 predictions=table)


@SETTINGS
@given(trace=traces, offset=st.integers(1, 100), threshold=st.floats(0.01, 1.0))
def test_a_table_for_other_requests_is_refused(trace, offset, threshold):
    """A table keyed by requests the trace does not have covers nothing: an error naming the
    table, unless the threshold is lowered to 0, when the run reports its coverage."""
    mine = noisy_predictions(trace, np.random.default_rng(0), 0.0, 1)
    other = PredictionTable({rid + 1000 * offset: p for rid, p in mine.items()})
    other.min_coverage = threshold
    with pytest.raises(SimulationError, match="min_coverage"):
        simulate(trace, "moe_beyond_replay", capacity=_total(trace), mode="zero_latency",
                 predictions=other)
    other.min_coverage = 0.0
    s = simulate(trace, "moe_beyond_replay", capacity=_total(trace), mode="zero_latency",
                 predictions=other).summary
    assert s["prediction_coverage"] == 0.0 and s["prefetch_transfers"] == 0


def test_coverage_counts_tokens_of_the_replayed_requests():
    trace = random_trace(num_requests=2, tokens=10, layers=2, experts=6, top_k=2, seed=3)
    table = noisy_predictions(trace, np.random.default_rng(0), 0.0, 2)
    table[0] = table[0][:5]  # request 0: only its first 5 of 10 tokens predicted
    view = PredictionView(build_workload(trace), table, min_coverage=0.0)
    assert (view.covered_tokens, view.replayed_tokens) == (15, 20)
    with pytest.raises(SimulationError, match=r"covers 15 of the 20 .* replayed"):
        PredictionView(build_workload(trace), table, min_coverage=0.8)
