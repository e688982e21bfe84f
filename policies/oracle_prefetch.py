"""Perfect prefetch: at a chosen point of layer l, queue exactly the experts layer l+d will use.

A bound (knows: oracle). ``point`` is where in the layer timeline the perfect prediction is
issued (``pre_attention``, ``routed`` or ``demand_issued``) and ``lookahead`` the distance d in
layers (0 = the same layer: with ``point=pre_attention`` this is the ideal pre-attention
predictor, whose only lead time is the attention itself). Lookahead crosses step boundaries.
"""

from __future__ import annotations

from moesim.policies.base import Knowledge, PointPrefetch, PolicyError
from moesim.policies.registry import register_prefetch


@register_prefetch
class OraclePrefetch(PointPrefetch):
    """Prefetch the true future experts."""

    name = "oracle_prefetch"
    knows = Knowledge.ORACLE
    params = {"point": "demand_issued", "lookahead": 1}

    def __init__(self, setup):
        super().__init__(setup)
        if setup.future is None:
            raise PolicyError("oracle_prefetch needs future routing (oracle)")
        self._ahead = int(setup.params.get("lookahead", 1))
        if self._ahead < 0:
            raise PolicyError("oracle_prefetch: lookahead must be >= 0")

    def issue(self, ctx, layer: int) -> None:
        num_layers = ctx.shape.num_layers
        step, target = divmod(ctx.clock.step * num_layers + layer + self._ahead, num_layers)
        keys = self.setup.future.keys_at(step, target)
        if keys:
            ctx.prefetch(keys)
