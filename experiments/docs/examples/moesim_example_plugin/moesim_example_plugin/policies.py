"""``policy=my_random``: evict a uniformly random evictable expert.

Importing this module registers the class (moesim imports it through the
``moesim.policies`` entry point in this package's pyproject.toml, in every
process a run uses).
"""

from __future__ import annotations

from collections.abc import Callable

from moesim.policies.base import EvictionPolicy, Knowledge, PolicySetup
from moesim.policies.registry import register_eviction


@register_eviction
class RandomEviction(EvictionPolicy):
    """Random eviction: a baseline with no notion of recency or frequency.
    Knows: nothing."""

    name = "my_random"
    knows = Knowledge.PAST
    params = {"among": 0}  # choose among the N oldest residents (0: all of them)

    def __init__(self, setup: PolicySetup) -> None:
        super().__init__(setup)
        self.resident: dict[int, None] = {}  # insertion order: oldest first
        self.among = int(setup.params.get("among", 0))

    def on_insert(self, key: int, prefetch: bool) -> None:
        self.resident[key] = None

    def on_access(self, key: int) -> None:
        pass  # no recency: an access changes nothing

    def on_evict(self, key: int) -> None:
        self.resident.pop(key, None)

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        keys = [k for k in self.resident if can_evict(k)]
        if self.among > 0:
            keys = keys[: self.among]
        if not keys:
            return None
        # The run's own generator (seeded by seed=): the same seed gives the same run.
        return keys[int(self.setup.rng.integers(len(keys)))]
