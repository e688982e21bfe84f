"""FIFO: evict the expert that entered the cache first; accesses change nothing. Knows: past."""

from __future__ import annotations

from moesim.policies.lru import LRU
from moesim.policies.registry import register_eviction


@register_eviction
class FIFO(LRU):
    """LRU's insertion order without the refresh on access."""

    name = "fifo"
    params = {}

    def on_access(self, key: int) -> None:
        pass

    def on_prefetch_resident(self, key: int) -> None:
        pass
