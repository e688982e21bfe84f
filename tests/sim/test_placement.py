"""Placement policies (issue 17): invariants over random traces, equalities with plain fetching,
and a closed-form timing of CPU-executed misses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.sim import FixedCompute, FixedHostCpu, FixedLink, HostSide, simulate
from moesim.sim.cache import SimulationError
from moesim.sim.workload import WorkloadError
from tests.helpers import random_trace, trace_from_lists

EXPERT_BYTES = 1000
BITS = 4
HOST = HostSide(FixedHostCpu(call_s=2e-4, per_token_s=5e-5, parallel=1), activation_bytes=64,
                dtype_bits=16)
LINK = FixedLink(1e-5, 1e6, 1)  # 1 ms per expert copy
COMPUTE = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4)
PLACEMENTS = ["fetch", "cpu_on_miss", "fetch_or_cpu", "static_cpu", "low_precision_fetch",
              "skip_low_weight", "cpu_layers"]
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=12)  # the tests that run three or four simulations


def with_scores(trace, seed: int, low: float = 0.05):
    """Router weights in [low, 1) for every recorded expert (normalised by the workload)."""
    rng = np.random.default_rng(seed)
    for r in trace.requests:
        r.scores = rng.uniform(low, 1.0, size=r.experts.shape).astype(np.float32)
    return trace


traces = st.builds(
    lambda n, t, layers, e, k, seed, skew: with_scores(
        random_trace(num_requests=n, tokens=t, layers=layers, experts=e, top_k=k, seed=seed,
                     skew=skew, expert_bytes=EXPERT_BYTES), seed),
    st.integers(1, 3), st.integers(1, 10), st.integers(1, 4), st.integers(4, 10),
    st.integers(1, 3), st.integers(0, 10_000), st.floats(0.0, 2.0),
)


def _run(trace, placement, mode="timed", policy="lru", capacity=None, **kw):
    meta = trace.meta
    batch = kw.get("batch", 1)
    if capacity is None:
        capacity = min((meta.top_k * batch + 1) * 2, meta.num_moe_layers * meta.num_experts)
    timing = {"link": LINK, "compute": COMPUTE} if mode == "timed" else {}
    return simulate(trace, policy, capacity=capacity, mode=mode, placement=placement,
                    host=kw.pop("host", HOST), **timing, **kw)


def _same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for key, x in a.items():
        if key in skip:
            continue
        y = b[key]
        if isinstance(x, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            bad.append(f"{key}: {x} != {y}")
    return bad


def check_placement_parts(s: dict) -> None:
    """Every access is one residency kind; every miss is served exactly one way; the gate
    mass splits into full, low precision and skipped."""
    assert s["hits"] + s["late_hits"] + s["promoted"] + s["misses"] == s["accesses"]
    served = (s["demand_fetches"] + s["cpu_expert_execs"] + s["low_precision_fetches"]
              + s["skipped_experts"])
    assert served == s["misses"] + s["promoted"], s
    assert s["low_precision_bytes"] == s["low_precision_fetches"] * EXPERT_BYTES * BITS // 16
    if s["accesses"]:
        parts = (s["gate_mass_full"], s["gate_mass_low_precision"], s["gate_mass_skipped"])
        assert math.isclose(sum(parts), 1.0, abs_tol=1e-9), parts
        assert all(-1e-9 <= p <= 1 + 1e-9 for p in parts), parts
    busy = s["cpu_busy_fraction"]
    assert math.isnan(busy) or 0.0 <= busy <= 1 + 1e-9


@SETTINGS
@given(trace=traces, placement=st.sampled_from(PLACEMENTS),
       mode=st.sampled_from(["timed", "zero_latency"]), batch=st.integers(1, 3),
       warmup=st.integers(0, 3), pf=st.sampled_from(["none", "next_layer_all"]),
       threshold=st.floats(0.0, 1.0))
def test_counts_and_gate_mass_add_up(trace, placement, mode, batch, warmup, pf, threshold):
    if placement == "fetch_or_cpu" and mode != "timed":
        mode = "timed"  # decides from times: refused in zero-latency runs (tested below)
    spec: dict = {"name": placement}
    if placement in ("low_precision_fetch", "skip_low_weight"):
        spec["threshold"] = threshold
    if placement == "static_cpu":
        spec["layers"] = int(threshold * trace.meta.num_moe_layers)
    if placement == "cpu_layers":
        spec["gpu_layers"] = int(threshold * trace.meta.num_moe_layers)
    policy = {"name": "lru", "prefetch": pf}
    res = _run(trace, spec, mode, policy=policy, batch=batch, warmup_tokens=warmup)
    s = res.summary
    check_placement_parts(s)
    if mode == "timed":
        assert s["stall_time_s"] >= 0 and s["stall_cpu_s"] >= 0
        assert math.isclose(s["stall_time_s"],
                            s["stall_miss_s"] + s["stall_late_s"] + s["stall_cpu_s"])
        assert math.isclose(res.per_layer["stall_time_s"].sum(), s["stall_time_s"],
                            abs_tol=1e-12)
        assert s["total_time_s"] >= s["stall_time_s"] - 1e-12
    assert s["sim_engine"] == ("compiled" if placement in ("fetch", "cpu_layers") else "python")


@SETTINGS
@given(trace=traces, mode=st.sampled_from(["timed", "zero_latency"]))
def test_cpu_on_miss_moves_no_expert_bytes(trace, mode):
    s = _run(trace, "cpu_on_miss", mode).summary
    assert s["demand_bytes"] == s["prefetch_bytes"] == s["low_precision_bytes"] == 0
    assert s["hits"] == 0  # nothing is ever cached without prefetching
    assert s["cpu_expert_execs"] == s["misses"] == s["accesses"]
    assert s["gate_mass_full"] == 1.0


@FEW
@given(trace=traces, mode=st.sampled_from(["timed", "zero_latency"]),
       ev=st.sampled_from(["lru", "fifo", "belady"]),
       pf=st.sampled_from(["none", "next_layer_all", "oracle_prefetch"]))
def test_fetch_placement_is_todays_run(trace, mode, ev, pf):
    """placement=fetch gives exactly the results of a run without the option, on both
    engines."""
    policy = {"name": ev, "prefetch": pf}
    for engine in ("auto", "python"):
        timing = {"link": LINK, "compute": COMPUTE} if mode == "timed" else {}
        cap = min(2 * trace.meta.top_k + 2, trace.meta.num_moe_layers * trace.meta.num_experts)
        base = simulate(trace, policy, capacity=cap, mode=mode, engine=engine, **timing)
        placed = simulate(trace, policy, capacity=cap, mode=mode, engine=engine,
                          placement="fetch", **timing)
        assert _same(base.summary, placed.summary) == []
        assert base.per_layer.equals(placed.per_layer)


@SETTINGS
@given(trace=traces, mode=st.sampled_from(["timed", "zero_latency"]),
       name=st.sampled_from(["skip_low_weight", "low_precision_fetch"]))
def test_threshold_zero_is_fetch(trace, mode, name):
    """No weight is below 0: nothing is skipped or approximated."""
    ref = _run(trace, "fetch", mode, engine="python").summary
    got = _run(trace, {"name": name, "threshold": 0.0}, mode).summary
    assert _same(ref, got, skip=("placement",)) == []


@SETTINGS
@given(trace=traces, mode=st.sampled_from(["timed", "zero_latency"]))
def test_low_precision_threshold_one_copies_every_miss_in_bits(trace, mode):
    """Every normalised weight is below 1 when a token has two or more experts with positive
    weights, so every miss is a low-precision copy of bytes * bits / 16 and none is cached."""
    if trace.meta.top_k < 2:
        trace = with_scores(random_trace(tokens=6, layers=2, experts=6, top_k=2, seed=3,
                                         expert_bytes=EXPERT_BYTES), 3)
    s = _run(trace, {"name": "low_precision_fetch", "threshold": 1.0, "bits": BITS},
             mode).summary
    assert s["demand_fetches"] == 0 and s["hits"] == 0
    assert s["low_precision_fetches"] == s["misses"] == s["accesses"]
    assert s["low_precision_bytes"] == s["accesses"] * EXPERT_BYTES * BITS // 16
    assert s["gate_mass_low_precision"] == pytest.approx(1.0)
    if mode == "timed":  # the link carried exactly those copies
        busy = s["pcie_busy_fraction"] * s["total_time_s"]
        assert busy == pytest.approx(s["accesses"] * LINK.transfer_time(EXPERT_BYTES * BITS // 16))


# fetch_or_cpu against the two pure strategies. Tolerance 0: on a demand-only trace every
# choice it makes is the cheaper of the two for that expert given the same queues, and what it
# fetches is cached exactly as fetch would cache it. It is not a theorem (a CPU choice leaves
# the cache, and so later hits, different from fetch's), so the bound checked is the one the
# issue states: never slower than *both*, with a relative slack of 1e-9 for float sums only.
@FEW
@given(trace=traces, cpu_s=st.sampled_from([1e-4, 5e-4, 1e-3, 3e-3]),
       bw=st.sampled_from([2e5, 1e6, 1e7]), parallel=st.integers(1, 2))
def test_fetch_or_cpu_is_never_slower_than_both(trace, cpu_s, bw, parallel):
    host = HostSide(FixedHostCpu(call_s=cpu_s, per_token_s=1e-5, parallel=parallel), 64, 16)
    link = FixedLink(1e-5, bw, 1)
    times = {}
    for name in ("fetch", "cpu_on_miss", "fetch_or_cpu"):
        times[name] = simulate(trace, "lru", capacity=min(2 * trace.meta.top_k + 2,
                                                          trace.meta.num_moe_layers
                                                          * trace.meta.num_experts),
                               link=link, compute=COMPUTE, placement=name,
                               host=host).summary["total_time_s"]
    assert times["fetch_or_cpu"] <= max(times["fetch"], times["cpu_on_miss"]) * (1 + 1e-9)


@SETTINGS
@given(trace=traces, layers=st.integers(0, 4), pf=st.sampled_from(["none", "next_layer_all"]))
def test_static_cpu_layers_never_cached(trace, layers, pf):
    n = min(layers, trace.meta.num_moe_layers)
    res = _run(trace, {"name": "static_cpu", "layers": n}, "timed",
               policy={"name": "lru", "prefetch": pf}, prefill="random")
    pl = res.per_layer
    cpu = pl[pl["layer"] < n]
    assert (cpu["hits"] + cpu["late_hits"]).sum() == 0
    assert res.summary["cpu_expert_execs"] == cpu["accesses"].sum()


def test_closed_form_one_cpu_miss() -> None:
    """One token, one layer, top-1, empty cache: attention + router, then the activations go
    host-ward, the CPU computes, the output comes back; the GPU's shared expert overlaps."""
    trace = trace_from_lists([[[[2]]]], experts=4, expert_bytes=EXPERT_BYTES)
    lat, bw, act = 1e-5, 1e6, 64
    cpu = FixedHostCpu(call_s=7e-4, per_token_s=1e-4)
    host = HostSide(cpu, activation_bytes=act, dtype_bits=16)
    comp = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4)
    s = simulate(trace, "lru", capacity=2, link=FixedLink(lat, bw, 1), compute=comp,
                 placement="cpu_on_miss", host=host).summary
    copy = lat + act / bw
    routed = 1e-3 + 1e-4
    cpu_end = routed + copy + 8e-4
    assert s["total_time_s"] == pytest.approx(cpu_end + copy)
    # the GPU finished its shared expert at routed + 1e-4 and waited for the rest
    assert s["stall_cpu_s"] == pytest.approx(cpu_end + copy - (routed + 1e-4))
    assert s["cpu_busy_fraction"] == pytest.approx(8e-4 / (cpu_end + copy))
    assert s["demand_bytes"] == 0 and s["cpu_expert_execs"] == 1


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_closed_form_cpu_lanes_and_return_copies(parallel: int) -> None:
    """Top-3 misses on the CPU: one activation copy host-ward, the experts on ``parallel``
    lanes in access order, each output copied back over the one copy engine when its expert
    finishes (queueing behind the others' outputs)."""
    trace = trace_from_lists([[[[0, 1, 2]]]], experts=6, expert_bytes=EXPERT_BYTES)
    lat, bw, act, c = 1e-5, 1e6, 64, 5e-4
    copy = lat + act / bw
    comp = FixedCompute(attention_s=1e-3, expert_s=3e-4)
    host = HostSide(FixedHostCpu(call_s=c, parallel=parallel), act, 16)
    s = simulate(trace, "lru", capacity=4, link=FixedLink(lat, bw, 1), compute=comp,
                 placement="cpu_on_miss", host=host).summary
    start = 1e-3 + copy
    ends = {1: [start + c, start + 2 * c, start + 3 * c],
            2: [start + c, start + c, start + 2 * c],
            3: [start + c] * 3}[parallel]
    link_free = 0.0
    for e in sorted(ends):  # returns in the order the CPU finishes, one engine
        link_free = max(link_free, e) + copy
    assert s["total_time_s"] == pytest.approx(link_free)
    assert s["cpu_busy_fraction"] == pytest.approx(3 * c / (link_free * parallel))


