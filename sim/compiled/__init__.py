"""The compiled engine: the shipped policies replayed by one numba kernel (``kernel.replay``).

``Simulation.run`` hands a run here when :func:`applicable` says the kernel has an exact twin
of every piece the run uses (policy classes by identity, not by name, so a user's subclass or
a policy of the same name always runs on the SimPy engine). The kernel fills the same counters
the SimPy engine fills, so ``sim.metrics.build_result`` builds the result unchanged;
``tests/sim/test_compiled_engine.py`` checks both engines give the same metrics run for run.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.policies.base import EvictionPolicy, NoPrefetch, PrefetchPolicy
from moesim.policies.belady import Belady
from moesim.policies.cpu_layers import CpuLayers
from moesim.policies.fate_arc import FateARC
from moesim.policies.fifo import FIFO
from moesim.policies.layer_offload import LayerOffload
from moesim.policies.least_stale import LeastStale
from moesim.policies.lfu import LFU
from moesim.policies.lru import LRU
from moesim.policies.moe_beyond_replay import MoEBeyondReplay
from moesim.policies.moe_infinity import (
    MoEInfinity,
    MoEInfinityLFU,
    MoEInfinityPriority,
    _VisitCounts,
)
from moesim.policies.next_layer_all import NextLayerAll
from moesim.policies.oracle_prefetch import OraclePrefetch
from moesim.policies.prediction_prefetch import PredictionPrefetch
from moesim.policies.speculative_prefetch import SpeculativePrefetch
from moesim.policies.static import Static
from moesim.sim.cache import ExpertCache, SimulationError
from moesim.sim.compiled.stamp import compile_lock, compile_notice, lock_held_here, refresh_cache
from moesim.sim.link import host_time

# Before any kernel module is imported: kernels with a signature load their cached code at
# import (the others at their first call), so a stale cache must be gone by then.
refresh_cache()

from moesim.sim.compiled import layout as K  # noqa: E402

if TYPE_CHECKING:
    from types import ModuleType

    from moesim.sim.engine import Simulation


def __getattr__(name: str) -> Any:
    """``kernel`` loads on first use: loading the kernels' cached machine code costs ~0.5
    CPU-s, which a process that only imports the simulator (a sweep's parent, a SimPy-only
    run, a trace tool reading ``moesim.sim.workload``) need not pay."""
    if name == "kernel":
        return _kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kernel() -> ModuleType:
    return import_module("moesim.sim.compiled.kernel")

EVICTION: dict[type, int] = {
    LRU: K.EV_LRU, FIFO: K.EV_FIFO, Static: K.EV_STATIC, LeastStale: K.EV_STALE,
    LFU: K.EV_LFU, Belady: K.EV_BELADY, FateARC: K.EV_ARC, MoEInfinityLFU: K.EV_VISITS_MIN,
    MoEInfinityPriority: K.EV_MI_PRIO,
}
PREFETCH: dict[type, int] = {
    NoPrefetch: K.PF_NONE, OraclePrefetch: K.PF_ORACLE, NextLayerAll: K.PF_NEXT_ALL,
    PredictionPrefetch: K.PF_PRED, MoEBeyondReplay: K.PF_BEYOND, MoEInfinity: K.PF_MOE_INF,
    # the oracle kernel over the policy's own thinned table (drawn once at start)
    SpeculativePrefetch: K.PF_ORACLE,
}
POINTS = {"pre_attention": K.PT_PRE, "routed": K.PT_ROUTED, "demand_issued": K.PT_ISSUED}


def why_not(sim: Simulation) -> str | None:
    """None when the kernel replays this run exactly, else the reason it cannot."""
    if sim.spec.eviction not in EVICTION:
        return f"eviction {sim.spec.eviction.__qualname__} has no compiled twin"
    if type(sim.prefetcher) not in PREFETCH:
        return f"prefetch {type(sim.prefetcher).__qualname__} has no compiled twin"
    if type(sim.prefetcher) is MoEInfinity and sim.spec.eviction not in (MoEInfinityLFU,
                                                                        MoEInfinityPriority):
        return ("moe_infinity with an eviction other than its own (no candidate protection) has "
                "no compiled twin")
    if sim.spec.eviction is MoEInfinityPriority or type(sim.prefetcher) is MoEInfinity:
        from moesim.sim.compiled.sums import MAX_PAIRWISE

        if sim.shape.num_keys > MAX_PAIRWISE:
            return (f"more than {MAX_PAIRWISE} experts (numpy's summation order is not "
                    "reproduced)")
    if type(sim.prefetcher) is MoEInfinity and sim.shape.num_layers > 128:
        return "moe_infinity beyond 128 layers (the match sums one pairwise leaf per slot)"
    placement = getattr(sim, "placement_spec", None)
    if (placement is not None and not getattr(placement, "is_default", True)
            and getattr(placement, "cls", None) not in (CpuLayers, LayerOffload)):
        return (f"placement {placement.name!r} has no compiled twin (only the default 'fetch', "
                "cpu_layers and layer_offload)")
    if type(sim.cache) is not ExpertCache:
        return f"cache {type(sim.cache).__qualname__} is not the simulator's ExpertCache"
    if sim.ropts.record_transfers or sim.ropts.timeline_steps:
        return "transfer records and timelines are written by the SimPy engine"
    if sim.timed and sim.link_model.transfer_time(sim.shape.expert_bytes) < 0:
        return "negative transfer time"
    if sim.spec.eviction is Belady and not _left_packed(sim.workload.keys):
        return "Belady positions need left-packed workload rows"
    return None


def applicable(sim: Simulation) -> bool:
    """True when ``engine=auto`` may use the compiled engine for this run."""
    return sim.ropts.engine != "python" and why_not(sim) is None


def _left_packed(keys: np.ndarray) -> bool:
    """Every row's -1 padding comes after its keys (the engine ranks keys within a row by
    their place among the valid ones; the future numbers positions by column)."""
    return not bool(((keys[..., 1:] >= 0) & (keys[..., :-1] < 0)).any())


def _install_order(cache: Any) -> list[int]:
    """Keys a freshly built Python cache installed, in install order per partition."""
    out: list[int] = []
    for ev in cache.evictors:
        if isinstance(ev, _VisitCounts):  # insertion numbers of the keys holding a slot
            held = np.flatnonzero(ev.in_cache())
            out += held[np.argsort(ev._ins[held], kind="stable")].tolist()
            continue
        for name in ("_order", "_entry", "_next", "_t1"):
            order = getattr(ev, name, None)
            if order is not None:
                out += list(order)
                break
    return out


def _layer_arrays(sim: Simulation, w: Any = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-step attention(+router), shared and dense-layer times and the expert-time table,
    computed once per distinct (tokens, context) as the engine does (of ``w``, a streamed
    run's chunk, when given; else of the run's workload)."""
    w = sim.workload if w is None else w
    steps = w.num_steps
    if not sim.timed:
        z = np.zeros(steps)
        return z, z, z, np.zeros(2)
    comp = sim.compute
    pairs = np.stack([w.tokens.astype(np.int64), w.context.astype(np.int64)], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    attn_u = np.array([comp.attention_time(int(b), int(c)) + comp.router_time(int(b))
                       for b, c in uniq])
    shared_u = np.array([comp.shared_time(int(b)) for b, _ in uniq])
    dense_u = (np.array([comp.dense_layer_time(int(b), int(c)) for b, c in uniq])
               if any(sim.dense_before) else np.zeros(len(uniq)))
    top = int(w.counts.max()) if w.counts is not None and w.counts.size else 1
    cost = np.array([comp.expert_time(n) for n in range(max(top, 1) + 1)])
    return attn_u[inverse], shared_u[inverse], dense_u[inverse], cost


def runtime_arrays(sim: Simulation, cost: np.ndarray, w: Any = None) -> tuple[np.ndarray, ...]:
    """``kernel.replay``'s ``rt``: per-step host parts of the attention, shared-expert and
    dense-layer times and the expert host-time table (``sim.link.host_time``, as the engine's
    ``_host_times``), then the run's copy rules (``sim.rules``, ``CopyRules.vector``), then
    the layers the engine times whole (placements ``cpu_layers``, ``layer_offload``:
    ``sim.cpu_times``, per layer 0 or its mode (``sim.cpu_layers.HOST``, ``COPIED``) and the
    seconds before and after each such layer's routing, computed by ``sim.cpu_layers`` for
    both engines; all 0 without such layers); of
    ``w``, a streamed run's chunk, when given (streamed runs have no CPU layers)."""
    chunk = w is not None and w is not sim.workload
    w = sim.workload if w is None else w
    rules = sim.rules
    copyv = rules.vector()
    ct = None if chunk else getattr(sim, "cpu_times", None)
    if ct is None:
        cpu = (np.zeros(sim.shape.num_layers, np.int64), np.zeros((1, 1)), np.zeros((1, 1)))
    else:
        cpu = (ct.on_cpu, ct.before, ct.experts)
    if not rules.compute_stream:
        z = np.zeros(w.num_steps)
        return (z, z, z, np.zeros(len(cost)), copyv, *cpu)
    comp = sim.compute
    tokens = w.tokens.tolist()
    return (np.array([host_time(comp, "attention", b) for b in tokens]),
            np.array([host_time(comp, "shared", b) for b in tokens]),
            np.array([host_time(comp, "dense_layer", b) for b in tokens]),
            np.array([host_time(comp, "expert", n) for n in range(len(cost))]), copyv, *cpu)


def _prefetch_args(sim: Simulation) -> tuple[int, int, np.ndarray, int, int, bool, bool,
                                              np.ndarray]:
    """(kernel, point, hooks, ahead, top, wrap, warm, table) of the run's prefetcher."""
    pf: PrefetchPolicy = sim.prefetcher
    code = PREFETCH[type(pf)]
    hooks = np.array([_overrides(pf, name) for name in
                      ("on_pre_attention", "on_routed", "on_demand_issued")], dtype=np.bool_)
    dummy = np.full((1, 1, 1), -1, np.int32)
    ahead = top = 0
    wrap = warm = False
    point = K.PT_ISSUED
    table = dummy
    if code == K.PF_ORACLE:
        point, ahead = POINTS[pf.point], pf._ahead
        table = pf.table if isinstance(pf, SpeculativePrefetch) else sim.workload.keys
    elif code == K.PF_NEXT_ALL:
        wrap = bool(pf.setup.params.get("wrap", True))
    elif code in (K.PF_PRED, K.PF_BEYOND):
        point = POINTS[pf.point]
        table = _prediction_table(sim)
        if code == K.PF_PRED:
            ahead, top = pf._ahead, pf._top
        else:
            warm = pf._warm
    return code, point, hooks, ahead, top, wrap, warm, table


def _overrides(pf: PrefetchPolicy, name: str) -> bool:
    return getattr(type(pf), name) is not getattr(PrefetchPolicy, name)


def _prediction_table(sim: Simulation) -> np.ndarray:
    """The prediction view's rows as a padded [steps, layers, width] array."""
    table = getattr(sim.predictions, "table", None)
    if table is not None:  # the view's own padded array (a vectorised PredictionView)
        return table
    rows = sim.predictions._rows
    width = max((len(r) for layers in rows for r in layers), default=0)
    table = np.full((len(rows), sim.shape.num_layers, max(width, 1)), -1, np.int32)
    for s, layers in enumerate(rows):
        for j, r in enumerate(layers):
            if r:
                table[s, j, :len(r)] = r
    return table


def _max_live(w: Any) -> int:
    """Most requests ``MoEInfinity`` keeps live at once (running, or gone but not yet finished:
    a request is finished when the next one joins)."""
    live: set[int] = set()
    most = 1
    for s in sorted(w.joins):
        running = set(w.requests_of(s))
        for rid in w.joins[s]:
            live &= running
            live.add(rid)
            most = max(most, len(live))
    return most


def mi_arrays(sim: Simulation | None) -> tuple[Any, ...]:
    """MoE-Infinity's state for the kernel: the EAMC as the run's prefetcher holds it (a warm
    EAMC included), the matcher's tables (``_matcher_tables``), live-request buffers, the
    step->request map and the options; tiny placeholders of the same types when ``sim`` is
    None (any other run)."""
    if sim is None:
        z2, z1 = np.zeros((1, 1)), np.zeros(2, np.int64)
        mt = (z2, z2, np.zeros((1, 1), np.int32), z2, np.zeros((1, 1), np.int16),
              np.zeros((1, 1), np.int16), np.zeros(4, np.int64), np.zeros((1, 1, 1), np.int64),
              np.zeros((1, 1, 1), np.int64), np.zeros((1, 2), np.int64), np.zeros((1, 1, 1)),
              np.zeros((1, 1, 1)))
        return (z2, mt, np.zeros(1), np.zeros((1, 1), np.int32), np.full(1, -1, np.int64), z2,
                z2, z2, np.zeros((1, 1, 1)), z1, z1, z1, z1, np.zeros(6, np.int64))
    pf: MoEInfinity = sim.prefetcher  # type: ignore[assignment]
    w, eamc = sim.workload, pf.eamc
    num_l, num_e = sim.shape.num_layers, sim.shape.num_experts
    cap, num_k = eamc.capacity, num_l * num_e
    most = _max_live(w)
    horizon = -1 if pf._horizon is None else int(pf._horizon)
    cfg = np.array([int(eamc.mask), horizon, pf._width, cap, eamc.filled, eamc.persistent],
                   np.int64)
    # per live request: row sums, then the step its suffix sums were taken at (-1: none);
    # squared row norms, then their inverses (eamc.routed keeps both);
    # dot products [layer, slot], then the suffix sums (sim/compiled/eamc.py: _match)
    lrsum = np.zeros((most, num_l + 1))
    lrsum[:, num_l] = -1.0
    return (eamc.eams.reshape(cap, num_k).copy(), _matcher_tables(eamc, w, most),
            eamc.access.copy(), np.zeros((cap, num_k), np.int32), np.full(most, -1, np.int64),
            np.zeros((most, num_k)), np.zeros((most, 2 * num_l)), lrsum,
            np.zeros((most, 2 * num_l, cap)), *mi_steps(w), cfg)


# Bytes the lazy match's ring of routed experts may take (sim/compiled/eamc.py: _catch_up):
# it keeps as many steps as the longest request runs, at most this allows; a request running
# longer has all its float dot products brought up to date once per ring of steps.
RING_BYTES = 64 << 20


def _matcher_tables(eamc: Any, w: Any, most: int) -> tuple[np.ndarray, ...]:
    """The tables of ``sim/compiled/eamc.py``'s matcher (``mt``): the stored unit rows
    ``[L E, slots]`` (the eager per-layer update) and ``[slots, L E]`` (the lazy replay of one
    slot), the counts ``[L E, slots]`` and inverse row norms ``[L, slots]`` (the lazy ranking),
    the ring of routed experts per step and layer (as many steps as the longest request runs,
    as ``RING_BYTES`` allows), the run's scalars (eamc.G_*: lazy when masked) and per live
    request the integer dot products, markers, eamc.M_* fields, float dot products and the
    maxima of the approximate suffix sums (per row, then per block of eamc.SCAN = 32 slots)."""
    cap, num_l, num_e = eamc.capacity, eamc.num_l, eamc.num_e
    num_k = num_l * num_e
    counts = eamc.eams.reshape(cap, num_k)
    ss = (eamc.eams ** 2).sum(axis=2)  # integer counts: exact
    inv = np.divide(1.0, np.sqrt(ss), out=np.zeros_like(ss), where=ss > 0)
    ids = np.asarray(w.req_ids, np.int64)
    longest = int(np.unique(ids, return_counts=True)[1].max()) if ids.size else 1
    ring = max(2, min(longest + 2, RING_BYTES // (2 * (num_k + num_l))))
    unit = eamc.unit.reshape(cap, num_k)
    run = np.array([0, 0, int(eamc.mask), -1], np.int64)
    return (unit.T.copy(), unit.copy(), np.ascontiguousarray(counts.T, np.int32), inv.T.copy(),
            np.zeros((ring, num_k), np.int16), np.zeros((ring, num_l), np.int16), run,
            np.zeros((most, num_l, cap), np.int64), np.zeros((most, cap, num_l), np.int64),
            np.zeros((most, 2), np.int64), np.zeros((most, cap, num_l)),
            np.zeros((most, num_l, (cap + 31) // 32 + 1)))


class LinkStats:
    """What ``sim.metrics.build_result`` reads from a link, for a compiled run."""

    def __init__(self, started: list[int], busy: float, clip: float, engines: int,
                 dropped: int, cancelled: int) -> None:
        self.started = started
        self.busy = busy
        self._clip = clip
        self.engines = engines
        self.dropped = dropped
        self.cancelled = cancelled
        self.records = None
        self.swaps = 0  # copies back of evicted experts (sim.link.CopyRules), counted steps
        self.swap_time = 0.0

    def busy_until(self, end: float) -> float:
        return self.busy - self._clip


def link_args(sim: Simulation) -> tuple[float, int]:
    """(one expert copy's duration, copy engines) of a timed run; (0, 1) without a link."""
    if not sim.timed:
        return 0.0, 1
    duration = float(sim.link_model.transfer_time(sim.shape.expert_bytes))
    engines = int(sim.link_model.copy_engines)
    if engines < 1:
        raise SimulationError(f"copy_engines must be >= 1, got {engines}")
    return duration, engines


def ensure_compiled() -> ModuleType:
    """The kernel module, its replay kernel compiled or loaded. The first call in a process
    takes the compile lock (uncontended: microseconds): a process compiling the kernels beside
    this one (a sweep's other worker, a background compile) finishes first, and this one then
    loads its cache. Where nothing is cached yet, the compile runs here, under the lock, on
    tiny runs (:func:`moesim.sim.compiled.warm.compile_kernels`), so that the lock is held for
    the compile only, never for a simulation."""
    loaded = sys.modules.get("moesim.sim.compiled.kernel")
    if (loaded is not None and getattr(loaded.replay, "signatures", True)) or lock_held_here():
        return _kernel()  # loaded already, or this process's own compile (its tiny runs)
    with compile_lock():
        kernel = _kernel()
        if compile_notice(kernel.replay):  # one stderr line: ~40 s, once
            from moesim.sim.compiled import warm

            warm.compile_kernels()
    return kernel


def run(sim: Simulation) -> None:
    """Fill ``sim``'s counters, clock and link statistics as :meth:`Simulation.run` would."""
    ensure_compiled()
    _run(sim)


def reset_orders(sim: Simulation, w: Any, first: bool = True) -> tuple[np.ndarray, ...]:
    """``resets``, ``inst_off`` and ``inst_keys`` of workload ``w`` (a whole run, or one chunk
    of a streamed one, ``sim.stream``): the initial cache's install order (``first``: a later
    chunk resumes the cache instead), then a fresh cache per joining request with
    ``cache.reset_per_request``, drawn in the run's order."""
    resets = np.zeros(w.num_steps, np.bool_)
    orders = [_install_order(sim.cache) if first else []]
    if sim.copts.reset_per_request:
        # A fresh cache installs nothing when it is not filled at random and its policy places
        # nothing before the run: then its (empty) order is known without building one per
        # request (which costs ~20 us per partition: a per-token reset of a 32-layer cache
        # built 32 policies per token). The SimPy engine builds them; nothing here draws from
        # the run's generator afterwards, so both engines still see the same caches.
        starts_empty = sim.copts.prefill == "empty" and all(
            type(ev).initial_contents is EvictionPolicy.initial_contents
            for ev in sim.cache.evictors)
        for s in sorted(w.joins):
            if w.joins[s]:
                resets[s] = True
                orders.append([] if starts_empty else _install_order(sim._new_cache()))
    inst_off = np.cumsum([0] + [len(o) for o in orders]).astype(np.int64)
    inst_keys = np.array([k for o in orders for k in o], dtype=np.int64)
    return resets, inst_off, inst_keys


def mi_steps(w: Any) -> tuple[np.ndarray, ...]:
    """MoE-Infinity's per-step arrays of workload ``w`` (a whole run or one streamed chunk):
    the step->request map and the requests joining at each step."""
    joins = sorted(w.joins)
    join_off = np.zeros(w.num_steps + 1, np.int64)
    for s in joins:
        join_off[s + 1] = len(w.joins[s])
    join_rid = np.array([r for s in joins for r in w.joins[s]] or [0], np.int64)
    return (np.asarray(w.req_offsets, np.int64), np.asarray(w.req_ids, np.int64),
            np.cumsum(join_off), join_rid)


def _run(sim: Simulation) -> None:
    w = sim.workload
    keys = w.keys
    num_k = sim.shape.num_keys
    ev_code = EVICTION[sim.spec.eviction]
    mi_pf = type(sim.prefetcher) is MoEInfinity
    if ev_code == K.EV_VISITS_MIN:
        order_max = sim.spec.eviction_params.get("order") == "max"
        if mi_pf:  # candidate protection: one heap per layer
            ev_code = K.EV_MI_MAX if order_max else K.EV_MI_MIN
        elif order_max:
            ev_code = K.EV_VISITS_MAX
    attn, shared, dense_step, cost = _layer_arrays(sim)
    duration, engines = link_args(sim)
    pf_code, point, hooks, ahead, top, wrap, warm, table = _prefetch_args(sim)
    hot = np.zeros(num_k, np.bool_)
    for ev in sim.cache.evictors:
        for k in getattr(ev, "_hot", ()):
            hot[k] = True
    resets, inst_off, inst_keys = reset_orders(sim, w)
    kernel = _kernel()
    if ev_code == K.EV_BELADY:
        nocc, cursor = kernel.next_occurrences(keys.reshape(-1), num_k)
    else:
        nocc = cursor = np.zeros(1, np.int64)
    mi = mi_arrays(sim) if mi_pf else mi_arrays(None)
    counts = w.counts if w.counts is not None else np.zeros((1, 1, 1), np.int32)
    touch = bool(sim.spec.eviction_params.get("prefetch_touch", True))
    iv, fv, layer_counts, layer_stall, step_t, _, _ = kernel.replay(
        keys, counts, w.counts is not None, w.counted, attn, shared, dense_step,
        np.asarray(sim.dense_before, dtype=np.int64),
        np.asarray(sim._part_of_layer, dtype=np.int64), np.asarray(sim._caps, dtype=np.int64),
        sim.shape.num_experts, sim.timed, sim.copts.pin_layer, engines, duration, cost, ev_code,
        hot, touch, pf_code, point, hooks, ahead, top, wrap, warm, table, resets, inst_off,
        inst_keys, nocc, cursor, mi, FRESH, runtime_arrays(sim, cost),
    )
    store_counters(sim, iv, fv, layer_counts, layer_stall, engines)
    # every step's duration (warm-up included), as the SimPy engine records it in timed runs
    c = sim.c
    c.step_times = step_t.tolist() if sim.timed else None
    mask = w.counted
    c.steps = int(mask.sum())
    ct = getattr(sim, "cpu_times", None)
    if ct is not None:  # CPU layers' host work, summed step by step as the SimPy engine does
        for s, busy in enumerate(ct.busy.tolist()):
            c.cpu_busy += busy
            if mask[s]:
                c.cpu_execs += int(ct.execs[s])
                c.demand_started += int(ct.copied[s])  # offloaded layers' expert copies
    c.out_tokens = int(w.out_tokens[mask].sum())
    c.tokens = int(w.tokens[mask].sum())
    c.pairs = int(w.pairs[mask].sum())


# ``kernel.replay``'s ``state`` for a fresh run (a streamed run passes its carried arrays)
FRESH = (np.zeros((0, 0), np.int64), np.zeros((0, 0)), np.zeros((0, 0), np.int64), np.zeros(0))


def store_counters(sim: Simulation, iv: np.ndarray, fv: np.ndarray, layer_counts: np.ndarray,
                   layer_stall: np.ndarray, engines: int) -> None:
    """The kernel's counters, clock and link statistics into ``sim`` (all but the per-step
    sums, which the caller adds: a streamed run sums them chunk by chunk)."""
    if iv[K.I_ERROR] > 0:
        raise SimulationError(
            f"no evictable slot for a demand fetch of layer {iv[K.I_ERROR] - 1}: every slot is "
            "pinned or in flight"
        )
    if iv[K.I_ERROR] == -1_000_000:
        raise SimulationError("compiled engine: more running moe_infinity requests than sized")
    if iv[K.I_ERROR] < 0:
        raise SimulationError("compiled engine: an awaited expert is neither in flight nor "
                              "resident")
    c = sim.c
    c.layer_counts = [row.tolist() for row in layer_counts]
    c.layer_stall = layer_stall.tolist()
    c.stall_miss = float(fv[K.V_STALL_MISS])
    c.stall_late = float(fv[K.V_STALL_LATE])
    c.time = float(fv[K.V_TIME])
    c.demand_started = int(iv[K.I_DEMAND])
    c.prefetch_issued = int(iv[K.I_ISSUED])
    c.prefetch_started = int(iv[K.I_PF_STARTED])
    c.prefetch_dropped = int(iv[K.I_PF_DROPPED])
    c.prefetch_served = int(iv[K.I_SERVED])
    c.prefetch_useful = int(iv[K.I_USEFUL])
    c.unused_prefetches = int(iv[K.I_UNUSED])
    c.wasted_prefetches = int(iv[K.I_WASTED])
    c.evictions = int(iv[K.I_EVICTIONS])
    sim.clock.now = float(fv[K.V_NOW])
    if sim.timed:
        sim.link = LinkStats([int(iv[K.I_L_DEMAND]), int(iv[K.I_L_PREFETCH])],
                             float(fv[K.V_BUSY]), float(fv[K.V_CLIP]), engines,
                             int(iv[K.I_L_DROPPED]), int(iv[K.I_CANCELLED]))
        sim.link.swaps = int(iv[K.I_SWAPS])
        sim.link.swap_time = float(fv[K.V_SWAP_T])
        if sim.rules.link_clock:
            sim.link_end = float(fv[K.V_TAU])
