"""Static CPU offload of routed experts, as llama.cpp's ``--n-cpu-moe N`` (``-ot exps=CPU``
for all layers) and kTransformers run MoE models on one GPU: the routed experts of the first
``layers`` MoE layers always compute on the host CPU and never take a GPU cache slot; attention,
router and shared experts stay on the GPU. The cache budget and the eviction/prefetch policy
serve the remaining layers, whose misses are fetched as usual. ``layers`` null picks N as
llama.cpp users do: the fewest first layers such that every routed expert of the other layers
fits in the cache (``N = L - capacity // num_experts``); ``layers`` >= the number of MoE layers
puts every routed expert on the CPU (kTransformers, ``-ot exps=CPU``).

Deviations: llama.cpp counts ``N`` over all decoder layers (dense ones hold no routed experts,
so their count does not matter); here ``layers`` counts MoE layers. Both systems give the CPU
work of a whole layer to one thread pool: ``HostCpuModel.parallel`` sets how many experts run
at once. kTransformers overlaps CPU experts with the GPU's shared expert, as the engine does.
"""

from __future__ import annotations

from moesim.policies.base import CPU, FETCH, PlacementContext, PlacementPolicy, PolicyError
from moesim.policies.registry import register_placement


@register_placement
class StaticCpu(PlacementPolicy):
    """Routed experts of the first ``layers`` MoE layers on the CPU (null: as many as do not
    fit in the cache), the rest fetched."""

    name = "static_cpu"
    uses_cpu = True
    params = {"layers": None}

    def __init__(self, setup):
        super().__init__(setup)
        n = setup.params.get("layers")
        num_l = setup.shape.num_layers
        if n is None:  # the rest fits in the cache
            n = max(num_l - setup.capacity // setup.shape.num_experts, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PolicyError(f"static_cpu: layers must be a whole number >= 0, got {n!r}")
        self._n = min(n, num_l)
        self._num_e = setup.shape.num_experts

    def cpu_layers(self) -> list[int]:
        return list(range(self._n))

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return CPU if key // self._num_e < self._n else FETCH
