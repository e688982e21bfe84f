"""A min-heap whose entries go stale when a key's score changes (shared by LFU and Belady)."""

from __future__ import annotations

import heapq
from collections.abc import Callable


def pop_victim(
    heap: list[tuple], is_current: Callable[[tuple], bool], can_evict: Callable[[int], bool]
) -> int | None:
    """Key of the smallest current entry whose key may be evicted; stale entries are dropped,
    current ones that may not be evicted now are kept. The key is an entry's last field."""
    skipped = []
    found = None
    while heap:
        top = heap[0]
        if not is_current(top):
            heapq.heappop(heap)
            continue
        if can_evict(top[-1]):
            found = top[-1]
            break
        skipped.append(heapq.heappop(heap))
    for item in skipped:
        heapq.heappush(heap, item)
    return found


__all__ = ["pop_victim"]
