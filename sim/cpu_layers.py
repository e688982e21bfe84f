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
    # per step: host attention, dense layer, shared experts, the runtime's per-layer host
    # costs and the hidden state's copy (computed once per distinct batch and context)
    whole: dict[tuple[int, int], tuple[float, ...]] = {}
    parts = np.zeros((num_s, 6))
    for s in range(num_s):
        b, ctx = int(tokens[s]), int(context[s])
        if (b, ctx) not in whole:
            whole[(b, ctx)] = (cpu.attention_time(b, ctx), cpu.dense_layer_time(b, ctx),
                               cpu.shared_time(b), host_time(compute, "attention", b),
                               host_time(compute, "dense_layer", b), d2h(b * activation_bytes))
        parts[s] = whole[(b, ctx)]
    attn, dense, shared, attn_h, dense_h, copy = parts.T
    n_dense = np.asarray(dense_cpu, dtype=np.float64)[layers]
    before[:, layers] = (attn + attn_h)[:, None] + n_dense[None, :] * (dense + dense_h)[:, None]
    before[:, first] += copy
    # routed experts: one execution per routed expert on the lane free first, in access order
    counts = w.counts  # type: ignore[attr-defined]
    n = np.ones(valid.shape, np.int64) if counts is None else counts[:, layers, :].astype(
        np.int64)
    n = np.where(valid, n, 0)
    top = int(n.max()) if n.size else 0
    table = np.array([cpu.expert_time(i) if i > 0 else 0.0 for i in range(top + 1)])
    each = table[n]  # [S, CPU layers, width]; 0 where no expert
    spent = each.sum(axis=2)
    if lanes == 1:
        makespan = spent
    else:
        makespan = np.zeros_like(spent)
        for s, c in np.ndindex(*spent.shape):
            free = [0.0] * lanes
            for r in range(width):
                if valid[s, c, r]:
                    lane = free.index(min(free))
                    free[lane] += float(each[s, c, r])
            makespan[s, c] = max(free)
    experts[:, layers] = shared[:, None] + makespan
    # the host's busy seconds: whole-layer ops hold every lane, each expert its own
    busy[:] = (lanes * (len(layers) * (attn + shared) + n_dense.sum() * dense)
               + spent.sum(axis=1))
    return CpuLayerTimes(on, before, experts, execs, busy)


__all__ = ["CpuLayerTimes", "cpu_layer_times"]
