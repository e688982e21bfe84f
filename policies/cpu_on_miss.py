"""Fiddler's CPU execution (Kamahori et al., arXiv 2402.07033): a missed expert is computed
on the host CPU, where its weights already live, instead of being copied to the GPU.

Only activations cross the link: the layer's hidden states host-ward, the expert's outputs
back. Nothing is copied for a miss and nothing enters the cache, so the GPU holds only what
the eviction/prefetch policy placed there otherwise: pair it with ``policy=static`` for
Fiddler's own setup (the most popular experts resident on the GPU, chosen offline).

Deviations: Fiddler picks CPU or GPU with a cost rule (``fetch_or_cpu``); this placement is its
always-CPU end point. The CPU runs ``HostCpuModel.parallel`` experts at once (1 in Fiddler,
which gives one expert all cores); see the engine's docstring for the activation copies.
"""

from __future__ import annotations

from moesim.policies.base import CPU, PlacementContext, PlacementPolicy
from moesim.policies.registry import register_placement


@register_placement
class CpuOnMiss(PlacementPolicy):
    """Every non-resident routed expert runs on the host CPU."""

    name = "cpu_on_miss"
    uses_cpu = True

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return CPU
