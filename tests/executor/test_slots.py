"""Slot bookkeeping: the physical slot pool follows the cache's residency exactly."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.policies.base import ModelShape, PolicySetup
from moesim.policies.lru import LRU
from moesim.sim.cache import ABSENT, SimulationError
from moesim.sim.executor.clock import WallClock
from moesim.sim.executor.slots import SlotPool, SlottedCache


def test_pool_assigns_distinct_slots_and_reuses_freed_ones() -> None:
    pool = SlotPool(3)
    slots = [pool.assign(k) for k in (10, 11, 12)]
    assert sorted(slots) == [0, 1, 2]
    with pytest.raises(SimulationError, match="no free slot"):
        pool.assign(13)
    with pytest.raises(SimulationError, match="already holds"):
        pool.assign(10)
    freed = pool.release(11)
    assert pool.assign(13) == freed
    assert pool.slot_of(13) == freed and not pool.holds(11)
    with pytest.raises(SimulationError, match="holds no slot"):
        pool.release(11)
    assert pool.used == 3 and sorted(pool.held()) == [10, 12, 13]


def _cache(caps: list[int], layers: int = 2, experts: int = 6) -> SlottedCache:
    shape = ModelShape(layers, experts, 2, 100)
    clock = WallClock()
    parts = list(range(layers)) if len(caps) > 1 else [0] * layers
    evictors = [
        LRU(PolicySetup(shape, cap, clock, np.random.default_rng(0))) for cap in caps
    ]
    return SlottedCache(experts, parts, caps, evictors)


@pytest.mark.parametrize("caps", [[4], [2, 3]])
def test_slotted_cache_keeps_one_slot_per_slot_holding_key(caps: list[int]) -> None:
    cache = _cache(caps)
    rng = np.random.default_rng(1)
    for _ in range(300):
        key = int(rng.integers(0, 12))
        op = rng.integers(0, 3)
        if op == 0 and cache.state[key] == ABSENT:
            cache.reserve(key, prefetch=bool(rng.integers(0, 2)))
        elif op == 1 and cache.state[key] != ABSENT:
            cache.complete(key)
        elif op == 2:
            cache.install(key)
        holding = {k for k in range(12) if cache.state[k] != ABSENT}
        assert set(cache.pool.held()) == holding
        slots = [cache.pool.slot_of(k) for k in holding]
        assert len(set(slots)) == len(slots) and all(0 <= s < sum(caps) for s in slots)
        assert sum(cache.used) == cache.pool.used


def test_evicted_slot_goes_to_the_newcomer() -> None:
    cache = _cache([2])
    for k in (0, 1):
        cache.reserve(k, prefetch=False)
        cache.complete(k)
    slot0 = cache.pool.slot_of(0)
    assert cache.reserve(2, prefetch=False)  # LRU evicts key 0
    assert cache.state[0] == ABSENT and cache.pool.slot_of(2) == slot0


def test_no_evictable_slot_takes_no_slot() -> None:
    cache = _cache([2])
    for k in (0, 1):
        cache.reserve(k, prefetch=False)  # both in flight: not evictable
    assert not cache.reserve(2, prefetch=True)
    assert cache.pool.used == 2 and not cache.pool.holds(2)
