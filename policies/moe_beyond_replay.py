"""MoE-Beyond (arXiv 2508.17137), replay of a prediction table: before layer l's experts are
accessed, load the experts predicted for that same (token, layer).

This is the protocol of MoE-Beyond's ``cache_simulator/infinity_moe_sim.py`` (repository HEAD
4dca2ea, predicted mode): the predicted top-6 are "accessed" just before the real ones (a
resident one is refreshed in LRU, an absent one inserted). Their prediction needs the token's
router input, so it is available only once layer l's attention is done (``point=routed``): in
timed mode it leaves no time to hide a copy. ``point=pre_attention`` is the hypothetical case of
the same prediction being known one attention earlier. Knows: predictions.

Deviations from their script: their warm-up also touches the row just after the warm-up window
(token 10, first layer) once more; here warm-up is exactly the first ``warmup_tokens`` tokens,
during which no predictions are inserted (``during_warmup=false``), as in their script.
"""

from __future__ import annotations

from moesim.policies.base import Knowledge, PointPrefetch, PolicyError
from moesim.policies.registry import register_prefetch


@register_prefetch
class MoEBeyondReplay(PointPrefetch):
    """Insert the predicted experts of the current layer before its accesses."""

    name = "moe_beyond_replay"
    knows = Knowledge.PREDICTIONS
    default_eviction = "lru"
    params = {"point": "routed", "during_warmup": False}
    points = ("routed", "pre_attention")

    def __init__(self, setup):
        super().__init__(setup)
        if setup.predictions is None:
            raise PolicyError("moe_beyond_replay needs a prediction table")
        self._warm = bool(setup.params.get("during_warmup", False))

    def issue(self, ctx, layer: int) -> None:
        if not self._warm and not ctx.clock.counting:
            return
        keys = self.setup.predictions.keys_at(ctx.clock.step, layer)
        if keys:
            ctx.prefetch(keys)
