"""Fetch the whole next layer: after layer l's demand fetches, queue every expert of layer l+1.

Layer staging as in SE-MoE / experts4bit. Knows: past only (it fetches everything).
With ``wrap`` the last layer queues layer 0 of the next step.
"""

from __future__ import annotations

from moesim.policies.base import PrefetchPolicy
from moesim.policies.registry import register_prefetch


@register_prefetch
class NextLayerAll(PrefetchPolicy):
    """Prefetch all experts of the following MoE layer."""

    name = "next_layer_all"
    params = {"wrap": True}

    def on_demand_issued(self, ctx, layer, keys):
        shape = ctx.shape
        nxt = layer + 1
        if nxt >= shape.num_layers:
            if not self.setup.params.get("wrap", True):
                return
            nxt = 0
        base = nxt * shape.num_experts
        ctx.prefetch(range(base, base + shape.num_experts))