def test_placement_runs_on_the_python_engine() -> None:
    trace = with_scores(random_trace(tokens=5, layers=2, experts=6, top_k=2, seed=1), 1)
    s = _run(trace, "cpu_on_miss").summary
    assert s["sim_engine"] == "python"
    with pytest.raises(SimulationError, match="placement 'cpu_on_miss' has no compiled twin"):
        _run(trace, "cpu_on_miss", engine="compiled")


def test_refusals() -> None:
    trace = random_trace(tokens=5, layers=2, experts=6, top_k=2, seed=1)  # no router weights
    for name in ("skip_low_weight", "low_precision_fetch"):
        with pytest.raises(WorkloadError, match=f"placement '{name}' needs router weights"):
            _run(trace, name)
    with pytest.raises(SimulationError, match="needs mode=timed"):
        _run(trace, "fetch_or_cpu", "zero_latency")
    with pytest.raises(SimulationError, match="no host_cpu section"):
        _run(trace, "cpu_on_miss", host=HostSide(why_no_cpu="hw profile 'x' has no host_cpu "
                                                                    "section"))
    # zero-latency runs need no CPU model
    assert _run(trace, "cpu_on_miss", "zero_latency", host=None).summary["cpu_expert_execs"]


def test_gate_mass_of_a_batch_is_per_token() -> None:
    """Two requests decoded together route to the same expert with different weights: the
    key's gate mass is the sum, the skip decision uses the larger weight."""
    trace = trace_from_lists([[[[0, 1]]], [[[0, 2]]]], experts=4, expert_bytes=EXPERT_BYTES)
    trace.requests[0].scores = np.array([[[0.9, 0.1]]], dtype=np.float32)
    trace.requests[1].scores = np.array([[[0.3, 0.7]]], dtype=np.float32)
    s = simulate(trace, "lru", capacity=4, mode="zero_latency", batch=2,
                 placement={"name": "skip_low_weight", "threshold": 0.2}).summary
    # expert 0: weights 0.9 and 0.3 (kept); 1: 0.1 (skipped); 2: 0.7 (kept)
    assert s["skipped_experts"] == 1
    assert s["gate_mass_skipped"] == pytest.approx(0.1 / 2.0)


