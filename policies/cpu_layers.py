"""Whole layers on the host CPU, as llama.cpp's ``-ngl N`` (``--n-gpu-layers``) and Ollama's
``num_gpu`` split a model that does not fit the GPU: the first ``gpu_layers`` decoder layers
(attention, router, shared and routed experts) run on the GPU; every later layer runs whole on
the host CPU, attention with its KV cache included. Only the hidden state crosses the link, once
per token, at the first CPU layer; nothing of a CPU layer is copied and none of its experts
takes a cache slot. The cache budget and the eviction/prefetch policy serve the GPU layers
(llama.cpp keeps them all resident: ``policy=static`` with a cache that holds them).

``gpu_layers`` counts decoder layers, dense ones included, as ``-ngl`` does (DeepSeek-V2-Lite's
dense first layer is one of them); the engine maps it onto MoE layers with the run's dense
layout (``_dense_before``, which the engine puts in the placement's parameters). llama.cpp's
``-ngl`` also counts the output layer (``-ngl L+1`` puts everything on the GPU): here the LM head
is not simulated, so any ``gpu_layers >= L`` is "every layer on the GPU".

The times of a CPU layer come from ``HostCpuTimes`` (``attention_time``, ``shared_time``,
``dense_layer_time``, ``expert_time``: ``hw_profiles.host_cpu.HostCpuModel`` under the
runtime's CPU kernels), summed by ``sim.cpu_layers.cpu_layer_times``, which both engines use.
"""

from __future__ import annotations

from collections.abc import Sequence

from moesim.policies.base import CPU, FETCH, PlacementContext, PlacementPolicy, PolicyError
from moesim.policies.registry import register_placement


def layer_split(gpu_layers: int, dense_before: Sequence[int]) -> tuple[list[int], list[int]]:
    """(MoE layers on the CPU, per MoE layer the dense layers just before it on the CPU) when
    the first ``gpu_layers`` decoder layers are on the GPU. ``dense_before[j]`` dense layers
    run just before MoE layer ``j`` (``sim.run.dense_layers_before``)."""
    cpu, dense = [], []
    index = 0  # decoder index of the next layer
    for j, n in enumerate(dense_before):
        dense.append(sum(1 for d in range(index, index + int(n)) if d >= gpu_layers))
        index += int(n)
        if index >= gpu_layers:
            cpu.append(j)
        index += 1
    return cpu, dense


@register_placement
class CpuLayers(PlacementPolicy):
    """The first ``gpu_layers`` decoder layers on the GPU, every later layer whole
    (attention included) on the host CPU (llama.cpp ``-ngl``)."""

    name = "cpu_layers"
    uses_cpu = True
    whole_layers = "cpu"
    params = {"gpu_layers": None}
    counted_as = "as llama.cpp's -ngl"  # how the error message says the layers are counted

    def __init__(self, setup):
        super().__init__(setup)
        n = setup.params.get("gpu_layers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PolicyError(f"{self.name}: gpu_layers must be a whole number >= 0 (decoder "
                              f"layers on the GPU, {self.counted_as}), got {n!r}")
        self.gpu_layers = n
        num_l = setup.shape.num_layers
        dense_before = setup.params.get("_dense_before") or [0] * num_l
        if len(dense_before) != num_l:
            raise PolicyError(f"{self.name}: dense layout of {len(dense_before)} MoE layers "
                              f"for a model of {num_l}")
        self._cpu, self._dense = layer_split(n, dense_before)
        self._first = self._cpu[0] if self._cpu else num_l
        self._num_e = setup.shape.num_experts

    def cpu_layers(self) -> list[int]:
        return list(self._cpu)

    def cpu_dense_layers(self) -> list[int]:
        """Per MoE layer, the dense decoder layers just before it that run on the CPU."""
        return list(self._dense)

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        # the engine serves CPU layers whole and never asks for them; a GPU layer fetches
        return CPU if key // self._num_e >= self._first else FETCH
