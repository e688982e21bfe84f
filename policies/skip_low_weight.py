"""AdapMoE-style adaptive gating (Zhong et al., arXiv 2408.10284): drop a routed expert whose
normalised gate weight is small, instead of loading it.

AdapMoE activates fewer experts for tokens whose gate weights are concentrated: with
sensitivity analysis it shows that an expert's contribution to the loss scales with its gate
weight, and skips the lower-ranked expert when its weight falls below a threshold (set per
layer from that sensitivity). Here: a routed expert that is *not resident* when its layer
routes is skipped when its normalised gate weight (router weight over the sum of the token's
top-k weights; with batches, the largest over the tokens that chose it) is below
``threshold``; its gate mass is reported as skipped (``gate_mass_skipped``).

Deviations: AdapMoE's gating drops low-weight experts whether or not they are cached; here
resident experts always compute (skipping them would save no copy, only GPU compute) and only
misses are dropped, so the quality cost is spent only where it saves a transfer. One global
threshold instead of AdapMoE's per-layer, sensitivity-derived thresholds; AdapMoE's cache
sizing per layer is not part of this placement. Traces without router weights are refused.
"""

from __future__ import annotations

from moesim.policies.base import FETCH, SKIP, PlacementContext, PlacementPolicy, PolicyError
from moesim.policies.registry import register_placement


@register_placement
class SkipLowWeight(PlacementPolicy):
    """Skip a missed expert whose normalised gate weight is below ``threshold``."""

    name = "skip_low_weight"
    needs_gate_weights = True
    approximates = True
    params = {"threshold": 0.1}

    def __init__(self, setup):
        super().__init__(setup)
        self.threshold = float(setup.params.get("threshold", 0.1))
        if not 0.0 <= self.threshold <= 1.0:
            raise PolicyError(f"skip_low_weight: threshold must be in [0, 1], got "
                              f"{self.threshold}")

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return SKIP if weight < self.threshold else FETCH