def test_cpu_crossover_tokens_closed_form() -> None:
    """CPU: 1 ms + 0.1 ms per token; activations 1e-5 s + n * 64 B at 1 MB/s each way; copy
    1e-5 + 1000 B / 1 MB/s = 1.01 ms; GPU 0.3 ms: the CPU loses from the first n with
    1e-3 + 1e-4 n + 2 (1e-5 + 6.4e-5 n) >= 1.31e-3, i.e. n >= 0.29e-3 / 2.28e-4 = 1.27."""
    from moesim.sim.hardware import cpu_crossover_tokens

    cpu = FixedHostCpu(call_s=1e-3, per_token_s=1e-4)
    assert cpu_crossover_tokens(LINK, COMPUTE, cpu, EXPERT_BYTES, 64) == 2
    assert cpu_crossover_tokens(LINK, COMPUTE, FixedHostCpu(call_s=1e-6), EXPERT_BYTES, 0,
                                limit=50) is None


def test_cpu_cost_waits_for_the_booked_copies() -> None:
    """``ctx.cpu_cost`` is when the expert's output is back on the GPU: the output copy waits
    behind the weight copy the layer booked before it (it used to be priced as if the link
    were idle, so a cost rule saw the CPU cheaper than it was)."""
    from moesim.policies.base import CPU, FETCH, PlacementPolicy
    from moesim.policies.registry import PlacementSpec

    seen: list[float] = []

    class FetchThenCpu(PlacementPolicy):
        name = "fetch_then_cpu"
        uses_cpu = True

        def decide(self, ctx, key, weight, tokens):
            if key % 4 == 0:
                return FETCH
            seen.append(ctx.cpu_cost(tokens))
            return CPU

    trace = trace_from_lists([[[[0, 1]]]], experts=4, expert_bytes=EXPERT_BYTES)
    lat, bw, act = 1e-5, 1e6, 64
    host = HostSide(FixedHostCpu(call_s=1e-4), activation_bytes=act, dtype_bits=16)
    comp = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=1e-5)
    s = simulate(trace, "lru", capacity=3, link=FixedLink(lat, bw, 1), compute=comp,
                 placement=PlacementSpec("fetch_then_cpu", FetchThenCpu), host=host).summary
    act_copy = lat + act / bw
    weights_land = lat + EXPERT_BYTES / bw  # from routing, on the one copy engine
    assert seen == [pytest.approx(weights_land + act_copy)]  # not 1e-4 + 2 act_copy
    # the GPU computed the fetched expert before the CPU's output came back: the layer ends
    # when that output arrives, exactly the cost the placement was shown
    assert s["stall_cpu_s"] > 0
    assert s["total_time_s"] == pytest.approx(1e-3 + 1e-4 + seen[0])


@pytest.mark.parametrize("placement", ["fetch", "cpu_on_miss"])
def test_transfers_table_has_every_copy(placement: str) -> None:
    """One row per copy, the last layer's too: nothing advanced the link after the last
    layer, so its copies (and a CPU expert's output copies) were missing from
    transfers.parquet and the Chrome trace."""
    trace = trace_from_lists([[[[0, 1], [2, 3]]]], experts=4, expert_bytes=EXPERT_BYTES)
    res = simulate(trace, "lru", capacity=4, link=LINK, compute=COMPUTE, placement=placement,
                   host=HOST, record_transfers=True, timeline_steps=1, engine="python")
    s, t = res.summary, res.transfers
    kinds = t["kind"].value_counts().to_dict()
    assert kinds.get("demand", 0) == s["demand_fetches"]
    assert kinds.get("activation", 0) == s["cpu_expert_execs"]  # outputs back, one each
    assert len(t) == s["demand_fetches"] + s["cpu_expert_execs"] == 4
    assert t["end_s"].max() <= s["total_time_s"] + 1e-12
    link_events = [e for e in res.timeline if e["tid"] == "host link"]
    assert len(link_events) == 4
