"""What a layer run whole on the host CPU costs (placement ``cpu_layers``, llama.cpp's ``-ngl``):
one function, :func:`cpu_layer_times`, whose arrays both engines read (``sim.engine`` yields
them, ``sim.compiled.kernel.replay`` adds them), so the two cannot differ in a cost.

A CPU layer ``j`` of step ``s`` takes, in the layer timeline every policy sees:

* before its routing (``before[s, j]``): at the first CPU layer of the step, the hidden state
  copied host-ward (``tokens x activation_bytes`` over the link's device-to-host direction,
  where nothing else queues in this model); the dense decoder layers just before it that are
  on the CPU (``HostCpuTimes.dense_layer_time`` each, plus the runtime's per-layer host cost);
  its attention and router on the host (``HostCpuTimes.attention_time``: the attention
  weights at their bits, the KV cache for the step's context) plus the runtime's per-layer
  host cost (``sim.link.host_time(compute, "attention", b)``: ``overhead.layer_s`` and the
  share of ``overhead.step_s``; graph building and sampling do not move with the layer);
* after its routing (``experts[s, j]``): its shared experts (``HostCpuTimes.shared_time``),
  then its routed experts on the host's ``parallel`` lanes, each on the lane free first in
  the layer's access order (``HostCpuTimes.expert_time`` for its tokens), until the last ends.

Nothing of a CPU layer is copied to the GPU and nothing is cached. The GPU layers after the
CPU layers of a step (none: CPU layers are the last ones) would need the hidden state back; the
next step starts from the token's embedding, which llama.cpp computes on the host whatever the
split, so no copy back is charged. In zero-latency runs every time is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moesim.sim.hardware import HostCpuTimes
from moesim.sim.link import host_time


@dataclass(frozen=True)
class CpuLayerTimes:
    """Per step and MoE layer: seconds before and after the routing of a CPU layer (0 for a
    GPU layer); per step: routed experts run on the host and the host's busy seconds (all
    lanes: a whole-layer op holds every lane)."""

    on_cpu: np.ndarray  # bool [L]
    before: np.ndarray  # [S, L]
    experts: np.ndarray  # [S, L]
    execs: np.ndarray  # int64 [S]
    busy: np.ndarray  # [S]


def cpu_layer_times(workload: object, cpu_layers: Sequence[int], dense_cpu: Sequence[int],
                    cpu: HostCpuTimes | None, d2h: Callable[[int], float] | None,
                    compute: object | None, activation_bytes: int = 0) -> CpuLayerTimes:
    """The cost arrays of ``workload`` (``sim.workload.Workload``) with MoE layers
    ``cpu_layers`` on the host and ``dense_cpu[j]`` dense layers before MoE layer ``j`` on the
    host; ``activation_bytes``: one token's hidden state. ``cpu`` None, ``d2h`` None (seconds
    to copy ``n`` bytes device-to-host) and ``compute`` None: a zero-latency run (every time
    0)."""
    w = workload
    keys = w.keys  # type: ignore[attr-defined]
    num_s, num_l, width = keys.shape
    on = np.zeros(num_l, np.bool_)
    on[list(cpu_layers)] = True
    before = np.zeros((num_s, num_l))
    experts = np.zeros((num_s, num_l))
    execs = np.zeros(num_s, np.int64)
    busy = np.zeros(num_s)
    if not on.any():
        return CpuLayerTimes(on, before, experts, execs, busy)
    layers = np.flatnonzero(on).tolist()
    first = layers[0]
    valid = keys[:, layers, :] >= 0
    execs[:] = valid.reshape(num_s, -1).sum(axis=1)
    timed = cpu is not None
    if not timed:
        return CpuLayerTimes(on, before, experts, execs, busy)
    assert d2h is not None
    lanes = max(1, int(cpu.parallel))
    tokens = w.tokens.tolist()  # type: ignore[attr-defined]
    context = w.context.tolist()  # type: ignore[attr-defined]
    counts = w.counts  # type: ignore[attr-defined]
    one: dict[int, float] = {}
    whole: dict[tuple[int, int], tuple[float, float, float, float, float]] = {}
    for s in range(num_s):
        b, ctx = int(tokens[s]), int(context[s])
        if (b, ctx) not in whole:
            whole[(b, ctx)] = (cpu.attention_time(b, ctx), cpu.dense_layer_time(b, ctx),
                               cpu.shared_time(b), host_time(compute, "attention", b),
                               host_time(compute, "dense_layer", b))
        attn, dense, shared, attn_h, dense_h = whole[(b, ctx)]
        total_busy = 0.0
        for j in layers:
            t = attn + attn_h
            if dense_cpu[j]:
                t += dense_cpu[j] * (dense + dense_h)
            if j == first:
                t += d2h(b * activation_bytes)
            before[s, j] = t
            free = [0.0] * lanes
            spent = 0.0
            for r in range(width):
                if keys[s, j, r] < 0:
                    continue
                n = 1 if counts is None else int(counts[s, j, r])
                if n not in one:
                    one[n] = cpu.expert_time(n)
                lane = free.index(min(free))
                free[lane] += one[n]
                spent += one[n]
            experts[s, j] = shared + max(free)
            total_busy += lanes * (attn + dense_cpu[j] * dense + shared) + spent
        busy[s] = total_busy
    return CpuLayerTimes(on, before, experts, execs, busy)


__all__ = ["CpuLayerTimes", "cpu_layer_times"]
