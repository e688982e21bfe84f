"""FIFO: evict the expert that entered the cache first; accesses change nothing. Knows: past."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from policies.base import EvictionPolicy
from policies.registry import register_eviction


@register_eviction
class FIFO(EvictionPolicy):
    """First in, first out over one partition."""

    name = "fifo"

    def __init__(self, setup):
        super().__init__(setup)
        self._order: OrderedDict[int, None] = OrderedDict()

    def on_insert(self, key: int, prefetch: bool) -> None:
        self._order[key] = None

    def on_access(self, key: int) -> None:
        pass

    def on_evict(self, key: int) -> None:
        del self._order[key]

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        for key in self._order:
            if can_evict(key):
                return key
        return None
