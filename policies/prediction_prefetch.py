"""Prefetch from a prediction table: at ``point`` of layer l, load the experts predicted for
layer l + ``ahead`` of the same step.

This is how learned and analytic predictors reach the simulator (predictors/ writes the
tables; the simulator never imports torch). The point and distance encode *when* a predictor's
output exists, which is what separates the seeds:

- pre-attention prediction (arXiv 2511.10676): ``point=pre_attention ahead=0`` (the same
  layer's normalised input, before attention);
- Fate (arXiv 2502.12224): ``point=demand_issued ahead=1`` (layer l+1's gate on layer l's
  router input, known once layer l routes; issued behind l's demand);
- MoE-Beyond's predictor: ``point=routed ahead=0`` (see also ``moe_beyond_replay``).

``top`` keeps the first n predicted experts of each row (0 = all the table gives, e.g. a
predictor's top-k' for over-provisioning). Predictions never cross into the next step: a
token's routing cannot be predicted before the token exists. Knows: predictions.
"""

from __future__ import annotations

import re

from moesim.policies.base import Knowledge, PointPrefetch, PolicyError
from moesim.policies.registry import register_prefetch


def available(tag: str, point: str, ahead: int) -> bool:
    """Whether a table tagged ``tag`` can be used at ``point`` of layer l for layer l+ahead.

    Tags: ``pre_attention:same_layer`` (known at layer l's pre-attention point),
    ``routed:same_layer`` (once layer l routes), ``routed:prev_layer`` (once layer l-1 routes,
    i.e. before layer l starts), ``routed:minus{h}_layer`` (once layer l-h routes),
    ``token_start:any_layer`` (known when the token starts, e.g. from its text: any point of
    the step), ``prompt:complete`` (needs the whole prompt, e.g. MoE-Beyond's unmasked
    transformer: never, in a replay that runs token by token). Other tags (baselines that are
    known early, e.g. ``static:any_layer``) are not checked.
    """
    if tag == "prompt:complete":
        return False
    if tag == "pre_attention:same_layer":
        return ahead == 0
    if tag == "routed:same_layer":
        return ahead == 0 and point != "pre_attention"
    if tag == "routed:prev_layer":
        return ahead == 0 or (ahead == 1 and point != "pre_attention")
    if m := re.fullmatch(r"routed:minus(\d+)_layer", tag):  # known once layer l-h routes
        h = int(m[1])
        return ahead <= h - 1 or (ahead == h and point != "pre_attention")
    return True


@register_prefetch
class PredictionPrefetch(PointPrefetch):
    """Prefetch predicted experts at a configurable point and distance."""

    name = "prediction_prefetch"
    knows = Knowledge.PREDICTIONS
    default_eviction = "lru"
    params = {"point": "pre_attention", "ahead": 0, "top": 0, "check_availability": True}

    def __init__(self, setup):
        super().__init__(setup)
        if setup.predictions is None:
            raise PolicyError("prediction_prefetch needs a prediction table (predictions.path)")
        self._ahead = int(setup.params.get("ahead", 0))
        self._top = int(setup.params.get("top", 0))
        if self._ahead < 0 or self._top < 0:
            raise PolicyError("prediction_prefetch: ahead and top must be >= 0")
        tag = getattr(setup.predictions, "available_at", None)
        if setup.params.get("check_availability", True) and tag is not None and not available(
            tag, self.point, self._ahead
        ):
            raise PolicyError(
                f"prediction_prefetch: the table's predictions exist at {tag!r}, which is later "
                f"than point={self.point} ahead={self._ahead} (set "
                "policy.check_availability=false for a what-if run)"
            )

    def issue(self, ctx, layer: int) -> None:
        target = layer + self._ahead
        if target >= ctx.shape.num_layers:
            return
        keys = self.setup.predictions.keys_at(ctx.clock.step, target)
        if self._top:
            keys = keys[: self._top]
        if keys:
            ctx.prefetch(keys)
