"""Copy rules of runtime profiles (``sim.link.CopyRules``): copies on the compute stream pause
while GPU kernels run, and a swap copies an evicted expert back only when an install evicts.

Closed forms on one-layer fixtures, then both engines run for run under a runtime with
``stream: compute`` and ``swap`` (with and without prefetch, with a cache and per request).
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
from tests.sim.test_compiled_engine import _assert_same, _config, equal_on_both_engines

D = 4e-3  # one expert copy (latency only: bandwidth unbounded)
A = 1e-3  # attention kernel
H_A = 2e-3  # host time per layer (the runtime's overhead.layer_s)
K_E = 5e-4  # expert kernel
H_E = 1e-3  # host time per expert call (overhead.expert_s)


def _trace(experts: list[int], num_experts: int = 4) -> Trace:
    """One request, one MoE layer, one decode token per entry of ``experts`` (top-1)."""
    ex = np.array(experts, dtype=np.int16).reshape(-1, 1, 1)
    meta = TraceMeta(model="synthetic", moe_layers=(0,), num_experts=num_experts, top_k=1,
                     expert_bytes=1000)
    return Trace(meta, [RequestRouting(0, ex, np.full(len(experts), DECODE, np.uint8))])


def _models(stream: str, swap: bool = False, host: bool = True,
            always: bool = False, host_s: float = 0.0, copy_s: float = D,
            window: int = 0, sync: bool = False) -> tuple[Any, Any]:
    link = RuntimeLink(FixedLink(copy_s, math.inf), 1, 0.0, 1.0, swap, 1.0, stream, always,
                       host_s, window, sync)
    comp = RuntimeCompute(FixedCompute(attention_s=A, router_s=0.0, expert_s=K_E), layers=1,
                          layer_s=H_A if host else 0.0, expert_s=H_E if host else 0.0)
    return link, comp


def _run(tr: Trace, policy: Any, stream: str, engine: str, swap: bool = False,
         host: bool = True, always: bool = False, host_s: float = 0.0, copy_s: float = D,
         window: int = 0, sync: bool = False, **kw: Any) -> dict[str, Any]:
    link, comp = _models(stream, swap, host, always, host_s, copy_s, window, sync)
    kw.setdefault("capacity", 2)
    return simulate(tr, policy, link=link, compute=comp, engine=engine, **kw).summary


ENGINES = ["python", "compiled"]


@pytest.mark.parametrize("engine", ENGINES)
def test_one_miss_copy_runs_during_host_time_only(engine: str) -> None:
    """Attention (host, then kernel), routing, one demand copy: on the compute stream the
    copy starts at routing and runs during the expert call's host part, the kernel waits for
    the rest; on its own stream the copy overlaps nothing of the layer after routing either,
    but the expert's host part (``own``: laid out after the copy lands) does not overlap it."""
    tr = _trace([0])
    cs = _run(tr, "lru", "compute", engine)
    stall = D - H_E
    assert cs["stall_miss_s"] == pytest.approx(stall, rel=1e-12)
    assert cs["total_time_s"] == pytest.approx(H_A + A + H_E + stall + K_E, rel=1e-12)
    own = _run(tr, "lru", "own", engine)
    assert own["stall_miss_s"] == pytest.approx(D, rel=1e-12)
    assert own["total_time_s"] == pytest.approx(H_A + A + D + H_E + K_E, rel=1e-12)
    # the copy engine was busy D of the run's wall time either way
    assert cs["pcie_busy_fraction"] == pytest.approx(D / cs["total_time_s"], rel=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_prefetch_pauses_during_the_attention_kernel(engine: str) -> None:
    """An oracle prefetch of the layer's own expert issued at the pre-attention point (t=0):
    on the compute stream it runs during attention's host part, waits out its kernel, runs
    on during the expert's host part; on its own stream it runs through the kernel."""
    tr = _trace([0])
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "pre_attention",
           "lookahead": 0}
    cs = _run(tr, pol, "compute", engine)
    assert cs["late_hits"] == 1
    wait = D - H_A - H_E
    assert wait > 0
    assert cs["stall_late_s"] == pytest.approx(wait, rel=1e-12)
    assert cs["total_time_s"] == pytest.approx(H_A + A + H_E + wait + K_E, rel=1e-12)
    own = _run(tr, pol, "own", engine)
    assert own["stall_late_s"] == pytest.approx(D - H_A - A, rel=1e-12)
    assert own["total_time_s"] == pytest.approx(D + H_E + K_E, rel=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_without_host_time_copies_only_run_while_the_gpu_waits(engine: str) -> None:
    """A plain roofline is all kernel time: a prefetch issued before attention does not move
    during it, so the layer waits for the whole copy after attention."""
    tr = _trace([0])
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "pre_attention",
           "lookahead": 0}
    cs = _run(tr, pol, "compute", engine, host=False)
    assert cs["stall_late_s"] == pytest.approx(D, rel=1e-12)
    assert cs["total_time_s"] == pytest.approx(A + D + K_E, rel=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stream", ["compute", "own"])
def test_a_swap_is_one_copy_back_per_eviction(engine: str, stream: str) -> None:
    """Capacity 2 (one routed expert + one copy engine), four tokens on distinct experts:
    the first two fill free slots (no swap), the last two each evict one expert (one copy
    back each). On the compute stream each such load waits behind its copy back (D more of
    stall each); on its own stream the copy back costs nothing."""
    tr = _trace([0, 1, 2, 3])
    base = _run(tr, "lru", stream, engine, swap=False)
    sw = _run(tr, "lru", stream, engine, swap=True)
    assert base["evictions"] == sw["evictions"] == 2
    assert base["swap_copies"] == 0 and base["swap_copy_s"] == 0.0
    assert sw["swap_copies"] == 2
    assert sw["swap_copy_s"] == pytest.approx(2 * D, rel=1e-12)
    extra = 2 * D if stream == "compute" else 0.0
    assert sw["total_time_s"] - base["total_time_s"] == pytest.approx(extra, rel=1e-9)
    assert sw["stall_miss_s"] - base["stall_miss_s"] == pytest.approx(extra, rel=1e-9)


def _per_token() -> Trace:
    meta = TraceMeta(model="synthetic", moe_layers=(0,), num_experts=4, top_k=1,
                     expert_bytes=1000)
    reqs = [RequestRouting(r, np.array([[[e]]], np.int16), np.full(1, DECODE, np.uint8))
            for r, e in enumerate([0, 1, 2, 3])]
    return Trace(meta, reqs)


@pytest.mark.parametrize("engine", ENGINES)
def test_no_swap_without_eviction(engine: str) -> None:
    """A per-token cache (``reset_per_request``, every token its own request) loads into free
    slots: nothing is evicted, nothing is copied back, the swap costs nothing."""
    tr = _per_token()
    a = _run(tr, "lru", "compute", engine, swap=True, reset_per_request=True)
    b = _run(tr, "lru", "compute", engine, swap=False, reset_per_request=True)
    assert a["swap_copies"] == 0 and a["evictions"] == 0
    assert a["total_time_s"] == b["total_time_s"]


@pytest.mark.parametrize("engine", ENGINES)
def test_swap_always_copies_back_on_every_load(engine: str) -> None:
    """``swap: always`` (device slots always full): the same per-token run copies one expert
    back per load, each before its load on the compute stream (D more stall per token)."""
    tr = _per_token()
    a = _run(tr, "lru", "compute", engine, swap=True, always=True, reset_per_request=True)
    b = _run(tr, "lru", "compute", engine, swap=False, reset_per_request=True)
    assert a["evictions"] == 0 and a["swap_copies"] == 4
    assert a["swap_copy_s"] == pytest.approx(4 * D, rel=1e-12)
    assert a["total_time_s"] - b["total_time_s"] == pytest.approx(4 * D, rel=1e-9)


H_C = 7e-5  # the compute thread's work to issue one demand copy (copy.host_s)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stream", ["compute", "own"])
def test_host_s_adds_exactly_its_copies(engine: str, stream: str) -> None:
    """``copy.host_s`` is host time in series with the layer: with copies that take no link
    time (nothing to overlap), a run takes exactly ``demand copies x host_s`` longer, and the
    link's work is unchanged."""
    tr = _trace([0, 1, 0, 2, 3, 3, 1, 0])
    base = _run(tr, "lru", stream, engine, copy_s=0.0)
    paid = _run(tr, "lru", stream, engine, copy_s=0.0, host_s=H_C)
    n = paid["demand_fetches"]
    assert n == base["demand_fetches"] and 0 < n < 8  # some hits, so it is per copy
    assert paid["total_time_s"] - base["total_time_s"] == pytest.approx(n * H_C, rel=1e-9)
    assert paid["stall_time_s"] == base["stall_time_s"] == 0.0


@pytest.mark.parametrize("engine", ENGINES)
def test_host_s_overlaps_the_copy_on_the_compute_stream(engine: str) -> None:
    """One miss: issuing it is host time, so on the compute stream its copy runs meanwhile
    (the stall shrinks by host_s, the layer takes no longer); on its own stream the issue
    comes before the wait for the copy, which it shortens alike."""
    tr = _trace([0])
    for stream in ("compute", "own"):
        base = _run(tr, "lru", stream, engine)
        paid = _run(tr, "lru", stream, engine, host_s=H_C)
        assert paid["total_time_s"] == pytest.approx(base["total_time_s"], rel=1e-12)
        assert paid["stall_miss_s"] == pytest.approx(base["stall_miss_s"] - H_C, rel=1e-9)


def test_host_s_is_read_from_a_runtime() -> None:
    link = RuntimeLink(FixedLink(D, math.inf), 1, 0.0, 1.0, False, 1.0, "own", False, H_C)
    rules = copy_rules(link, 10)
    assert rules != CopyRules() and rules.host_s == H_C and not rules.compute_stream
    assert rules.issue_time(3) == 3 * H_C and rules.issue_time(0) == 0.0
    assert CopyRules().issue_time(5) == 0.0


def _rows(rows: list[list[int]], num_experts: int = 8) -> Trace:
    """One request, one MoE layer, one decode token per row (padded with -1 to the widest)."""
    top = max(len(r) for r in rows)
    ex = np.array([r + [-1] * (top - len(r)) for r in rows], dtype=np.int16).reshape(
        len(rows), 1, top)
    meta = TraceMeta(model="synthetic", moe_layers=(0,), num_experts=num_experts, top_k=top,
                     expert_bytes=1000)
    return Trace(meta, [RequestRouting(0, ex, np.full(len(rows), DECODE, np.uint8))])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("window", [0, 1, 2, 3, 5])
def test_fifo_hit_kernel_waits_for_the_window(engine: str, window: int) -> None:
    """``copy.order: fifo``. Token 0 loads expert 0; token 1 routes to 0 (a hit) and 1, 2, 3
    (misses, one copy engine). In issue order the stream holds the first W = min(window, 3)
    copies, the hit's kernel, the first loaded expert's kernel, the next copy, ... so the
    hit's kernel waits for W copies, and each later copy starts only after the kernel before
    it: the layer takes 3D + W x H_E + 4 K_E after routing (the window binds: a wider one
    exposes more host time), against 3D + 4 K_E when kernels wait only on their own copy
    (window 0, ``ready``)."""
    tr = _rows([[0], [0, 1, 2, 3]])
    got = _run(tr, "lru", "compute", engine, window=window, capacity=5)
    w = min(window, 3)
    token0 = H_A + A + D + K_E  # one miss: its host part runs beside its copy
    token1 = H_A + A + 3 * D + w * H_E + 4 * K_E
    assert got["total_time_s"] == pytest.approx(token0 + token1, rel=1e-12)
    busy = 2 * (H_A + A) + 5 * (H_E + K_E)  # host parts and kernels; the rest is waiting
    assert got["stall_miss_s"] == pytest.approx(token0 + token1 - busy, rel=1e-9)
    assert got["stall_late_s"] == 0.0 and got["hits"] == 1 and got["misses"] == 4


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("window", [1, 2, 3])
def test_sync_per_expert_serialises_copies_and_host_work(engine: str, window: int) -> None:
    """``copy.sync: expert`` (the host waits for the stream before each expert call's host
    work): the fixture of the test above, where now only the attention's host part may run
    beside a copy. Token 0: its one copy, then the expert's host part and kernel; token 1:
    the hit waits for the window, and every later copy is handed behind a kernel and waited
    for before the next host part, so the layer is 3D + 4 (H_E + K_E) after routing whatever
    the window."""
    tr = _rows([[0], [0, 1, 2, 3]])
    got = _run(tr, "lru", "compute", engine, window=window, sync=True, capacity=5)
    token0 = H_A + A + D + H_E + K_E
    token1 = H_A + A + 3 * D + 4 * (H_E + K_E)
    assert got["total_time_s"] == pytest.approx(token0 + token1, rel=1e-12)
    assert got["stall_miss_s"] == pytest.approx(4 * D, rel=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per_layer", [1, 2])
def test_fifo_window_bound_by_the_layer_s_device_experts(engine: str, per_layer: int) -> None:
    """``load_experts`` hands over at most as many copies as the layer keeps experts on the
    device (``len(main_infos)``). A per-layer cache of ``per_layer`` slots (staging buffers
    lend the rest of a step's need), token 1 = one hit and two misses, window 3: the hit's
    kernel waits for W = min(3, per_layer, 2) copies, and the layer takes 2D + W x H_E + 3 K_E
    after routing (the closed form of the test above with two misses)."""
    tr = _rows([[0], [0, 1, 2]])
    got = _run(tr, "lru", "compute", engine, window=3, capacity=per_layer,
               partition="per_layer", staging=4)
    token0 = H_A + A + D + K_E
    token1 = H_A + A + 2 * D + per_layer * H_E + 3 * K_E
    assert got["total_time_s"] == pytest.approx(token0 + token1, rel=1e-12)
    assert got["hits"] == 1 and got["misses"] == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_fifo_window_with_two_copy_engines(engine: str) -> None:
    """Three misses, two copy engines, window 1 or 2 (golden numbers by hand): with window 1
    every copy is handed behind the kernel before it, so they run one at a time (3D); with
    window 2 the first two run together, but the third, handed after the first kernel, holds
    the second kernel until it lands (2D + H_E); ``ready`` lets the second kernel run on its
    own copy (2D)."""
    tr = _rows([[1, 2, 3]])

    def run(window: int) -> float:
        link = RuntimeLink(FixedLink(D, math.inf, 2), 1, 0.0, 1.0, False, 1.0, "compute",
                           False, 0.0, window)
        comp = RuntimeCompute(FixedCompute(attention_s=A, router_s=0.0, expert_s=K_E),
                              layers=1, layer_s=H_A, expert_s=H_E)
        return simulate(tr, "lru", link=link, compute=comp, engine=engine,
                        capacity=5).summary["total_time_s"]

    base = H_A + A + 3 * K_E
    assert run(0) == pytest.approx(base + 2 * D, rel=1e-12)
    assert run(1) == pytest.approx(base + 3 * D, rel=1e-12)
    assert run(2) == pytest.approx(base + 2 * D + H_E, rel=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_fifo_hit_waits_for_a_started_prefetch(engine: str) -> None:
    """A prefetch counts as handed to the stream once it has started on the link: an oracle
    prefetch of the next token's expert, started at the end of token 0's layer, holds token
    1's resident expert's kernel until it lands (stall on prefetches: the layer has no demand
    copy), which ``ready`` does not."""
    tr = _rows([[0], [0], [1]])
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "demand_issued",
           "lookahead": 1}
    ready = _run(tr, pol, "compute", engine, capacity=5)
    fifo = _run(tr, pol, "compute", engine, capacity=5, window=1)
    assert fifo["stall_late_s"] > ready["stall_late_s"]
    assert fifo["total_time_s"] > ready["total_time_s"]
    assert fifo["prefetch_transfers"] == ready["prefetch_transfers"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_fifo_attention_kernel_waits_for_a_prefetch_in_flight(engine: str) -> None:
    """The pre-attention prefetch of the layer's own expert (started at t=0) was handed to the
    stream before the attention kernel: in issue order that kernel waits for it (D - H_A of
    stall on prefetches), after which the expert is resident (a hit); ``ready`` runs the
    attention kernel at once and waits on the copy as a late hit instead (H_E less)."""
    tr = _trace([0])
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "pre_attention",
           "lookahead": 0}
    fifo = _run(tr, pol, "compute", engine, window=1)
    assert fifo["hits"] == 1 and fifo["late_hits"] == 0
    assert fifo["stall_late_s"] == pytest.approx(D - H_A, rel=1e-12)
    assert fifo["total_time_s"] == pytest.approx(D + A + H_E + K_E, rel=1e-12)
    ready = _run(tr, pol, "compute", engine)
    assert ready["late_hits"] == 1
    assert ready["total_time_s"] == pytest.approx(D + A + K_E, rel=1e-12)


def test_copy_rules_of_a_plain_link_are_none() -> None:
    assert copy_rules(FixedLink(1e-5, 1e9), 1000) == CopyRules()
    rules = copy_rules(RuntimeLink(FixedLink(D, math.inf), 1, 0.0, 1.0, True, 1.0, "own"), 10)
    assert rules.swap and not rules.serial and rules.swap_s == D
    assert rules.load_time(D, True) == D  # own stream: the copy back costs the load nothing
    serial = copy_rules(RuntimeLink(FixedLink(D, math.inf), 1, 0.0, 1.0, True, 1.0,
                                    "compute"), 10)
    assert serial.load_time(D, True) == 2 * D and serial.load_time(D, False) == D


def test_records_on_the_wall_clock() -> None:
    """Transfer records and the timeline of a compute-stream run are in wall time: the one
    miss's copy is booked at routing (after the attention kernel) and lands where the expert's
    kernel starts; the run's metrics are those of the run without records."""
    link, comp = _models("compute")
    tr = _trace([0])
    res = simulate(tr, "lru", capacity=2, link=link, compute=comp, record_transfers=True,
                   timeline_steps=1)
    assert res.summary["sim_engine"] == "python"
    (row,) = res.transfers.itertuples()
    assert row.start_s == pytest.approx(H_A + A, rel=1e-12)
    assert row.end_s == pytest.approx(H_A + A + H_E + (D - H_E), rel=1e-12)
    spans = {e["name"]: (e["ts"] / 1e6, e["dur"] / 1e6) for e in res.timeline}
    assert spans["L0 e0"][0] == pytest.approx(H_A + A, rel=1e-12)
    assert sum(spans["L0 e0"]) == pytest.approx(res.summary["total_time_s"], rel=1e-12)
    plain = simulate(tr, "lru", capacity=2, link=link, compute=comp).summary
    assert {k: v for k, v in res.summary.items() if k != "sim_engine"} == {
        k: v for k, v in plain.items() if k != "sim_engine"}


def test_compute_stream_refuses_placements() -> None:
    link, comp = _models("compute")
    with pytest.raises(SimulationError, match="compute stream"):
        tr = _trace([0])
        req = tr.requests[0]
        scored = Trace(tr.meta, [RequestRouting(0, req.experts, req.phase,
                                                np.ones(req.experts.shape, np.float32))])
        simulate(scored, "lru", capacity=2, link=link, compute=comp,
                 placement="low_precision_fetch")


# -- both engines, run for run --------------------------------------------------------------
def _with_runtime(kw: dict[str, Any], rng: np.random.Generator, layers: int) -> None:
    """Wrap the drawn link and compute in a runtime: compute stream (mostly), swap (mostly),
    host overheads from none to larger than the copies, fifo or not, prefetches on the
    compute stream or on their own (``copy.prefetch_stream``, fifo only)."""
    stream = "compute" if rng.random() < 0.8 else "own"
    swap = bool(rng.random() < 0.8)
    kw["link"] = RuntimeLink(kw["link"], int(rng.integers(1, 4)),
                             float(rng.choice([0.0, 1e-5])), float(rng.choice([1.0, 0.5])),
                             swap, 1.0, stream, bool(rng.random() < 0.3),
                             float(rng.choice([0.0, 0.0, 2e-5, 1e-3])),
                             int(rng.choice([0, 0, 1, 2, 3])), bool(rng.random() < 0.5),
                             "own" if rng.random() < 0.4 else "compute")
    host = [0.0, 1e-5, 3e-4, 5e-3]
    kw["compute"] = RuntimeCompute(kw["compute"], layers,
                                   step_s=float(rng.choice(host)),
                                   layer_s=float(rng.choice(host)),
                                   expert_s=float(rng.choice(host)),
                                   expert_dequant_s=float(rng.choice([0.0, 1e-4])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_engines_equal_under_compute_stream_and_swap(seed: int) -> None:
    trace, policy, kw = _config(seed)
    kw["mode"] = "timed"
    kw["pin_layer"] = True
    rng = np.random.default_rng([seed, 5])
    _with_runtime(kw, rng, len(trace.meta.moe_layers))
    ref = equal_on_both_engines(trace, policy, kw)
    if ref is None:
        return
    s = ref.summary
    if not kw["link"].swap_always:
        assert s["swap_copies"] <= s["evictions"]
    swap_s = kw["link"].swap_time(trace.meta.expert_bytes)
    assert s["swap_copy_s"] == pytest.approx(s["swap_copies"] * swap_s, rel=1e-9, abs=1e-15)
    if not kw["link"].swap:
        assert s["swap_copies"] == 0


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("policy", ["lru", {"name": "oracle_prefetch", "eviction": "lru",
                                            "point": "routed", "lookahead": 1},
                                    {"name": "next_layer_all", "eviction": "lru"}])
def test_engines_equal_named_cases(policy: Any, reset: bool) -> None:
    """The published predictor's shapes: per-layer LRU with staging, prefetch or not, a
    cache kept across tokens or reset per request (cache none)."""
    from tests.helpers import random_trace

    tr = random_trace(num_requests=3, tokens=6, layers=3, experts=8, top_k=2, seed=11,
                      expert_bytes=2_000_000)
    link = RuntimeLink(FixedLink(5e-6, 12e9), 1, 1e-5, 1.0, True, 1.0, "compute")
    comp = RuntimeCompute(FixedCompute(attention_s=2e-4, expert_s=1e-4), 3, layer_s=5e-4,
                          expert_s=1e-4)
    kw = dict(capacity=6, partition="per_layer", link=link, compute=comp, staging=2,
              reset_per_request=reset, batch=1)
    ref = simulate(tr, policy, engine="python", **kw)
    _assert_same(ref, simulate(tr, policy, engine="compiled", **kw))
    if not reset:
        assert ref.summary["swap_copies"] > 0


@pytest.mark.parametrize("window", [0, 1, 3])
def test_every_copy_rule_on_the_embedded_trace(window: int) -> None:
    """The embedded trace (real routing, 4 layers, warm-up tokens) under a runtime with every
    copy rule (compute stream in issue order or not, swap always, host_s): both engines give
    the same results, and the window's waits only add time."""
    from moesim.traces import load_trace
    from moesim.traces.collect.embedded import embedded_routing

    trace = load_trace(embedded_routing())

    def kw(w: int) -> dict[str, Any]:
        link = RuntimeLink(FixedLink(1e-4, 2e9), 1, 1e-5, 1.0, True, 1.0, "compute", True,
                           H_C, w, w == 3)
        comp = RuntimeCompute(FixedCompute(attention_s=2e-5, router_s=1e-6, expert_s=3e-5,
                                           shared_s=1e-5), 4, layer_s=1e-4, expert_s=2e-5)
        return dict(capacity=30, link=link, compute=comp, warmup_tokens=2)

    ref = equal_on_both_engines(trace, "lru", kw(window))
    assert ref is not None and ref.summary["swap_copies"] > 0
    if window:
        ready = simulate(trace, "lru", **kw(0)).summary
        assert ref.summary["total_time_s"] > ready["total_time_s"]
        assert ref.summary["demand_fetches"] == ready["demand_fetches"]
