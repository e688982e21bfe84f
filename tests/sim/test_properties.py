"""Invariants that must hold for every policy, trace and cache size (hypothesis)."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies.base import EvictionPolicy
from moesim.policies.lru import LRU
from moesim.policies.registry import EVICTION, PREFETCH, discover, resolve
from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.cache import ExpertCache
from tests.helpers import random_trace
from tests.sim.parts import check_parts

discover()
EVICTIONS = sorted(EVICTION)
PREFETCHES = sorted(PREFETCH)

traces = st.builds(
    random_trace,
    num_requests=st.integers(1, 3),
    tokens=st.integers(1, 12),
    layers=st.integers(1, 4),
    experts=st.integers(4, 10),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    skew=st.floats(0.0, 2.0),
)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _perfect(trace):
    """A prediction table that is always right (for policies that replay predictions)."""
    return {r.request_id: r.experts for r in trace.requests}


def _timed(trace, policy, capacity, engines=1, bw=1e6, lat=1e-5, **kw):
    return simulate(
        trace, policy, capacity=capacity, mode="timed", predictions=_perfect(trace),
        link=FixedLink(lat, bw, engines),
        compute=FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4),
        **kw,
    )


def _min_capacity(trace, engines=1):
    return trace.meta.top_k + engines


def _layout(ev, trace, engines=1, extra=0, partition="global"):
    """(partition, capacity) that the eviction policy accepts, capped at every expert."""
    partition = EVICTION[ev].partition_required or partition
    layers = trace.meta.num_moe_layers
    per = _min_capacity(trace, engines)
    cap = per * (layers if partition == "per_layer" else 1) + extra
    return partition, min(cap, layers * trace.meta.num_experts)


@SETTINGS
@given(trace=traces, ev=st.sampled_from(EVICTIONS), pf=st.sampled_from(PREFETCHES),
       extra=st.integers(0, 20), engines=st.integers(1, 3),
       partition=st.sampled_from(["global", "per_layer"]))
def test_counts_add_up_and_stall_nonnegative(trace, ev, pf, extra, engines, partition):
    partition, cap = _layout(ev, trace, engines, extra, partition)
    name = pf if pf != "none" else ev
    res = _timed(trace, {"name": name, "eviction": ev, "prefetch": pf}, cap, engines,
                 partition=partition)
    s = res.summary
    check_parts(res)
    assert s["accesses"] == trace.num_rows * trace.meta.top_k
    assert s["stall_time_s"] >= 0
    assert s["stall_miss_s"] >= 0 and s["stall_late_s"] >= 0
    assert s["total_time_s"] >= s["stall_time_s"]
    assert 0 <= s["pcie_busy_fraction"] <= 1 + 1e-9
    assert math.isclose(res.per_layer["stall_time_s"].sum(), s["stall_time_s"], abs_tol=1e-12)
    if s["late_hits"] == 0:  # only a started prefetch can make the GPU wait "late"
        assert s["stall_late_s"] == 0


@SETTINGS
@given(trace=traces, ev=st.sampled_from(EVICTIONS), pf=st.sampled_from(PREFETCHES),
       extra=st.integers(0, 12), warmup=st.integers(0, 4), batch=st.integers(1, 3),
       mode=st.sampled_from(["timed", "zero_latency"]))
def test_metric_parts_add_up_with_warmup_and_batches(trace, ev, pf, extra, warmup, batch, mode):
    """Warm-up steps and batches are where attribution goes wrong: a prefetch started during
    warm-up and used or evicted later must not leak into the counted transfer totals."""
    partition, cap = _layout(ev, trace, extra=extra)
    if batch > 1:  # a batch's union of experts per layer must fit
        cap = min(cap * batch, trace.meta.num_moe_layers * trace.meta.num_experts)
    name = pf if pf != "none" else ev
    kw = {"mode": mode, "partition": partition, "warmup_tokens": warmup, "batch": batch,
          "predictions": _perfect(trace)}
    if mode == "timed":
        kw.update(link=FixedLink(1e-5, 1e6, 1), compute=FixedCompute(attention_s=1e-4,
                                                                      expert_s=1e-4))
    res = simulate(trace, {"name": name, "eviction": ev, "prefetch": pf}, capacity=cap, **kw)
    check_parts(res)


@SETTINGS
@given(trace=traces, pf=st.sampled_from(PREFETCHES), extra=st.integers(0, 10))
def test_metric_parts_add_up_with_a_fresh_cache_per_request(trace, pf, extra):
    """``reset_per_request`` discards a cache with prefetches still unused or in flight."""
    cap = min(_min_capacity(trace) + extra, trace.meta.num_moe_layers * trace.meta.num_experts)
    res = _timed(trace, {"name": pf if pf != "none" else "lru", "prefetch": pf}, cap,
                 reset_per_request=True, prefill="random")
    check_parts(res)


class _Checked(LRU):
    """LRU that asserts the cache never holds more than its capacity."""

    name = "checked_lru"
    cache: ExpertCache | None = None

    def on_insert(self, key, prefetch):
        super().on_insert(key, prefetch)
        assert len(self._order) <= self.setup.capacity


@SETTINGS
@given(trace=traces, extra=st.integers(0, 10), pf=st.sampled_from(PREFETCHES))
def test_occupancy_never_exceeds_capacity(trace, extra, pf):
    base = resolve({"name": "lru", "prefetch": pf})
    spec = type(base)("checked", _Checked, base.prefetch, {}, base.prefetch_params)
    cap = min(_min_capacity(trace) + extra, trace.meta.num_moe_layers * trace.meta.num_experts)
    _timed(trace, spec, cap)


@SETTINGS
@given(trace=traces, ev=st.sampled_from(EVICTIONS), pf=st.sampled_from(PREFETCHES))
def test_free_transfers_never_stall(trace, ev, pf):
    partition, cap = _layout(ev, trace, extra=2)
    name = pf if pf != "none" else ev
    res = _timed(trace, {"name": name, "eviction": ev, "prefetch": pf}, cap,
                 bw=float("inf"), lat=0.0, partition=partition)
    assert res.summary["stall_time_s"] == 0.0


@SETTINGS
@given(trace=traces, ev=st.sampled_from(EVICTIONS))
def test_full_capacity_only_compulsory_misses(trace, ev):
    total = trace.meta.num_moe_layers * trace.meta.num_experts
    res = _timed(trace, ev, total, partition=EVICTION[ev].partition_required or "global")
    distinct = {
        (j, int(e)) for r in trace.requests for j in range(trace.meta.num_moe_layers)
        for e in r.experts[:, j, :].ravel() if e >= 0
    }
    if EVICTION[ev].prefills:  # pre-installs experts, so may miss less than compulsory
        assert res.summary["misses"] <= len(distinct)
    else:
        assert res.summary["misses"] == len(distinct)


@SETTINGS
@given(trace=traces, extra=st.integers(0, 12), partition=st.sampled_from(["global", "per_layer"]))
def test_belady_is_a_lower_bound_on_misses(trace, extra, partition):
    layers = trace.meta.num_moe_layers
    per = trace.meta.top_k + 1
    cap = min(per * (layers if partition == "per_layer" else 1) + extra,
              layers * trace.meta.num_experts)
    misses = {
        ev: simulate(trace, ev, capacity=cap, mode="zero_latency",
                     partition=partition).summary["misses"]
        for ev in EVICTIONS
        if not EVICTION[ev].prefills  # pre-filled: not a demand-only stream
    }
    assert misses["belady"] == min(misses.values()), misses


@SETTINGS
@given(trace=traces, ev=st.sampled_from(EVICTIONS), pf=st.sampled_from(PREFETCHES),
       extra=st.integers(0, 8))
def test_zero_latency_equals_timed_with_free_transfers(trace, ev, pf, extra):
    partition, cap = _layout(ev, trace, extra=extra)
    name = pf if pf != "none" else ev
    policy = {"name": name, "eviction": ev, "prefetch": pf}
    zl = simulate(trace, policy, capacity=cap, mode="zero_latency", partition=partition,
                  predictions=_perfect(trace)).summary
    timed = simulate(trace, policy, capacity=cap, mode="timed", link=FixedLink(0.0),
                     compute=FixedCompute(), partition=partition,
                     predictions=_perfect(trace)).summary
    for key in ("hits", "late_hits", "promoted", "misses", "evictions", "prefetch_transfers",
                "prefetch_useful", "prefetch_wasted"):
        assert zl[key] == timed[key], key


def test_every_registered_policy_is_covered():
    assert {"lru", "lfu", "fifo", "least_stale", "static", "belady"} <= set(EVICTIONS)
    assert {"none", "next_layer_all", "oracle_prefetch"} <= set(PREFETCHES)
    assert all(issubclass(EVICTION[n], EvictionPolicy) for n in EVICTIONS)
