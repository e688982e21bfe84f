"""Physical slots behind the cache's bookkeeping.

``sim.cache.ExpertCache`` decides *which* experts are resident (states, pins, partitions, the
eviction policy's victims); the executor also needs *where* each one lives: one preallocated
buffer per slot, so a copy can land without allocating. ``SlotPool`` maps keys to slot indices;
``SlottedCache`` keeps the pool in step with the cache (a slot is taken by ``reserve``/``install``
and given back by ``evict``), so the bookkeeping stays the simulator's own code.
"""

from __future__ import annotations

from collections.abc import Sequence

from moesim.policies.base import EvictionPolicy
from moesim.sim.cache import ABSENT, ExpertCache, SimulationError


class SlotPool:
    """``capacity`` slots numbered 0..capacity-1; each holds at most one expert key."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise SimulationError(f"slot pool needs at least one slot, got {capacity}")
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._slot: dict[int, int] = {}

    def assign(self, key: int) -> int:
        """Give ``key`` a free slot; an error if it already has one or none is free."""
        if key in self._slot:
            raise SimulationError(f"expert key {key} already holds slot {self._slot[key]}")
        if not self._free:
            raise SimulationError("no free slot: the cache admitted more keys than it has slots")
        slot = self._free.pop()
        self._slot[key] = slot
        return slot

    def release(self, key: int) -> int:
        """Free the slot of ``key`` (an error if it holds none); returns the slot."""
        slot = self._slot.pop(key, None)
        if slot is None:
            raise SimulationError(f"expert key {key} holds no slot")
        self._free.append(slot)
        return slot

    def slot_of(self, key: int) -> int:
        return self._slot[key]

    def holds(self, key: int) -> bool:
        return key in self._slot

    @property
    def used(self) -> int:
        return len(self._slot)

    def held(self) -> list[int]:
        return list(self._slot)


class SlottedCache(ExpertCache):
    """An ``ExpertCache`` whose every slot-holding key also holds a physical slot."""

    def __init__(
        self,
        num_experts: int,
        partition_of_layer: Sequence[int],
        capacities: Sequence[int],
        evictors: Sequence[EvictionPolicy],
    ) -> None:
        super().__init__(num_experts, partition_of_layer, capacities, evictors)
        self.pool = SlotPool(sum(capacities))

    def reserve(self, key: int, prefetch: bool) -> bool:
        ok = super().reserve(key, prefetch)  # may evict (which releases the victim's slot)
        if ok:
            self.pool.assign(key)
        return ok

    def evict(self, key: int) -> None:
        super().evict(key)
        self.pool.release(key)

    def install(self, key: int) -> bool:
        was_absent = self.state[key] == ABSENT
        ok = super().install(key)
        if ok and was_absent:
            self.pool.assign(key)
        return ok
