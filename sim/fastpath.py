"""Compiled replay of demand-only LRU and FIFO runs (numba), for sweeps over big traces.

Without prefetching the timed model has a closed form per layer: the link is idle when a
layer's routing is known (the previous layer waited for all of its copies), so the i-th miss
of the layer arrives at ``t + (i // engines + 1) * transfer`` and the experts compute in the
same order as in :mod:`sim.engine`: resident ones first, then the misses as they arrive. Hit
and miss decisions do not depend on time at all. The general engine stays the reference;
``tests/sim/test_fastpath.py`` checks that both give the same metrics on random runs, and
``Simulation.run`` uses this path only where that equivalence holds (see :func:`applicable`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np

from sim.cache import SimulationError

if TYPE_CHECKING:
    from sim.engine import Simulation

KERNELS = {"lru": 0, "fifo": 1}


def applicable(sim: Simulation) -> bool:
    """True when the compiled replay gives exactly the engine's result for this run."""
    return (
        sim.ropts.engine != "python"
        and sim.spec.eviction.name in KERNELS
        and sim.spec.eviction.__module__ in ("policies.lru", "policies.fifo")
        and sim.spec.prefetch.name == "none"
        and sim.copts.prefill == "empty"
        and not sim.copts.reset_per_request
        and not sim.ropts.record_transfers
        and sim.ropts.timeline_steps == 0
    )


