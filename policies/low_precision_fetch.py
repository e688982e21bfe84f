"""HOBBIT's mixed-precision loading (Tang et al., arXiv 2411.01433): a cache-miss expert whose
gate weight is small is replaced by a low-precision copy, which is cheaper to load.

HOBBIT judges how critical a missed expert is from its gating weight and loads an int4 (or
int8) version of the less critical ones; accuracy stays close because those experts
contribute little to the layer's output. Here: when the expert's normalised gate weight (its
router weight over the sum of the token's top-k weights; with batches, the largest over the
tokens that chose it) is below ``threshold``, ``bits``-bit bytes are copied, i.e.
``expert_bytes * bits / dtype_bits``, as a demand copy on the host link; the GPU computes the
expert when it lands (same compute time: dequantisation is not modelled).

Deviations: HOBBIT keeps low-precision experts in a cache of their own (its multidimensional
caching); here a low-precision copy is not cached at all (it is used by the layer and dropped,
outside the cache budget), so the next use misses again. HOBBIT tunes its threshold per model
offline; here it is one global parameter. Traces without router weights are refused.
"""

from __future__ import annotations

from moesim.policies.base import (
    FETCH,
    LOW_PRECISION,
    PlacementContext,
    PlacementPolicy,
    PolicyError,
)
from moesim.policies.registry import register_placement


@register_placement
class LowPrecisionFetch(PlacementPolicy):
    """Low-precision copy of a missed expert whose weight is below ``threshold``."""

    name = "low_precision_fetch"
    needs_gate_weights = True
    approximates = True
    params = {"threshold": 0.1, "bits": 4}

    def __init__(self, setup):
        super().__init__(setup)
        self.threshold = float(setup.params.get("threshold", 0.1))
        self.bits = setup.params.get("bits", 4)
        if not 0.0 <= self.threshold <= 1.0:
            raise PolicyError(f"low_precision_fetch: threshold must be in [0, 1], got "
                              f"{self.threshold}")
        if isinstance(self.bits, bool) or self.bits not in (2, 3, 4, 8):
            raise PolicyError(f"low_precision_fetch: bits must be 2, 3, 4 or 8, got "
                              f"{self.bits!r}")

    def low_precision_bits(self) -> int:
        return int(self.bits)

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return LOW_PRECISION if weight < self.threshold else FETCH
