"""The compiled engine (sim.compiled) gives the SimPy engine's metrics, run for run.

Every covered policy (eviction x prefetcher x parameters, MoE-Infinity's EAMC prefetcher and its
two evictors included) in both modes, with batching, prefill chunks, partitions, copy engines,
warm-up (and MoE-Beyond's extra warm-up row), pinning, random prefill and per-request caches, on
small random traces where eviction, late hits, promotions and dropped prefetches all happen;
per-step times too (the per-request time-per-token percentiles are built from them).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies.base import EvictionPolicy, NoPrefetch
from moesim.policies.lru import LRU
from moesim.policies.registry import PolicySpec, resolve
from moesim.sim import (
    FixedCompute,
    FixedHostCpu,
    FixedLink,
    HostSide,
    SimulationError,
    build_workload,
    compiled,
    simulate,
)
from moesim.sim.compiled.sums import pairwise
from moesim.sim.engine import CacheOptions, RunOptions, Simulation
from moesim.sim.metrics import RunResult
from moesim.traces.store import write_trace
from tests.helpers import noisy_predictions, random_trace
from tests.sim.parts import check_parts

EVICTIONS = ["lru", "fifo", "lfu", "least_stale", "static", "belady", "fate_arc",
             "moe_infinity_lfu", "moe_infinity_priority"]
POINTS = ["pre_attention", "routed", "demand_issued"]




def _policy(rng: np.random.Generator) -> dict[str, Any]:
    """A covered policy config: an eviction alone, or a prefetcher with any covered eviction."""
    ev = str(rng.choice(EVICTIONS))
    pf = str(rng.choice(["none", "oracle_prefetch", "next_layer_all", "prediction_prefetch",
                         "moe_beyond_replay", "moe_infinity"]))
    if pf == "moe_infinity":  # compiled with its own evictors (candidate protection) only
        ev = str(rng.choice(["moe_infinity_lfu", "moe_infinity_priority"]))
    cfg: dict[str, Any] = {"name": ev} if pf == "none" else {"name": pf, "eviction": ev}
    if ev in ("lru", "static"):
        cfg["prefetch_touch"] = bool(rng.random() < 0.7)
    if ev == "moe_infinity_lfu":
        cfg["order"] = str(rng.choice(["min", "max"]))
    if pf == "oracle_prefetch":
        cfg.update(point=str(rng.choice(POINTS)), lookahead=int(rng.integers(0, 4)))
    elif pf == "prediction_prefetch":
        cfg.update(point=str(rng.choice(POINTS)), ahead=int(rng.integers(0, 3)),
                   top=int(rng.integers(0, 4)), check_availability=False)
    elif pf == "next_layer_all":
        cfg["wrap"] = bool(rng.random() < 0.7)
    elif pf == "moe_infinity":
        cfg.update(eamc_capacity=int(rng.integers(1, 5)),
                   mask_observed=bool(rng.random() < 0.7),
                   horizon=[None, 0, 1, 2][int(rng.integers(4))],
                   prefetch_width=int(rng.choice([0, 0, 1, 2, 3])))
    elif pf == "moe_beyond_replay":
        cfg.update(point=str(rng.choice(["routed", "pre_attention"])),
                   during_warmup=bool(rng.random() < 0.5))
    return cfg


def _mi_policy(rng: np.random.Generator) -> dict[str, Any]:
    """MoE-Infinity only: its priority evictor alone, or its prefetcher with either evictor."""
    pf = rng.random() < 0.6
    ev = "moe_infinity_priority" if not pf or rng.random() < 0.5 else "moe_infinity_lfu"
    cfg: dict[str, Any] = {"name": "moe_infinity", "eviction": ev} if pf else {"name": ev}
    if ev == "moe_infinity_lfu":
        cfg["order"] = str(rng.choice(["min", "max"]))
    if pf:
        cfg.update(eamc_capacity=int(rng.integers(1, 9)),
                   mask_observed=bool(rng.random() < 0.7),
                   horizon=[None, None, 0, 1, 2][int(rng.integers(5))],
                   prefetch_width=int(rng.choice([0, 0, 1, 2, 3])))
    return cfg


def _config(seed: int, mi_only: bool = False) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(trace, policy, simulate options) drawn uniformly from one seed, so that every
    combination is as likely as any other (hypothesis picks and shrinks the seed);
    ``mi_only``: MoE-Infinity's policies on longer traces (more requests, EAMC slots, visits)."""
    rng = np.random.default_rng(seed)
    policy = _mi_policy(rng) if mi_only else _policy(rng)
    layers, experts, top_k = int(rng.integers(1, 5)), int(rng.integers(4, 11)), 0
    top_k = int(rng.integers(1, min(3, experts) + 1))
    requests = int(rng.integers(2, 9)) if mi_only else int(rng.integers(1, 4))
    tokens = int(rng.integers(5, 26)) if mi_only else int(rng.integers(2, 8))
    trace = random_trace(num_requests=requests, tokens=tokens,
                         layers=layers, experts=experts, top_k=top_k, seed=seed,
                         prefill_tokens=int(rng.integers(0, 3)))
    mode = str(rng.choice(["timed", "zero_latency"]))
    fresh = str(rng.choice(["no", "no", "random", "random_reset", "reset"]))
    reset = fresh in ("reset", "random_reset")
    batch = 1 if reset else int(rng.integers(1, 4))
    replay, chunk = str(rng.choice(["decode", "prefill"])), int(rng.integers(0, 3))
    engines = int(rng.integers(1, 4))
    pin = mode == "timed" or bool(rng.random() < 0.5)
    partition = str(rng.choice(["global", "per_layer"]))
    if "fate_arc" in (policy["name"], policy.get("eviction")):
        partition = "per_layer"  # one ARC per layer
    widest = build_workload(trace, replay=replay, batch=batch, prefill_chunk=chunk).max_width()
    per = (int(widest.max()) if pin else 1) + (engines if mode == "timed" else 1)
    cap = per * (layers if partition == "per_layer" else 1) + int(rng.integers(0, 6))
    lat, bw = [(2e-4, 1e9), (1e-5, 1e7), (0.0, math.inf), (5e-3, 1e9)][int(rng.integers(4))]
    kw: dict[str, Any] = dict(
        capacity=min(cap, layers * experts), mode=mode, partition=partition, batch=batch,
        replay=replay, prefill_chunk=chunk, warmup_tokens=int(rng.integers(0, 4)),
        warmup_extra_row=batch == 1 and replay == "decode" and bool(rng.random() < 0.3),
        pin_layer=pin, prefill="random" if fresh.startswith("random") else "empty",
        reset_per_request=reset, seed=seed, link=FixedLink(lat, bw, engines),
        compute=FixedCompute(attention_s=float(rng.choice([0.0, 1e-4, 1e-3, 1e-2])),
                             router_s=1e-4, expert_s=3e-4, shared_s=1e-4, dense_s=5e-4),
        dense_before=[int(rng.integers(0, 2))] + [0] * (layers - 1),
        predictions=noisy_predictions(trace, np.random.default_rng(seed),
                                      float(rng.choice([0.0, 0.3, 1.0])),
                                      int(rng.integers(1, 5))),
    )
    if not mi_only and rng.random() < 0.3:  # the last layers on the host CPU, or copied in
        name = str(rng.choice(["cpu_layers", "layer_offload"]))
        kw["placement"] = {"name": name, "gpu_layers": int(rng.integers(0, layers + 2))}
        kw["partition"] = "global"  # per_layer is refused with whole-layer placements
        kw["host"] = HostSide(
            FixedHostCpu(call_s=float(rng.choice([0.0, 2e-4])), per_token_s=5e-5,
                         parallel=int(rng.integers(1, 3)), attention_s=2e-3,
                         shared_s=float(rng.choice([0.0, 3e-4])), dense_s=4e-3),
            activation_bytes=int(rng.choice([0, 64, 4096])), dtype_bits=16,
            attention_bytes=int(rng.choice([1, 500, 4000])),
            shared_bytes=int(rng.choice([0, 300])), dense_bytes=800)
    return trace, policy, kw


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Summary fields that differ: counters exactly, times and ratios to 1e-9 relative."""
    bad = []
    for key, x in a.items():
        if key == "sim_engine":
            continue
        y = b[key]
        if isinstance(x, float) and isinstance(y, float) and (
            (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        ):
            continue
        if x != y:
            bad.append(f"{key}: simpy {x!r} != compiled {y!r}")
    return bad


def _assert_same(ref: RunResult, fast: RunResult) -> None:
    assert ref.summary["sim_engine"] == "python"
    assert fast.summary["sim_engine"] == "compiled"
    assert _differences(ref.summary, fast.summary) == []
    a, b = ref.per_layer, fast.per_layer
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if col in ("stall_time_s", "hit_rate", "hit_rate_incl_late"):
            assert np.allclose(a[col], b[col], rtol=1e-9, atol=1e-12, equal_nan=True), col
        else:
            assert a[col].tolist() == b[col].tolist(), col
    pa, pb = ref.per_request, fast.per_request  # built from every step's duration
    assert (pa is None) == (pb is None)
    if pa is not None:
        assert list(pa.columns) == list(pb.columns)
        for col in pa.columns:
            assert np.allclose(pa[col], pb[col], rtol=1e-9, atol=1e-12, equal_nan=True), col
    check_parts(fast)


def equal_on_both_engines(trace: Any, policy: Any, kw: dict[str, Any]) -> RunResult | None:
    """Run on SimPy and on the compiled engine and assert the same results; a run SimPy
    refuses (too small a cache, ...) the compiled engine must refuse alike (then None)."""
    try:
        ref = simulate(trace, policy, engine="python", **kw)
    except SimulationError as err:
        with pytest.raises(SimulationError, match=str(err).split(":")[0]):
            simulate(trace, policy, engine="compiled", **kw)
        return None
    _assert_same(ref, simulate(trace, policy, engine="compiled", **kw))
    return ref


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_compiled_engine_equals_simpy(seed: int) -> None:
    equal_on_both_engines(*_config(seed))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_moe_infinity_equals_simpy(seed: int) -> None:
    """MoE-Infinity's prefetcher and evictors, whose compiled twins take shortcuts (the
    priority evictor's per-layer heaps, the prefetcher's merged list): same runs as SimPy."""
    equal_on_both_engines(*_config(seed, mi_only=True))


@pytest.mark.parametrize("seed", range(12))
def test_moe_infinity_longer_runs(seed: int) -> None:
    """Hundreds of evictions per run, where the visit counts spread and tie (a tie-break
    differing from the reference's shows here within a few seeds)."""
    trace = random_trace(num_requests=6, tokens=20, layers=4, experts=8, top_k=2, seed=seed,
                         prefill_tokens=0)
    for mode in ("timed", "zero_latency"):
        for policy in ({"name": "moe_infinity_priority"}, {"name": "moe_infinity"},
                       {"name": "moe_infinity", "eviction": "moe_infinity_priority"}):
            kw: dict[str, Any] = dict(
                capacity=8 + seed % 6, mode=mode, link=FixedLink(1e-4, 1e9, 1 + seed % 2),
                compute=FixedCompute(attention_s=1e-4, router_s=1e-4, expert_s=3e-4,
                                     shared_s=1e-4, dense_s=5e-4))
            _assert_same(simulate(trace, policy, engine="python", **kw),
                         simulate(trace, policy, engine="compiled", **kw))


@pytest.mark.parametrize("mode", ["timed", "zero_latency"])
@pytest.mark.parametrize("eviction", ["moe_infinity_lfu", "moe_infinity_priority"])
def test_moe_infinity_deep_model(mode: str, eviction: str) -> None:
    """Twelve layers (the random configs have at most four): the match sums 8 or more layers
    with numpy's interleaved accumulators, and top-4 routing over 3 requests in batches of 2
    sums the stored rows of several experts; a full EAMC replaces slots."""
    trace = random_trace(num_requests=5, tokens=8, layers=12, experts=8, top_k=4, seed=5)
    policy = {"name": "moe_infinity", "eviction": eviction, "eamc_capacity": 3}
    kw: dict[str, Any] = dict(capacity=40, mode=mode, batch=2, link=FixedLink(2e-4, 1e9),
                              compute=FixedCompute(attention_s=1e-4, expert_s=3e-4))
    _assert_same(simulate(trace, policy, engine="python", **kw),
                 simulate(trace, policy, engine="compiled", **kw))


@pytest.mark.parametrize("mode", ["timed", "zero_latency"])
def test_moe_infinity_warm_eamc(tmp_path: Path, mode: str) -> None:
    """A pre-filled EAMC (persistent slots, access count 0) reaches the compiled engine as the
    prefetcher holds it, and later requests replace only the non-persistent slots."""
    warm = random_trace(num_requests=3, tokens=6, layers=5, experts=8, top_k=2, seed=11)
    path = tmp_path / "warm.parquet"
    write_trace(path, warm.meta, warm.requests)
    trace = random_trace(num_requests=4, tokens=6, layers=5, experts=8, top_k=2, seed=12)
    policy = {"name": "moe_infinity", "warm_eamc_path": str(path), "eamc_capacity": 4}
    kw: dict[str, Any] = dict(capacity=14, mode=mode, link=FixedLink(2e-4, 1e9),
                              compute=FixedCompute(attention_s=1e-4, expert_s=3e-4))
    _assert_same(simulate(trace, policy, engine="python", **kw),
                 simulate(trace, policy, engine="compiled", **kw))


def test_auto_picks_compiled_only_for_covered_runs() -> None:
    """A covered run goes compiled under ``auto``; options and policies without a compiled
    twin run on SimPy (and ``engine=compiled`` refuses them), never a different result."""
    trace = random_trace(seed=3)
    kw: dict[str, Any] = dict(capacity=12, mode="timed", link=FixedLink(1e-4, 1e9),
                              compute=FixedCompute(attention_s=1e-4, expert_s=1e-4))
    assert simulate(trace, "belady", **kw).summary["sim_engine"] == "compiled"
    assert simulate(trace, "belady", engine="python", **kw).summary["sim_engine"] == "python"
    for extra in ({"record_transfers": True}, {"timeline_steps": 1}):
        assert simulate(trace, "lru", **kw, **extra).summary["sim_engine"] == "python"
        with pytest.raises(SimulationError, match="engine=compiled cannot"):
            simulate(trace, "lru", engine="compiled", **kw, **extra)
    assert simulate(trace, "moe_infinity", **kw).summary["sim_engine"] == "compiled"
    mi_lru = {"name": "moe_infinity", "eviction": "lru"}  # no candidate protection: SimPy
    assert simulate(trace, mi_lru, **kw).summary["sim_engine"] == "python"
    with pytest.raises(SimulationError, match="moe_infinity with an eviction other"):
        simulate(trace, mi_lru, engine="compiled", **kw)


def test_placements_other_than_fetch_have_no_twin() -> None:
    """Only the default placement (``fetch``) and ``cpu_layers`` are compiled; any other runs
    on SimPy."""
    sim = Simulation(build_workload(random_trace(seed=3)), resolve({"name": "lru"}),
                     CacheOptions(12), RunOptions(mode="zero_latency"))
    assert compiled.why_not(sim) is None
    sim.placement_spec = SimpleNamespace(name="cpu_on_miss", is_default=False)
    reason = compiled.why_not(sim)
    assert reason is not None and "placement 'cpu_on_miss'" in reason


def test_numpy_summation_orders() -> None:
    """The compiled sums round as numpy's: a contiguous run pairwise (every length through
    the halving levels), the columns of a fancy-indexed 2-D array one by one."""
    rng = np.random.default_rng(0)
    for n in [*range(0, 140), 200, 257, 1000, 1664, 4099, 14848]:
        x = rng.random((2, n + 3)) * 10.0 ** rng.integers(-3, 4, (2, n + 3))
        assert pairwise(x, 1, 3, n) == x[1, 3:].sum()
    x = rng.random((5, 40))
    idx = np.array([1, 4, 5, 9, 11, 20, 21, 30, 33, 39])
    cols = x[:, idx].sum(axis=1)
    for r in range(5):
        one_by_one = 0.0
        for v in x[r, idx]:
            one_by_one += v
        assert cols[r] == one_by_one


class _UserLRU(LRU):
    """A user's policy that inherits from a shipped one: it must run on SimPy."""

    name = "user_lru"


class _UserMRU(EvictionPolicy):
    """A user-written eviction policy (most recently inserted first)."""

    name = "user_mru"

    def __init__(self, setup: Any) -> None:
        super().__init__(setup)
        self._keys: list[int] = []

    def on_insert(self, key: int, prefetch: bool) -> None:
        self._keys.append(key)

    def on_access(self, key: int) -> None:
        pass

    def on_evict(self, key: int) -> None:
        self._keys.remove(key)

    def victim(self, can_evict: Any) -> int | None:
        return next((k for k in reversed(self._keys) if can_evict(k)), None)


@pytest.mark.parametrize("cls", [_UserLRU, _UserMRU])
def test_user_policies_run_on_simpy(cls: type[EvictionPolicy]) -> None:
    """Unregistered classes (no global registry change): a spec built from the class."""
    trace = random_trace(seed=4)
    spec = PolicySpec(cls.name, cls, NoPrefetch)
    res = simulate(trace, spec, capacity=10, mode="zero_latency")
    assert res.summary["sim_engine"] == "python"
    with pytest.raises(SimulationError, match="no compiled twin"):
        simulate(trace, spec, capacity=10, mode="zero_latency", engine="compiled")
