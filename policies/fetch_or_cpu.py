"""Fiddler's cost rule (Kamahori et al., arXiv 2402.07033): for a missed expert, the cheaper
of copying its weights to the GPU and computing it there, or computing it on the host CPU.

Fiddler compares the CPU's execution time for the expert's input tokens (it grows with the
tokens; profiled offline) against the weight-transfer time (constant per expert). Here both
sides are queue-aware, as the issue asks: the copy waits behind the copies already booked on
the host link, the CPU execution behind the CPU work already booked in this layer and its
output copy behind the copies booked on the link, and both include their own activation or
compute times (``PlacementContext.fetch_cost`` /
``cpu_cost``). Ties fetch (the copy is then cached for later tokens).

Deviations: Fiddler's experts on the GPU are a static popular set; here the cache is whatever
the eviction/prefetch policy keeps, and a fetched expert is cached like any demand copy. The
rule needs costs, so the placement runs in timed mode only.
"""

from __future__ import annotations

from moesim.policies.base import CPU, FETCH, PlacementContext, PlacementPolicy
from moesim.policies.registry import register_placement


@register_placement
class FetchOrCpu(PlacementPolicy):
    """CPU when its queue-aware cost is strictly below the copy's, else fetch."""

    name = "fetch_or_cpu"
    uses_cpu = True
    timed_only = True

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return CPU if ctx.cpu_cost(tokens) < ctx.fetch_cost(tokens) else FETCH
