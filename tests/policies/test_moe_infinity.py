"""MoE-Infinity policies: EAMC matching, decayed priority, queue flushes, visit-count eviction."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from moesim.policies.base import ModelShape, PolicyError, PolicySetup
from moesim.policies.moe_infinity import (
    EAMC,
    MoEInfinity,
    MoEInfinityLFU,
    MoEInfinityPriority,
    ordered_keys,
    priority,
)
from moesim.policies.registry import default_config, resolve
from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.traces.store import write_trace
from tests.helpers import trace_from_lists

# -- fixtures ----------------------------------------------------------------------------------


def _shape(layers=4, experts=4, k=1):
    return ModelShape(layers, experts, k, 1000)


def _setup(shape, params=None, peers=None, capacity=4, layer=0):
    params = dict(params or {})
    if peers is not None:
        params["_peers"] = peers
    clock = SimpleNamespace(now=0.0, step=0, layer=layer, position=0, counting=True)
    return PolicySetup(shape, capacity, clock, np.random.default_rng(0), params=params)


class FakeCtx:
    """Records what a prefetch policy asks for."""

    def __init__(self, shape, resident=(), requests=(0,)):
        self.shape = shape
        self.clock = SimpleNamespace(now=0.0, step=0, layer=0, position=0, counting=True)
        self.resident = set(resident)
        self.requests = list(requests)
        self.queued: list[list[int]] = []
        self.cancels = 0

    def prefetch(self, keys, priority=None):
        self.queued.append(list(keys))
        return len(self.queued[-1])

    def cancel_prefetches(self, keys=None):
        self.cancels += 1
        return 0

    def is_resident(self, key):
        return key in self.resident

    def is_loading(self, key):
        return False

    @property
    def request_ids(self):
        return self.requests


def _reference_distances(stored, matrix, layer, mask=True, empty_rows_zero=False):
    """``ExpertTracer.find_most_similar`` as written (numpy for torch); ``empty_rows_zero``:
    our deviation, an all-zero stored row gives cosine 0 instead of NaN."""
    c = stored.astype(float).copy()
    if mask:
        c[:, : layer + 1, :] = 1e-9
    with np.errstate(invalid="ignore", divide="ignore"):
        c = c / c.sum(axis=2, keepdims=True)
        if empty_rows_zero:
            c = np.nan_to_num(c)
        m = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    dot = (c * m[None]).sum(axis=2)
    norms = np.maximum(np.linalg.norm(c, axis=2) * np.linalg.norm(m, axis=1)[None], 1e-6)
    return 1 - (dot / norms).mean(axis=1)


def _eamc_with(stored, mask=True):
    eamc = EAMC(10, stored.shape[1], stored.shape[2], mask)
    for eam in stored:
        eamc.add(eam)
    return eamc


def _observe(eamc, req, matrix):
    for layer, row in enumerate(matrix):
        for _ in range(int(row.max())):
            eamc.observe(req, layer, np.flatnonzero(row > 0))
            row = np.maximum(row - 1, 0)


# -- matching ----------------------------------------------------------------------------------

# B matches the layers already seen (0..1), A the later layers (2..3).
EAM_B = np.array([[0, 0, 3, 0], [0, 0, 0, 3], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=float)
EAM_A = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 4, 0], [0, 0, 0, 4]], dtype=float)
CURRENT = np.array([[0, 0, 3, 0], [0, 0, 0, 3], [0, 0, 2, 0], [0, 0, 0, 2]], dtype=float)


def test_matcher_picks_the_eam_that_shares_future_layers():
    eamc = _eamc_with(np.stack([EAM_B, EAM_A]))
    req = eamc.new_request()
    _observe(eamc, req, CURRENT.copy())
    assert np.array_equal(req.eam, CURRENT)
    assert eamc.match(req, 1) == 1  # A: rows 0..1 are masked, 2..3 decide
    assert list(eamc.access[:2]) == [1, 2]  # stored with 1, +1 per match


def test_unmasked_matcher_uses_observed_layers():
    eamc = _eamc_with(np.stack([EAM_B, EAM_A]), mask=False)
    req = eamc.new_request()
    _observe(eamc, req, CURRENT.copy())
    assert eamc.match(req, 1) == 0


@pytest.mark.parametrize("mask", [True, False])
def test_distances_equal_the_code_rule(mask):
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4, size=(7, 5, 6)).astype(float)
    stored[2, 4] = 0  # an empty stored row: NaN in the code, cosine 0 here
    eamc = _eamc_with(stored, mask)
    req = eamc.new_request()
    current = rng.integers(0, 3, size=(5, 6)).astype(float)
    current[3] = 0  # a layer not seen yet
    _observe(eamc, req, current.copy())
    for layer in range(5):
        ref = _reference_distances(stored, current, layer, mask)
        got = eamc.distances(req, layer)
        ok = np.isfinite(ref)
        assert ok.sum() >= 6 and (ok[2] or (layer < 4 or not mask))
        np.testing.assert_allclose(got[ok], ref[ok], atol=1e-12)
        ours = _reference_distances(stored, current, layer, mask, empty_rows_zero=True)
        np.testing.assert_allclose(got, ours, atol=1e-12)


def test_eamc_replaces_the_least_accessed_non_persistent_slot():
    eamc = EAMC(3, 2, 2)
    eamc.add(np.ones((2, 2)), persistent=True)
    eamc.add(np.eye(2))
    eamc.add(np.eye(2)[::-1].copy())
    eamc.access[1] = 5
    assert eamc.add(np.full((2, 2), 2.0)) == 2  # slot 0 is persistent, slot 1 accessed more
    assert eamc.access[2] == 1 and eamc.access[0] == 0
    assert eamc.add(np.zeros((2, 2))) is None  # an empty EAM is never stored


# -- priority and queue ------------------------------------------------------------------------


def test_priority_is_the_decayed_formula():
    eam = np.array([[1, 2], [3, 0], [0, 5]], dtype=float)
    p = priority(eam, 1)
    expect = np.array([[0, 0], [3 + 1e-8, 1e-8], [(0 + 1e-8) * 0.75, (5 + 1e-8) * 0.75]])
    np.testing.assert_allclose(p, expect, rtol=1e-12, atol=0)
    # keys = layer * 2 + expert; by score descending, ties by lower key
    assert ordered_keys(p, 1).tolist() == [5, 2, 3, 4]


def test_prefetcher_queues_the_priority_order_and_flushes_each_time():
    shape = _shape(3, 2)
    pf = MoEInfinity(_setup(shape, capacity=6))
    pf.eamc.add(np.array([[1, 2], [3, 0], [0, 5]], dtype=float))
    ctx = FakeCtx(shape)
    pf.on_request_start(ctx, 0)
    pf.on_routed(ctx, 1, [3])
    pf.on_demand_issued(ctx, 1, [3])
    assert ctx.queued == [[5, 2, 3, 4]] and ctx.cancels == 1
    pf.on_routed(ctx, 2, [4])
    pf.on_demand_issued(ctx, 2, [4])
    assert ctx.cancels == 2 and ctx.queued[-1] == [5, 4]


def test_horizon_and_width_trim_the_list():
    shape = _shape(4, 3)
    eam = np.array([[1, 2, 3], [3, 0, 1], [0, 5, 2], [7, 1, 1]], dtype=float)
    ctx = FakeCtx(shape)
    pf = MoEInfinity(_setup(shape, {"horizon": 1, "prefetch_width": 1}, capacity=12))
    pf.eamc.add(eam)
    pf.on_request_start(ctx, 0)
    pf.on_demand_issued(ctx, 1, [])
    assert ctx.queued == [[7, 3]]  # layer 2 top-1 (5 * 0.8 = 4), then layer 1 top-1 (3)


def test_no_prediction_with_an_empty_eamc_and_bad_params_rejected():
    shape = _shape()
    pf = MoEInfinity(_setup(shape))
    ctx = FakeCtx(shape)
    pf.on_request_start(ctx, 0)
    pf.on_routed(ctx, 0, [1])
    pf.on_demand_issued(ctx, 0, [1])
    assert ctx.queued == [] and ctx.cancels == 0
    with pytest.raises(PolicyError):
        MoEInfinity(_setup(shape, {"horizon": "far"}))
    with pytest.raises(PolicyError):
        MoEInfinityLFU(_setup(shape, {"order": "median"}))


def test_finished_requests_fill_the_eamc_online():
    shape = _shape(2, 2)
    pf = MoEInfinity(_setup(shape))
    ctx = FakeCtx(shape, requests=[0])
    pf.on_request_start(ctx, 0)
    pf.on_routed(ctx, 0, [1])
    pf.on_routed(ctx, 1, [2])
    assert pf.eamc.filled == 0
    ctx.requests = [1]
    pf.on_request_start(ctx, 1)
    assert pf.eamc.filled == 1
    np.testing.assert_array_equal(pf.eamc.eams[0], [[0, 1], [1, 0]])


# -- eviction ----------------------------------------------------------------------------------


def _lfu(params=None, peers=None):
    ev = MoEInfinityLFU(_setup(_shape(2, 4), params, peers, capacity=4))
    for key in (0, 1, 2):
        ev.on_insert(key, prefetch=False)
    ev.on_access(0)
    ev.on_access(0)
    ev.on_access(2)
    return ev  # counts: 0 -> 3, 1 -> 1, 2 -> 2


def test_lfu_evicts_the_minimum_visit_count_oldest_first():
    ev = _lfu()
    assert [ev.visit_count(k) for k in (0, 1, 2)] == [3, 1, 2]
    assert ev.victim(lambda k: True) == 1
    ev.on_insert(3, prefetch=True)
    assert ev.victim(lambda k: True) == 1  # count 1 tie: 1 entered first
    assert ev.victim(lambda k: k != 1) == 3
    ev.on_evict(0)
    ev.on_insert(0, prefetch=False)
    assert ev.visit_count(0) == 1  # forgotten on eviction
    assert ev.victim(lambda k: k not in (1, 3)) == 0


def test_lfu_order_max_evicts_the_most_visited():
    ev = _lfu({"order": "max"})
    assert ev.victim(lambda k: True) == 0
    assert ev.victim(lambda k: k != 0) == 2


def test_lfu_skips_candidates_and_drops_prefetches():
    peers: dict = {}
    ev = _lfu(peers=peers)
    pf = MoEInfinity(_setup(_shape(2, 4), peers=peers))
    sh = pf.shared
    assert sh is ev.shared
    sh.cand[[1]] = True
    sh.has_cand = True
    ev.recount()  # the prefetcher does this when it changes the candidates
    assert ev.prefetch_room() == 1 + 2
    assert ev.victim(lambda k: True) == 2
    sh.cand[[0, 2]] = True
    ev.recount()
    assert ev.victim(lambda k: True) is None  # a prefetch finds only candidates: dropped
    assert ev.prefetch_room() == 1  # one free slot
    sh.demand = True
    assert ev.victim(lambda k: True) == 1  # demand takes a candidate, minimum count
    assert ev.victim(lambda k: k != 1) == 2


def test_priority_eviction_is_the_argmin_of_t_d_f():
    peers: dict = {}
    shape = _shape(2, 2)
    ev = MoEInfinityPriority(_setup(shape, peers=peers, layer=0))
    for key in (0, 1, 2, 3):
        ev.on_insert(key, prefetch=False)
    ev.on_access(3)
    ev.on_access(3)
    ev.on_access(0)
    f = np.array([2, 1, 1, 3], dtype=float)
    f = f / f.sum() + 1e-6
    t = np.array([1, 1, 1 / 3, 1 / 3])  # layer 0 done: 1; layer 1: 1 / (L + 1)
    t = t / t.sum() + 1e-6
    d = np.full(4, 0.25) + 1e-6  # no request EAM: all ones, normalised
    assert ev.victim(lambda k: True) == int(np.argmin(t * d * f)) == 2


# -- end to end --------------------------------------------------------------------------------


def pattern_trace(num_requests=12, tokens=16, layers=6, experts=8, k=2, patterns=3, seed=0):
    """Requests cycle through a few routing patterns (two alternating sets per layer)."""
    rng = np.random.default_rng(seed)
    pats = [[[rng.choice(experts, size=k, replace=False).tolist() for _ in range(2)]
             for _ in range(layers)] for _ in range(patterns)]
    routing = [[[pats[r % patterns][j][t % 2] for j in range(layers)] for t in range(tokens)]
               for r in range(num_requests)]
    return trace_from_lists(routing, experts)


TIMED = {"link": FixedLink(1e-5, 1e6, 1),
         "compute": FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4)}


def _sane(s, trace, batched=False):
    assert s["hits"] + s["late_hits"] + s["promoted"] + s["misses"] == s["accesses"]
    assert 0 <= s["wasted_prefetch_bytes"] <= s["prefetch_bytes"]
    if batched:  # a batch's layer accesses its experts' union once
        assert 0 < s["accesses"] <= trace.num_rows * trace.meta.top_k
    else:
        assert s["accesses"] == trace.num_rows * trace.meta.top_k


def _run_end_to_end():
    trace = pattern_trace()
    out = {}
    for cap in (6, 10, 16):
        lru = simulate(trace, "lru", capacity=cap, mode="zero_latency").summary
        mi = simulate(trace, "moe_infinity", capacity=cap, mode="zero_latency").summary
        _sane(lru, trace)
        _sane(mi, trace)
        assert mi["hits"] > lru["hits"], cap
        timed = simulate(trace, "moe_infinity", capacity=cap, mode="timed", **TIMED).summary
        _sane(timed, trace)
        assert timed["prefetch_cancelled"] > 0  # the queue is flushed on new predictions
        assert timed["stall_time_s"] >= 0
        out[cap] = mi
    return out


def test_end_to_end_beats_lru_on_repeated_patterns():
    out = _run_end_to_end()
    assert all(s["prefetch_dropped"] > 0 for s in out.values())  # protected: "evict failed"


@pytest.mark.parametrize("params", [{}, {"order": "max"}, {"prefetch_width": 2, "horizon": 2}])
def test_zero_latency_equals_free_transfers_with_protection(params):
    trace = pattern_trace(num_requests=6, tokens=8)
    policy = {"name": "moe_infinity", **params}
    for cap in (4, 9):
        zl = simulate(trace, policy, capacity=cap, mode="zero_latency").summary
        t = simulate(trace, policy, capacity=cap, mode="timed", link=FixedLink(0.0),
                     compute=FixedCompute()).summary
        for key in ("hits", "late_hits", "promoted", "misses", "evictions",
                    "prefetch_transfers"):
            assert zl[key] == t[key], key


def test_batched_and_per_layer_runs_are_sane():
    trace = pattern_trace(num_requests=6, tokens=8)
    for kw in ({"batch": 3}, {"partition": "per_layer"}):
        for mode, extra in (("zero_latency", {}), ("timed", TIMED)):
            s = simulate(trace, "moe_infinity", capacity=18, mode=mode, **kw, **extra).summary
            _sane(s, trace, batched="batch" in kw)


def test_warm_eamc_from_a_trace_file(tmp_path):
    trace = pattern_trace(num_requests=3)
    path = tmp_path / "warm.parquet"
    write_trace(path, trace.meta, trace.requests)
    shape = ModelShape(6, 8, 2, 1000)
    pf = MoEInfinity(_setup(shape, {"warm_eamc_path": str(path)}))
    assert pf.eamc.filled == pf.eamc.persistent == 3
    first = trace.requests[0].experts
    assert pf.eamc.eams[0].sum() == first.size
    assert pf.eamc.eams[0][0, first[0, 0, 0]] == 8  # 16 tokens, two alternating sets
    test = pattern_trace(num_requests=3, seed=0)
    cold = simulate(test, "moe_infinity", capacity=10, mode="zero_latency").summary
    warm = simulate(test, {"name": "moe_infinity", "warm_eamc_path": str(path)}, capacity=10,
                    mode="zero_latency").summary
    assert warm["hits"] > cold["hits"]
    with pytest.raises(PolicyError):
        MoEInfinity(_setup(shape, {"warm_eamc_path": str(path), "eamc_capacity": 2}))


def test_registered_with_declared_defaults():
    cfg = default_config("moe_infinity")
    assert cfg["eviction"] == "moe_infinity_lfu" and cfg["eamc_capacity"] == 1000
    assert cfg["order"] == "min" and cfg["mask_observed"] is True
    spec = resolve({"name": "moe_infinity", "horizon": 3})
    assert spec.prefetch_params["horizon"] == 3


# -- the property-test invariants, on these policies only (fixed seeds) --------------------------

COMBOS = [("moe_infinity", "moe_infinity_lfu", "moe_infinity"),
          ("moe_infinity", "moe_infinity_priority", "moe_infinity"),
          ("moe_infinity", "lru", "moe_infinity"),
          ("moe_infinity_lfu", "moe_infinity_lfu", "next_layer_all"),
          ("moe_infinity_priority", "moe_infinity_priority", "none")]


class _CheckedLFU(MoEInfinityLFU):
    def on_insert(self, key, prefetch):
        super().on_insert(key, prefetch)
        assert self._n <= self.setup.capacity


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("combo", COMBOS)
def test_invariants_on_random_traces(seed, combo):
    from tests.helpers import random_trace

    name, ev, pf = combo
    rng = np.random.default_rng(seed)
    trace = random_trace(num_requests=3, tokens=10, layers=int(rng.integers(1, 5)),
                         experts=int(rng.integers(4, 10)), top_k=int(rng.integers(1, 4)),
                         seed=seed, skew=float(rng.uniform(0, 2)))
    total = trace.meta.num_moe_layers * trace.meta.num_experts
    cap = min(trace.meta.top_k + 1 + int(rng.integers(0, 8)), total)
    policy = {"name": name, "eviction": ev, "prefetch": pf}
    zl = simulate(trace, policy, capacity=cap, mode="zero_latency").summary
    free = simulate(trace, policy, capacity=cap, mode="timed", link=FixedLink(0.0),
                    compute=FixedCompute()).summary
    for key in ("hits", "late_hits", "promoted", "misses", "evictions", "prefetch_transfers"):
        assert zl[key] == free[key], key
    assert free["stall_time_s"] == 0.0
    timed = simulate(trace, policy, capacity=cap, mode="timed", **TIMED).summary
    _sane(timed, trace)
    assert timed["stall_time_s"] >= 0 and timed["total_time_s"] >= timed["stall_time_s"]
    spec = resolve(policy)
    if spec.eviction is MoEInfinityLFU:
        checked = type(spec)("checked", _CheckedLFU, spec.prefetch, spec.eviction_params,
                             spec.prefetch_params)
        simulate(trace, checked, capacity=cap, mode="timed", **TIMED)


@pytest.mark.parametrize("params", [{}, {"order": "max"}, {"prefetch_width": 2}])
def test_truncated_queue_places_what_the_whole_list_would(monkeypatch, params):
    """Zero latency: queueing only ``room + E`` absent experts changes nothing but the number of
    dropped prefetches (the rest of the list could never find a non-candidate victim)."""
    trace = pattern_trace(num_requests=6, tokens=10)
    policy = {"name": "moe_infinity", **params}
    keys = ("hits", "misses", "evictions", "prefetch_transfers")
    for cap in (4, 7, 12):
        short = simulate(trace, policy, capacity=cap, mode="zero_latency").summary
        with monkeypatch.context() as m:
            m.setattr(MoEInfinity, "_queueable", lambda self, ctx, order: order.tolist())
            whole = simulate(trace, policy, capacity=cap, mode="zero_latency").summary
        assert {k: short[k] for k in keys} == {k: whole[k] for k in keys}
        assert short["prefetch_dropped"] <= whole["prefetch_dropped"]
