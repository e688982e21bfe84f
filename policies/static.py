"""Static residency: pin the most frequent experts of each layer; LRU over the remaining slots.

The hot set is chosen from the demand counts of the whole run being simulated, so the policy
reads future routing (knows: oracle). It is the "hot residency" baseline of Fiddler / Klotski
with a perfect offline profile: an optimistic bound on what frequency pinning can do.
``reserve`` slots (at least the widest layer plus the copy engines) stay LRU-managed for misses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moesim.policies.base import Knowledge, PolicyError
from moesim.policies.lru import LRU
from moesim.policies.registry import register_eviction


@register_eviction
class Static(LRU):
    """Frequency-pinned experts plus an LRU area."""

    name = "static"
    knows = Knowledge.ORACLE
    prefills = True
    params = {"prefetch_touch": True, "dynamic_slots": 0}

    def __init__(self, setup):
        super().__init__(setup)
        if setup.future is None:
            raise PolicyError("static needs the run's expert frequencies (oracle)")
        dynamic = max(int(setup.params.get("dynamic_slots", 0)), setup.reserve)
        self._pinned_budget = max(setup.capacity - dynamic, 0)
        self._hot = self._choose(setup.future.key_frequencies())

    def _choose(self, freq: np.ndarray) -> set[int]:
        shape = self.setup.shape
        layers = list(self.setup.partition_layers or range(shape.num_layers))
        budget = self._pinned_budget
        per_layer, extra = divmod(budget, len(layers))
        chosen: list[int] = []
        leftovers: list[tuple[float, int]] = []
        for layer in layers:
            row = freq[layer * shape.num_experts:(layer + 1) * shape.num_experts]
            order = np.argsort(-row, kind="stable")
            take = min(per_layer, shape.num_experts)
            chosen += [layer * shape.num_experts + int(e) for e in order[:take]]
            leftovers += [(-float(row[e]), layer * shape.num_experts + int(e))
                          for e in order[take:]]
        leftovers.sort()
        chosen += [key for _, key in leftovers[:extra]]
        return set(chosen)

    def initial_contents(self) -> list[int]:
        return sorted(self._hot)

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        hot = self._hot
        return super().victim(lambda key: key not in hot and can_evict(key))
