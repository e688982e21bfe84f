"""``copy.prefetch_stream: own`` (``sim.link.CopyRules.own_prefetch``): under ``copy.order:
fifo`` prefetch copies run on a stream of their own. They hold no compute-stream kernel, run
on wall time (not paused by kernels), still share the copy engine with demand copies, and an
expert whose prefetch is in flight waits for exactly that copy.

Golden numbers on one- and two-layer fixtures (the constants of ``test_copy_stream``), the
identity with ``compute`` when nothing is prefetched, and both engines run for run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.hw_profiles.runtime import RuntimeCompute, RuntimeLink
from moesim.sim import FixedCompute, FixedLink, SimulationError, simulate
from moesim.sim.link import CopyRules, copy_rules
from moesim.traces.trace import DECODE, RequestRouting, Trace, TraceMeta
from tests.sim.test_compiled_engine import _config, equal_on_both_engines
from tests.sim.test_copy_stream import H_A, H_E, K_E, A, D, _rows, _trace

ENGINES = ["python", "compiled"]
NEXT = {"name": "oracle_prefetch", "eviction": "lru", "point": "demand_issued", "lookahead": 1}
PRE = {"name": "oracle_prefetch", "eviction": "lru", "point": "pre_attention", "lookahead": 0}


def _link(prefetch_stream: str, window: int = 1, sync: bool = False, copy_s: float = D,
          engines: int = 1) -> RuntimeLink:
    return RuntimeLink(FixedLink(copy_s, math.inf, engines), 1, 0.0, 1.0, False, 1.0,
                       "compute", False, 0.0, window, sync, prefetch_stream)


def _run(tr: Trace, policy: Any, prefetch_stream: str, engine: str, layers: int = 1,
         **kw: Any) -> dict[str, Any]:
    link = _link(prefetch_stream, **{k: kw.pop(k) for k in ("window", "sync", "copy_s")
                                     if k in kw})
    comp = RuntimeCompute(FixedCompute(attention_s=A, router_s=0.0, expert_s=K_E),
                          layers=layers, layer_s=H_A, expert_s=H_E)
    kw.setdefault("capacity", 5)
    return simulate(tr, policy, link=link, compute=comp, engine=engine, **kw).summary


def test_rules_read_from_a_runtime() -> None:
    own = copy_rules(_link("own"), 10)
    assert own.own_prefetch and own.compute_stream and not own.link_clock
    assert own.vector()[6] == 1.0
    assert not copy_rules(_link("compute"), 10).own_prefetch
    assert copy_rules(_link("compute"), 10).link_clock
    # without fifo there is no issue order to leave: the rule is off
    assert not copy_rules(_link("own", window=0), 10).own_prefetch
    assert CopyRules().vector()[6] == 0.0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sync", [False, True])
def test_prefetch_in_flight_during_a_hit_kernel_progresses_and_does_not_hold_it(
        engine: str, sync: bool) -> None:
    """Tokens [0], [0], [1]; token 1's demand_issued oracle prefetch of expert 1 starts at its
    routing. On its own stream it holds neither the hit's kernel nor token 2's attention
    kernel, and runs through both: H_E + K_E + H_A + A = 4.5 ms of wall time > D, so token 2
    is a plain hit (paused during kernels it would have had only H_E + H_A = 3 ms < D).
    Token 0: one miss, D after routing, then its kernel (with sync, then its host part too)."""
    tr = _rows([[0], [0], [1]])
    got = _run(tr, NEXT, "own", engine, sync=sync)
    token0 = H_A + A + D + (H_E if sync else 0.0) + K_E
    hit = H_A + A + H_E + K_E
    assert got["prefetch_transfers"] == 1 and got["hits"] == 2 and got["late_hits"] == 0
    assert got["stall_late_s"] == 0.0
    assert got["total_time_s"] == pytest.approx(token0 + 2 * hit, rel=1e-12)
    cs = _run(tr, NEXT, "compute", engine, sync=sync)  # the hit's kernel waits for it there
    assert cs["stall_late_s"] > 0 and cs["total_time_s"] > got["total_time_s"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sync", [False, True])
def test_late_expert_waits_exactly_until_its_copy_lands(engine: str, sync: bool) -> None:
    """A pre-attention prefetch of the layer's own expert (copy C = 6 ms, started at t = 0):
    the attention kernel does not wait for it; at routing (H_A + A) it is still in flight (a
    late hit); the expert's host part runs, then its kernel waits until C: stall_late =
    C - (H_A + A + H_E), total C + K_E. On the compute stream the attention kernel waits for
    it instead (C - H_A), and the layer is C + A + H_E + K_E."""
    c = 6e-3
    tr = _trace([0])
    got = _run(tr, PRE, "own", engine, sync=sync, copy_s=c, capacity=2)
    assert got["late_hits"] == 1 and got["hits"] == 0
    assert got["stall_late_s"] == pytest.approx(c - (H_A + A + H_E), rel=1e-12)
    assert got["total_time_s"] == pytest.approx(c + K_E, rel=1e-12)
    cs = _run(tr, PRE, "compute", engine, sync=sync, copy_s=c, capacity=2)
    assert cs["stall_late_s"] == pytest.approx(c - H_A, rel=1e-12)
    assert cs["total_time_s"] == pytest.approx(c + A + H_E + K_E, rel=1e-12)


def _two_layers(first: int, second: int, num_experts: int = 4) -> Trace:
    ex = np.array([[[first], [second]]], dtype=np.int16)
    meta = TraceMeta(model="synthetic", moe_layers=(0, 1), num_experts=num_experts, top_k=1,
                     expert_bytes=1000)
    return Trace(meta, [RequestRouting(0, ex, np.full(1, DECODE, np.uint8))])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sync", [False, True])
def test_demand_copy_queues_behind_a_prefetch_in_flight(engine: str, sync: bool) -> None:
    """Two layers, one token: layer 0's pre-attention oracle prefetch of layer 1's expert
    starts at t = 0 on the one copy engine. Layer 0's own expert misses at routing (H_A + A)
    and its demand copy queues behind the prefetch: it lands at 2D, where layer 0's kernel
    starts (stall_miss = 2D - (H_A + A + H_E); with sync the host part comes after the
    wait). Layer 1 routes to the prefetched expert, long landed: a hit."""
    tr = _two_layers(0, 1)
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "pre_attention",
           "lookahead": 1}
    got = _run(tr, pol, "own", engine, layers=2, sync=sync)
    layer0 = 2 * D + (H_E if sync else 0.0) + K_E
    layer1 = H_A + A + H_E + K_E
    assert got["misses"] == 1 and got["hits"] == 1 and got["late_hits"] == 0
    assert got["stall_miss_s"] == pytest.approx(
        2 * D - (H_A + A) - (0.0 if sync else H_E), rel=1e-12)
    assert got["total_time_s"] == pytest.approx(layer0 + layer1, rel=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sync", [False, True])
def test_prefetch_takes_a_free_engine_before_a_later_handed_demand_copy(
        engine: str, sync: bool) -> None:
    """Window 1, token 0 misses experts 0 and 1; its demand_issued oracle prefetch queues
    token 1's experts 2 and 3. The engine frees when expert 0's copy lands (routing + D);
    expert 1's copy is handed only after expert 0's kernel, so the prefetch of 2 takes the
    engine first and expert 1's copy queues behind it: it lands at routing + 3D. Token 0 is
    H_A + A + 3D + K_E (+ H_E with sync: expert 1's host part after the wait). Prefetch 3
    starts when expert 1's copy lands and, without sync, is still in flight when token 1
    routes (H_A + A + K_E later, < D): a late hit whose host part comes after expert 2's kernel,
    by when its copy (3D + D after token 0's routing) has landed, so token 1 is
    H_A + A + 2 (H_E + K_E) with no stall."""
    tr = _rows([[0, 1], [2, 3]])
    got = _run(tr, NEXT, "own", engine, sync=sync, capacity=6)
    token0 = H_A + A + 3 * D + (H_E if sync else 0.0) + K_E
    token1 = H_A + A + 2 * (H_E + K_E)
    assert got["prefetch_transfers"] == 2 and got["misses"] == 2
    late = 0 if sync else 1  # with sync, token 0 ends H_E later: H_A + A + H_E + K_E > D
    assert got["hits"] == 2 - late and got["late_hits"] == late
    assert got["total_time_s"] == pytest.approx(token0 + token1, rel=1e-12)
    assert got["stall_late_s"] == 0.0


def _kw(stream: str, window: int, sync: bool, swap: bool = True) -> dict[str, Any]:
    link = RuntimeLink(FixedLink(1e-4, 2e9), 1, 1e-5, 1.0, swap, 1.0, "compute", swap,
                       2e-5, window, sync, stream)
    comp = RuntimeCompute(FixedCompute(attention_s=2e-5, router_s=1e-6, expert_s=3e-5,
                                       shared_s=1e-5), 4, layer_s=1e-4, expert_s=2e-5)
    return dict(capacity=30, link=link, compute=comp, warmup_tokens=2)


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("sync", [False, True])
def test_without_prefetches_own_equals_compute(window: int, sync: bool) -> None:
    """Under fifo no demand copy is in flight during a kernel, so running the link on wall
    time changes no demand copy's timing: without prefetches ``own`` gives ``compute``'s
    results on the embedded trace (real routing, shared experts, swaps, host_s, warm-up),
    equal up to float rounding (the two clocks add the same spans in a different order),
    counts exactly; both engines agree."""
    from moesim.traces import load_trace
    from moesim.traces.collect.embedded import embedded_routing

    trace = load_trace(embedded_routing())
    own = equal_on_both_engines(trace, "lru", _kw("own", window, sync))
    cs = simulate(trace, "lru", **_kw("compute", window, sync)).summary
    assert own is not None
    for key, value in own.summary.items():
        if key in ("runtime",) or isinstance(value, str):
            continue
        if isinstance(value, float):
            assert value == pytest.approx(cs[key], rel=1e-9, abs=1e-15, nan_ok=True), key
        else:
            assert value == cs[key], key
    assert own.summary["stall_miss_s"] > 0 and own.summary["swap_copies"] > 0


@pytest.mark.parametrize("window", [1, 3])
def test_own_stream_prefetches_on_both_engines(window: int) -> None:
    """The embedded trace with an oracle pre-loader on its own stream: both engines give the
    same results, and pre-loading no longer costs time against no pre-loading."""
    from moesim.traces import load_trace
    from moesim.traces.collect.embedded import embedded_routing

    trace = load_trace(embedded_routing())
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "routed", "lookahead": 1}
    ref = equal_on_both_engines(trace, pol, _kw("own", window, True))
    assert ref is not None and ref.summary["prefetch_transfers"] > 0
    plain = simulate(trace, "lru", **_kw("own", window, True)).summary
    assert ref.summary["total_time_s"] < plain["total_time_s"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_engines_equal_with_prefetches_on_their_own_stream(seed: int) -> None:
    """The compiled engine's property (every covered policy, batching, partitions, copy
    engines, warm-up, resets) under fifo with prefetches on their own stream."""
    trace, policy, kw = _config(seed)
    kw["mode"] = "timed"
    kw["pin_layer"] = True
    rng = np.random.default_rng([seed, 7])
    kw["link"] = RuntimeLink(kw["link"], 1, float(rng.choice([0.0, 1e-5])), 1.0,
                             bool(rng.random() < 0.5), 1.0, "compute", bool(rng.random() < 0.3),
                             float(rng.choice([0.0, 2e-5])), int(rng.choice([1, 2, 3])),
                             bool(rng.random() < 0.5), "own")
    host = [0.0, 1e-5, 3e-4, 5e-3]
    kw["compute"] = RuntimeCompute(kw["compute"], len(trace.meta.moe_layers),
                                   layer_s=float(rng.choice(host)),
                                   expert_s=float(rng.choice(host)))
    equal_on_both_engines(trace, policy, kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_without_prefetches_own_equals_compute_property(seed: int) -> None:
    """The identity above on random traces, caches (global or per layer, reset per request),
    batches, copy engines, windows, sync, swaps and host times: with no prefetcher, ``own``
    and ``compute`` give the same counts and the same times up to float rounding."""
    trace, policy, kw = _config(seed)
    name = policy.get("eviction", policy["name"])
    policy = {k: v for k, v in policy.items() if k in ("prefetch_touch", "order")}
    policy["name"] = name
    kw["mode"] = "timed"
    kw["pin_layer"] = True
    rng = np.random.default_rng([seed, 9])
    args = (1, float(rng.choice([0.0, 1e-5])), 1.0, bool(rng.random() < 0.5), 1.0, "compute",
            bool(rng.random() < 0.3), float(rng.choice([0.0, 2e-5])), int(rng.choice([1, 2, 3])),
            bool(rng.random() < 0.5))
    host = [0.0, 1e-5, 3e-4, 5e-3]
    kw["compute"] = RuntimeCompute(kw["compute"], len(trace.meta.moe_layers),
                                   layer_s=float(rng.choice(host)),
                                   expert_s=float(rng.choice(host)))
    base = kw["link"]
    try:
        cs = simulate(trace, policy, engine="python",
                      **{**kw, "link": RuntimeLink(base, *args, "compute")}).summary
    except SimulationError:
        return
    own = simulate(trace, policy, engine="python",
                   **{**kw, "link": RuntimeLink(base, *args, "own")}).summary
    for key, value in cs.items():
        if isinstance(value, float):
            assert own[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
        else:
            assert own[key] == value, key


def test_records_of_an_own_stream_prefetch_are_on_the_wall_clock() -> None:
    """The late-expert fixture with transfer records: the pre-load runs from 0 to C on the
    wall clock (not paused by the attention kernel), and recording changes no metric."""
    c = 6e-3
    link = _link("own", copy_s=c)
    comp = RuntimeCompute(FixedCompute(attention_s=A, router_s=0.0, expert_s=K_E), layers=1,
                          layer_s=H_A, expert_s=H_E)
    tr = _trace([0])
    res = simulate(tr, PRE, capacity=2, link=link, compute=comp, record_transfers=True,
                   timeline_steps=1)
    (row,) = res.transfers.itertuples()
    assert row.start_s == 0.0 and row.end_s == pytest.approx(c, rel=1e-12)
    plain = simulate(tr, PRE, capacity=2, link=link, compute=comp).summary
    assert {k: v for k, v in res.summary.items() if k != "sim_engine"} == {
        k: v for k, v in plain.items() if k != "sim_engine"}