@numba.njit(cache=True, nogil=True)
def _replay(keys, counts, use_counts, counted, attn, shared, dense_step, dense_n, part, caps,
            num_keys, engines, transfer, cost, timed, pin, policy):  # pragma: no cover - jitted
    num_s, num_l, width = keys.shape
    num_p = caps.shape[0]
    prev = np.full(num_keys, -1, np.int64)
    nxt = np.full(num_keys, -1, np.int64)
    in_cache = np.zeros(num_keys, np.bool_)
    pin_stamp = np.zeros(num_keys, np.int64)
    head = np.full(num_p, -1, np.int64)
    tail = np.full(num_p, -1, np.int64)
    used = np.zeros(num_p, np.int64)
    layer_counts = np.zeros((4, num_l), np.int64)  # sim.metrics kinds: hit, late, promoted, miss
    layer_stall = np.zeros(num_l)
    miss_dur = np.zeros(width)
    is_hit = np.zeros(width, np.bool_)
    dur = np.zeros(width)
    stamp = 0
    t = 0.0
    counted_time = 0.0
    stall_miss = 0.0
    evictions = 0
    demand = 0
    misses_all = 0
    for s in range(num_s):
        cnt = counted[s]
        step_start = t
        for j in range(num_l):
            p = part[j]
            if timed:
                d = attn[s]
                if dense_n[j]:
                    d += dense_n[j] * dense_step[s]
                if d > 0:
                    t = t + d
            stamp += 1
            n = 0
            for r in range(width):
                k = keys[s, j, r]
                if k >= 0:
                    n += 1
                    if pin:
                        pin_stamp[k] = stamp
            m = 0
            for r in range(n):
                k = keys[s, j, r]
                dur[r] = cost[counts[s, j, r]] if use_counts else cost[1]
                if in_cache[k]:
                    is_hit[r] = True
                    if cnt:
                        layer_counts[0, j] += 1
                    if policy == 0 and tail[p] != k:  # LRU: move to the tail
                        a, b = prev[k], nxt[k]
                        if a >= 0:
                            nxt[a] = b
                        else:
                            head[p] = b
                        prev[b] = a
                        prev[k] = tail[p]
                        nxt[k] = -1
                        nxt[tail[p]] = k
                        tail[p] = k
                    continue
                is_hit[r] = False
                if used[p] >= caps[p]:
                    v = head[p]
                    while v >= 0 and pin_stamp[v] == stamp:
                        v = nxt[v]
                    if v < 0:  # every slot pinned: report it through a negative count
                        return (layer_counts, layer_stall, 0.0, 0.0, 0.0, -1, 0, 0)
                    a, b = prev[v], nxt[v]
                    if a >= 0:
                        nxt[a] = b
                    else:
                        head[p] = b
                    if b >= 0:
                        prev[b] = a
                    else:
                        tail[p] = a
                    in_cache[v] = False
                    used[p] -= 1
                    evictions += 1
                in_cache[k] = True
                used[p] += 1
                prev[k] = tail[p]
                nxt[k] = -1
                if tail[p] >= 0:
                    nxt[tail[p]] = k
                else:
                    head[p] = k
                tail[p] = k
                miss_dur[m] = dur[r]
                m += 1
                misses_all += 1
                if cnt:
                    layer_counts[3, j] += 1  # MISS
                    demand += 1
            if timed:
                if m == 0 and not use_counts:
                    end = t + shared[s] + n * cost[1]
                else:
                    now = t + shared[s]
                    for r in range(n):
                        if is_hit[r]:
                            now += dur[r]
                    st = 0.0
                    for i in range(m):
                        ready = t + (i // engines + 1) * transfer
                        if ready > now:
                            st += ready - now
                            now = ready
                        now += miss_dur[i]
                    end = now
                    if cnt:
                        stall_miss += st
                        layer_stall[j] += st
                if end > t:
                    t = t + (end - t)
        if cnt:
            counted_time += t - step_start
    return (layer_counts, layer_stall, stall_miss, counted_time, t, evictions, demand,
            misses_all)


class _LinkStats:
    """What ``sim.metrics.build_result`` reads from a link, for a compiled run."""

    def __init__(self, demand: int, busy: float, engines: int) -> None:
        self.started = [demand, 0]
        self.busy = busy
        self.engines = engines
        self.dropped = 0
        self.cancelled = 0
        self.records = None

    def busy_until(self, end: float) -> float:
        return self.busy


def run(sim: Simulation) -> None:
    """Fill ``sim``'s counters (and clock) as :meth:`Simulation.run` would."""
    w, timed = sim.workload, sim.timed
    attn, shared = (np.asarray(x, dtype=np.float64) for x in sim._layer_times())
    steps = w.num_steps
    dense_step = np.zeros(steps)
    cost = np.zeros(2)
    transfer, engines = 0.0, 1
    if timed:
        comp = sim.compute
        uniq: dict[tuple[int, int], float] = {}
        if any(sim.dense_before):
            for s, (b, ctx) in enumerate(zip(w.tokens.tolist(), w.context.tolist(),
                                             strict=True)):
                if (b, ctx) not in uniq:
                    uniq[(b, ctx)] = comp.dense_layer_time(b, ctx)
                dense_step[s] = uniq[(b, ctx)]
        top = int(w.counts.max()) if w.counts is not None else 1
        cost = np.array([comp.expert_time(n) for n in range(max(top, 1) + 1)])
        transfer = sim.link_model.transfer_time(sim.shape.expert_bytes)
        engines = sim.link_model.copy_engines
    counts = w.counts if w.counts is not None else np.zeros((1, 1, 1), np.int32)
    out = _replay(
        w.keys, counts, w.counts is not None, w.counted, attn, shared, dense_step,
        np.asarray(sim.dense_before, dtype=np.int64),
        np.asarray(sim._part_of_layer, dtype=np.int64),
        np.asarray(sim._caps, dtype=np.int64), sim.shape.num_keys, engines, transfer, cost,
        timed, sim.copts.pin_layer, KERNELS[sim.spec.eviction.name],
    )
    layer_counts, layer_stall, stall_miss, counted_time, end, evictions, demand, misses = out
    if evictions < 0:
        raise SimulationError("no evictable slot for a demand fetch: every slot is pinned")
    c = sim.c
    c.layer_counts = [row.tolist() for row in layer_counts]
    c.layer_stall = layer_stall.tolist()
    c.stall_miss = float(stall_miss)
    c.time = float(counted_time)
    c.evictions = int(evictions)
    c.demand_started = int(demand)
    mask = w.counted
    c.steps = int(mask.sum())
    c.out_tokens = int(w.out_tokens[mask].sum())
    c.tokens = int(w.tokens[mask].sum())
    c.pairs = int(w.pairs[mask].sum())
    sim.clock.now = float(end)
    if timed:
        sim.link = _LinkStats(int(demand), misses * transfer, engines)
