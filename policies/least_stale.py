"""Least-Stale (SpecMD, arXiv 2602.03921): evict experts not used in the current forward pass.

Experts touched (accessed or inserted) during the current step are *current*; all others are
*stale*. The victim is the first-inserted stale expert, else the first-inserted current one.
Taken from a third-party description of SpecMD (no code was published); knows: past only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from moesim.policies.base import EvictionPolicy
from moesim.policies.registry import register_eviction


@register_eviction
class LeastStale(EvictionPolicy):
    """Stale-first FIFO eviction."""

    name = "least_stale"

    def __init__(self, setup):
        super().__init__(setup)
        self._order: OrderedDict[int, None] = OrderedDict()
        self._current: set[int] = set()

    def on_insert(self, key: int, prefetch: bool) -> None:
        self._order[key] = None
        self._current.add(key)

    def on_access(self, key: int) -> None:
        self._current.add(key)

    def on_evict(self, key: int) -> None:
        del self._order[key]
        self._current.discard(key)

    def on_step_end(self) -> None:
        self._current.clear()

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        fallback = None
        current = self._current
        for key in self._order:
            if can_evict(key):
                if key not in current:
                    return key
                if fallback is None:
                    fallback = key
        return fallback
