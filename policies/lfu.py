"""In-cache LFU: evict the least frequently accessed expert; counts restart at insertion.

Matches libCacheSim's LFU: an inserted expert has frequency 1, each access adds 1, and among
equal frequencies the one that reached that frequency first leaves first. Knows: past only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from moesim.policies._heap import pop_victim
from moesim.policies.base import EvictionPolicy
from moesim.policies.registry import register_eviction


@register_eviction
class LFU(EvictionPolicy):
    """Frequency buckets with FIFO inside a bucket, as a lazily cleaned heap."""

    name = "lfu"

    def __init__(self, setup):
        super().__init__(setup)
        self._entry: dict[int, tuple[int, int]] = {}  # key -> (freq, seq) currently valid
        self._heap: list[tuple[int, int, int]] = []
        self._seq = 0

    def _push(self, key: int, freq: int) -> None:
        self._seq += 1
        self._entry[key] = (freq, self._seq)
        heapq.heappush(self._heap, (freq, self._seq, key))

    def on_insert(self, key: int, prefetch: bool) -> None:
        self._push(key, 1)

    def on_access(self, key: int) -> None:
        self._push(key, self._entry[key][0] + 1)

    def on_evict(self, key: int) -> None:
        del self._entry[key]

    def frequency(self, key: int) -> int:
        return self._entry[key][0]

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        entry = self._entry
        return pop_victim(self._heap, lambda e: entry.get(e[2]) == (e[0], e[1]), can_evict)
