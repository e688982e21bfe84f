"""Layer-order offloading, as Hugging Face accelerate's ``device_map="auto"`` with CPU offload
runs a model that does not fit the GPU: the first ``gpu_layers`` decoder layers are resident
(``load_checkpoint_and_dispatch`` fills the fastest device first, in module order) and every
later layer stays in host memory; each of its modules with weights has a hook that copies them
to the GPU when it is called and drops them after (``AlignDevicesHook``). So an offloaded layer
costs, every token, its attention and router weights' copy, its shared experts' copy and each
routed expert's copy, each followed by its GPU kernel, one after another (a copy from host
memory waits for the stream and the host waits for it). Nothing of an offloaded layer is
cached, and no expert cache serves it: the cache budget and the eviction/prefetch policy serve
the resident layers (``policy=static`` with a cache that holds them is accelerate's).

Copy times are the run's link's (a runtime's per-copy cost and efficiency; under
``copy.whole_layer`` an offloaded layer's whole MoE block is copied once per step, whatever
its batch routes); the attention, shared-expert and dense-layer weights are one copy each at
their bytes.
Kernel times are the run's compute times. ``gpu_layers`` counts decoder layers, dense ones
included, as :mod:`moesim.policies.cpu_layers` does. The costs are
``sim.cpu_layers.offload_layer_times``, which both engines read.
"""

from __future__ import annotations

from moesim.policies.base import FETCH, PlacementContext
from moesim.policies.cpu_layers import CpuLayers
from moesim.policies.registry import register_placement


@register_placement
class LayerOffload(CpuLayers):
    """The first ``gpu_layers`` decoder layers resident on the GPU, every later layer's weights
    copied in at each call (accelerate ``device_map="auto"`` with CPU offload)."""

    name = "layer_offload"
    uses_cpu = False
    whole_layers = "copied"
    params = {"gpu_layers": None}
    counted_as = "in module order, as accelerate's device_map fills them"

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return FETCH  # the engine serves offloaded layers whole and never asks for them
