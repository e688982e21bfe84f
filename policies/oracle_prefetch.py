"""Perfect prefetch: at a chosen point of layer l, queue exactly the experts layer l+d will use.

A bound (knows: oracle). ``point`` is where in the layer timeline the perfect prediction is
issued (``pre_attention``, ``routed`` or ``demand_issued``) and ``lookahead`` the distance d in
layers (0 = the same layer: with ``point=pre_attention`` this is the ideal pre-attention
predictor, whose only lead time is the attention itself). Lookahead crosses step boundaries.
"""

from __future__ import annotations

from policies.base import Knowledge, PolicyError, PrefetchPolicy
from policies.registry import register_prefetch

POINTS = ("pre_attention", "routed", "demand_issued")


@register_prefetch
class OraclePrefetch(PrefetchPolicy):
    """Prefetch the true future experts."""

    name = "oracle_prefetch"
    knows = Knowledge.ORACLE
    params = {"point": "demand_issued", "lookahead": 1}

    def __init__(self, setup):
        super().__init__(setup)
        if setup.future is None:
            raise PolicyError("oracle_prefetch needs future routing (oracle)")
        self._point = setup.params.get("point", "demand_issued")
        if self._point not in POINTS:
            raise PolicyError(f"oracle_prefetch: point {self._point!r} not one of {POINTS}")
        self._ahead = int(setup.params.get("lookahead", 1))
        if self._ahead < 0:
            raise PolicyError("oracle_prefetch: lookahead must be >= 0")

    def _issue(self, ctx, layer: int) -> None:
        num_layers = ctx.shape.num_layers
        step, target = divmod(ctx.clock.step * num_layers + layer + self._ahead, num_layers)
        keys = self.setup.future.keys_at(step, target)
        if keys:
            ctx.prefetch(keys)

    def on_pre_attention(self, ctx, layer):
        if self._point == "pre_attention":
            self._issue(ctx, layer)

    def on_routed(self, ctx, layer, keys):
        if self._point == "routed":
            self._issue(ctx, layer)

    def on_demand_issued(self, ctx, layer, keys):
        if self._point == "demand_issued":
            self._issue(ctx, layer)
