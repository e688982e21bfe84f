"""Belady / MIN: evict the expert whose next demand is farthest in the future. Knows: oracle.

A bound, not a deployable policy: it reads future routing from the trace. On a demand-only
stream it gives the fewest misses of any eviction policy (with the same pinning rules).
Positions are (step, layer) slots, so experts needed in the same layer-step tie; ties do not
change the miss count.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from moesim.policies._heap import pop_victim
from moesim.policies.base import EvictionPolicy, Knowledge, PolicyError
from moesim.policies.registry import register_eviction


@register_eviction
class Belady(EvictionPolicy):
    """Max-heap on next use, cleaned lazily."""

    name = "belady"
    knows = Knowledge.ORACLE

    def __init__(self, setup):
        super().__init__(setup)
        if setup.future is None:
            raise PolicyError("belady needs future routing (oracle) but none was given")
        self._future = setup.future
        self._clock = setup.clock
        self._next: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []

    def _set(self, key: int, inclusive: bool) -> None:
        nxt = self._future.next_use(key, self._clock.position, inclusive)
        self._next[key] = nxt
        heapq.heappush(self._heap, (-nxt, key))

    def on_insert(self, key: int, prefetch: bool) -> None:
        # A prefetched expert's imminent use may be in the current layer-step itself.
        self._set(key, inclusive=prefetch)

    def on_access(self, key: int) -> None:
        self._set(key, inclusive=False)

    def on_evict(self, key: int) -> None:
        del self._next[key]

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        nxt = self._next
        return pop_victim(self._heap, lambda e: nxt.get(e[1]) == -e[0], can_evict)
