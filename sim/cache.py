"""The GPU expert cache: slots, residency states, pins, and partitions.

The cache owns *where* experts are; eviction policies only order candidates. A slot is taken
when a transfer starts (prefetch) or when a demand miss is issued, and stays taken while the
copy is in flight. Experts of the layer being computed are pinned until the layer ends.

Each slot filled by a prefetch remembers, until its first use, that it came by prefetch and
whether that transfer started in a counted step (``COUNTED_PREFETCH``) or during warm-up
(``WARMUP_PREFETCH``): a counted prefetch transfer ends exactly one way (it serves an access,
it is evicted or discarded unused, or it is still unused at the end), so the wasted part of
``prefetch_bytes`` can never exceed it.
"""

from __future__ import annotations

from collections.abc import Sequence

from moesim.policies.base import EvictionPolicy

ABSENT, LOADING, RESIDENT = 0, 1, 2
NOT_PREFETCHED, COUNTED_PREFETCH, WARMUP_PREFETCH = 0, 1, 2


class SimulationError(RuntimeError):
    """The run cannot continue (e.g. a demand fetch found no evictable slot)."""


class ExpertCache:
    """Residency of every expert key, split into partitions that each have a slot budget."""

    def __init__(
        self,
        num_experts: int,
        partition_of_layer: Sequence[int],
        capacities: Sequence[int],
        evictors: Sequence[EvictionPolicy],
    ) -> None:
        self._num_e = num_experts
        self._part = list(partition_of_layer)
        self.capacities = list(capacities)
        self.evictors = list(evictors)
        self.used = [0] * len(capacities)
        num_keys = len(self._part) * num_experts
        self.state = bytearray(num_keys)
        self.prefetched_unused = bytearray(num_keys)
        self.pinned: set[int] = set()
        self._single = len(self.capacities) == 1
        self.evictions = 0
        self.wasted_prefetches = 0  # counted prefetch transfers evicted before any use
        self.counting = True  # set by the engine: False during warm-up steps

    def partition(self, key: int) -> int:
        return self._part[key // self._num_e]

    def can_evict(self, key: int) -> bool:
        return self.state[key] == RESIDENT and key not in self.pinned

    def reserve(self, key: int, prefetch: bool) -> bool:
        """Take a slot for ``key`` (evicting if full). False if no slot can be freed."""
        p = 0 if self._single else self._part[key // self._num_e]
        evictor = self.evictors[p]
        if self.used[p] >= self.capacities[p]:
            victim = evictor.victim(self.can_evict)
            if victim is None:
                return False
            if (self.state[victim] != RESIDENT or victim in self.pinned
                    or (not self._single and self._part[victim // self._num_e] != p)):
                raise SimulationError(
                    f"eviction policy {evictor.name!r} chose key {victim}, which is pinned, "
                    "in flight, absent or in another partition"
                )
            self.evict(victim)
        self.used[p] += 1
        self.state[key] = LOADING
        if prefetch:
            self.prefetched_unused[key] = COUNTED_PREFETCH if self.counting else WARMUP_PREFETCH
        else:
            self.prefetched_unused[key] = NOT_PREFETCHED
        evictor.on_insert(key, prefetch)
        return True

    def complete(self, key: int) -> None:
        self.state[key] = RESIDENT

    def evict(self, key: int) -> None:
        p = 0 if self._single else self._part[key // self._num_e]
        self.state[key] = ABSENT
        self.used[p] -= 1
        self.evictions += 1
        if self.prefetched_unused[key]:
            if self.prefetched_unused[key] == COUNTED_PREFETCH:
                self.wasted_prefetches += 1
            self.prefetched_unused[key] = NOT_PREFETCHED
        self.evictors[p].on_evict(key)

    def install(self, key: int) -> bool:
        """Place ``key`` as resident without a transfer (pre-filling); False if full."""
        p = self._part[key // self._num_e]
        if self.state[key] != ABSENT:
            return True
        if self.used[p] >= self.capacities[p]:
            return False
        self.used[p] += 1
        self.state[key] = RESIDENT
        self.evictors[p].on_insert(key, False)
        return True

    def resident_count(self) -> int:
        return sum(1 for s in self.state if s == RESIDENT)

    def unused_prefetches(self) -> int:
        """Counted prefetch transfers not used yet (resident or still in flight)."""
        return self.prefetched_unused.count(COUNTED_PREFETCH)
