"""What a layer the engine times whole costs: placement ``cpu_layers`` (llama.cpp's ``-ngl``:
the layer on the host CPU) and ``layer_offload`` (accelerate: the layer on the GPU, its weights
copied in at every call). One function per placement, :func:`cpu_layer_times` and
:func:`offload_layer_times`, whose arrays both engines read (``sim.engine`` yields them,
``sim.compiled.kernel.replay`` adds them), so the two cannot differ in a cost.

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
split, so no copy back is charged. A CPU layer is host time: on a runtime whose copies share
the compute stream the link runs through it (``mode`` 1).

An offloaded layer (``layer_offload``) takes, one after another (a copy from host memory waits
for the stream, and the host for the copy): before its routing, its attention and router
weights' copy (``HostSide.attention_bytes``) and the GPU's attention and router time, and
for each dense layer just before it that is offloaded too its weights' copy
(``HostSide.dense_bytes``) and its GPU time; after its routing, its shared experts' copy and
GPU time, then each routed expert's copy (``shape.expert_bytes``, the link's own
``transfer_time``: a runtime's ``copy.whole_layer`` factor applies) and GPU time. The other
parts are one copy each at their bytes (the link's per-copy cost and efficiency, not its
whole-layer factor). These copies are not on the simulated link: on a runtime with its own
copy stream, prefetches of resident layers do not queue behind them; on the compute stream
the link's clock stops during an offloaded layer (``mode`` 2), as during kernels. In
zero-latency runs every time is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moesim.sim.hardware import HostCpuTimes
from moesim.sim.link import host_time

HOST, COPIED = 1, 2  # CpuLayerTimes.on_cpu: a layer on the host, a layer copied in per call


def _per_step(workload: object, n: int,
              parts_of: Callable[[int, int], tuple[float, ...]]) -> np.ndarray:
    """``[steps, n]``: ``parts_of(batch, context)`` of every step, computed once per distinct
    (batch, context) pair (a decode step's costs depend on nothing else)."""
    tokens = workload.tokens.tolist()  # type: ignore[attr-defined]
    context = workload.context.tolist()  # type: ignore[attr-defined]
    memo: dict[tuple[int, int], tuple[float, ...]] = {}
    out = np.zeros((len(tokens), n))
    for s, (b, ctx) in enumerate(zip(tokens, context, strict=True)):
        key = (int(b), int(ctx))
        if key not in memo:
            memo[key] = parts_of(*key)
        out[s] = memo[key]
    return out


@dataclass(frozen=True)
class CpuLayerTimes:
    """Per step and MoE layer: seconds before and after the routing of a layer the engine
    times whole (0 for any other layer); per step: routed experts run on the host, the host's
    busy seconds (all lanes: a whole-layer op holds every lane) and routed experts copied in
    (``layer_offload``: demand copies outside the simulated link)."""

    on_cpu: np.ndarray  # int64 [L]: 0, HOST or COPIED
    before: np.ndarray  # [S, L]
    experts: np.ndarray  # [S, L]
    execs: np.ndarray  # int64 [S]
    busy: np.ndarray  # [S]
    copied: np.ndarray  # int64 [S]


def cpu_layer_times(workload: object, cpu_layers: Sequence[int], dense_cpu: Sequence[int],
                    cpu: HostCpuTimes | None, d2h: Callable[[int], float] | None,
                    compute: object | None, activation_bytes: int = 0,
                    dense_gpu: Sequence[int] = ()) -> CpuLayerTimes:
    """The cost arrays of ``workload`` (``sim.workload.Workload``) with MoE layers
    ``cpu_layers`` on the host and ``dense_cpu[j]`` dense layers before MoE layer ``j`` on the
    host; ``activation_bytes``: one token's hidden state; ``dense_gpu[j]``: dense layers just
    before MoE layer ``j`` still on the GPU (the split falls after them: charged at the GPU's
    ``dense_layer_time`` before the layer's host part, as part of its time before routing).
    ``cpu`` None, ``d2h`` None (seconds to copy ``n`` bytes device-to-host) and ``compute``
    None: a zero-latency run (every time 0)."""
    w = workload
    keys = w.keys  # type: ignore[attr-defined]
    num_s, num_l, width = keys.shape
    on = np.zeros(num_l, np.int64)
    on[list(cpu_layers)] = HOST
    before = np.zeros((num_s, num_l))
    experts = np.zeros((num_s, num_l))
    execs = np.zeros(num_s, np.int64)
    busy = np.zeros(num_s)
    none = np.zeros(num_s, np.int64)
    if not on.any():
        return CpuLayerTimes(on, before, experts, execs, busy, none)
    layers = np.flatnonzero(on).tolist()
    first = layers[0]
    valid = keys[:, layers, :] >= 0
    execs[:] = valid.reshape(num_s, -1).sum(axis=1)
    timed = cpu is not None
    if not timed:
        return CpuLayerTimes(on, before, experts, execs, busy, none)
    assert d2h is not None
    lanes = max(1, int(cpu.parallel))
    # per step: host attention, dense layer, shared experts, the runtime's per-layer host
    # costs and the hidden state's copy
    parts = _per_step(w, 7, lambda b, ctx: (
        cpu.attention_time(b, ctx), cpu.dense_layer_time(b, ctx), cpu.shared_time(b),
        host_time(compute, "attention", b), host_time(compute, "dense_layer", b),
        d2h(b * activation_bytes), _gpu_dense(compute, b, ctx)))
    attn, dense, shared, attn_h, dense_h, copy, gpu_dense = parts.T
    n_dense = np.asarray(dense_cpu, dtype=np.float64)[layers]
    before[:, layers] = (attn + attn_h)[:, None] + n_dense[None, :] * (dense + dense_h)[:, None]
    before[:, layers] += _on_gpu(dense_gpu, layers)[None, :] * gpu_dense[:, None]
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
    return CpuLayerTimes(on, before, experts, execs, busy, none)


def _gpu_dense(compute: object, b: int, ctx: int) -> float:
    """One dense decoder layer on the GPU (the GPU path's ``dense_layer_time``)."""
    return float(compute.dense_layer_time(b, ctx))  # type: ignore[attr-defined]


def _on_gpu(dense_gpu: Sequence[int], cols: Sequence[int]) -> np.ndarray:
    """Per listed MoE layer, the dense layers just before it that stay on the GPU."""
    if not len(dense_gpu):
        return np.zeros(len(cols))
    return np.asarray(dense_gpu, dtype=np.float64)[list(cols)]


def _module_copy(link: object, nbytes: int) -> float:
    """One copy of a module's weights: the link's per-copy cost and rate, without a runtime's
    whole-layer factor (which scales routed-expert copies only)."""
    if nbytes <= 0:
        return 0.0
    factor = float(getattr(link, "bytes_factor", 1.0))
    return float(link.transfer_time(round(nbytes / factor)))  # type: ignore[attr-defined]


def offload_layer_times(workload: object, layers: Sequence[int], dense_off: Sequence[int],
                        link: object | None, compute: object | None, expert_bytes: int,
                        attention_bytes: int, shared_bytes: int, dense_bytes: int,
                        dense_gpu: Sequence[int] = (), top_k: int = 0) -> CpuLayerTimes:
    """The cost arrays of ``workload`` with MoE layers ``layers`` offloaded (their weights
    copied in at each call), ``dense_off[j]`` offloaded dense layers before MoE layer ``j``
    and ``dense_gpu[j]`` resident ones (no copy); ``link`` and ``compute`` None: a
    zero-latency run (every time 0).

    A whole-layer runtime (``copy.whole_layer``: the link's ``bytes_factor`` is num_experts /
    top_k) moves an offloaded layer's whole MoE block once per step, whatever its batch
    routes: ``top_k`` of its per-expert copies (the block's bytes and tensors), then each
    routed expert's kernel. Charging that copy per routed expert, as a cached layer's miss
    is, would move the block once per top_k distinct experts: exact at batch 1, up to
    num_experts / top_k blocks per layer at a large batch."""
    w = workload
    keys = w.keys  # type: ignore[attr-defined]
    num_s, num_l, _ = keys.shape
    on = np.zeros(num_l, np.int64)
    on[list(layers)] = COPIED
    before = np.zeros((num_s, num_l))
    experts = np.zeros((num_s, num_l))
    zero = np.zeros(num_s, np.int64)
    copied = np.zeros(num_s, np.int64)
    if not on.any():
        return CpuLayerTimes(on, before, experts, zero, np.zeros(num_s), copied)
    cols = np.flatnonzero(on).tolist()
    valid = keys[:, cols, :] >= 0
    copied[:] = valid.reshape(num_s, -1).sum(axis=1)
    if link is None or compute is None:
        return CpuLayerTimes(on, before, experts, zero, np.zeros(num_s), copied)
    c = compute
    attn_copy = _module_copy(link, attention_bytes)
    dense_copy = _module_copy(link, dense_bytes)
    shared_copy = _module_copy(link, shared_bytes)
    expert_copy = float(link.transfer_time(expert_bytes))  # type: ignore[attr-defined]
    def offloaded(b: int, ctx: int) -> tuple[float, ...]:
        sh = float(c.shared_time(b))  # type: ignore[attr-defined]
        return (attn_copy + float(c.attention_time(b, ctx))  # type: ignore[attr-defined]
                + float(c.router_time(b)),  # type: ignore[attr-defined]
                dense_copy + float(c.dense_layer_time(b, ctx)),  # type: ignore[attr-defined]
                shared_copy + sh if sh > 0 else 0.0)

    parts = _per_step(w, 4, lambda b, ctx: (*offloaded(b, ctx), _gpu_dense(c, b, ctx)))
    attn, dense, shared, gpu_dense = parts.T
    n_dense = np.asarray(dense_off, dtype=np.float64)[cols]
    before[:, cols] = attn[:, None] + n_dense[None, :] * dense[:, None]
    before[:, cols] += _on_gpu(dense_gpu, cols)[None, :] * gpu_dense[:, None]
    counts = w.counts  # type: ignore[attr-defined]
    n = np.ones(valid.shape, np.int64) if counts is None else counts[:, cols, :].astype(
        np.int64)
    n = np.where(valid, n, 0)
    top = int(n.max()) if n.size else 0
    whole = float(getattr(link, "bytes_factor", 1.0)) != 1.0
    if whole and top_k < 1:
        raise ValueError("offload_layer_times: a whole-layer link needs the model's top_k")
    per_expert = 0.0 if whole else expert_copy
    table = np.array([per_expert + float(c.expert_time(i)) if i > 0 else 0.0  # type: ignore[attr-defined]
                      for i in range(top + 1)])
    experts[:, cols] = shared[:, None] + table[n].sum(axis=2)
    if whole:  # the block, once per offloaded layer and step that routes to it
        experts[:, cols] += np.where(valid.any(axis=2), top_k * expert_copy, 0.0)
    return CpuLayerTimes(on, before, experts, zero, np.zeros(num_s), copied)


__all__ = ["COPIED", "HOST", "CpuLayerTimes", "cpu_layer_times", "offload_layer_times"]
