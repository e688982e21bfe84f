"""LRU: evict the expert whose last demand (or insertion) is oldest. Knows: past only."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from moesim.policies.base import EvictionPolicy
from moesim.policies.registry import register_eviction


@register_eviction
class LRU(EvictionPolicy):
    """Least recently used over the keys of one cache partition.

    ``prefetch_touch``: a prefetch asked for an already-resident expert refreshes its recency
    (MoE-Beyond's simulator "accesses" predicted experts before the real ones, which does this).
    """

    name = "lru"
    params = {"prefetch_touch": True}

    def __init__(self, setup):
        super().__init__(setup)
        self._order: OrderedDict[int, None] = OrderedDict()
        self._touch = bool(setup.params.get("prefetch_touch", True))

    def on_insert(self, key: int, prefetch: bool) -> None:
        self._order[key] = None

    def on_access(self, key: int) -> None:
        self._order.move_to_end(key)

    def on_prefetch_resident(self, key: int) -> None:
        if self._touch:
            self._order.move_to_end(key)

    def on_evict(self, key: int) -> None:
        del self._order[key]

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        for key in self._order:
            if can_evict(key):
                return key
        return None
