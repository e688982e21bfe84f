"""The compiled twin of ``sim.engine``'s GPU loop (numba): one run over the workload's steps
and layers, with the cache, link, eviction and prefetch kernels of the sibling modules.

Every rule here mirrors a line of ``sim/engine.py``, ``sim/link.py``, ``sim/cache.py`` and the
shipped ``policies/*.py`` (eviction order, tie-breaks, when the link is advanced and with which
pins in place), so that a run gives the SimPy engine's counters exactly; the property test
``tests/sim/test_compiled_engine.py`` checks it run for run. The state layout is described in
``sim.compiled.layout``.
"""

from __future__ import annotations

import numpy as np

from moesim.sim.compiled.cache import _install, _lru_demand, _reserve, _reset
from moesim.sim.compiled.eamc import (
    MC_HEADS,
    begin,
    demand_issued,
    request_start,
    routed,
    sort_all,
)
from moesim.sim.compiled.evict import _on_access, _settop
from moesim.sim.compiled.heaps import _hpush, _hremove, _to_tail, next_occurrences
from moesim.sim.compiled.layout import (
    A_B2,
    A_T1,
    ABSENT,
    B_PKEYS,
    COUNTED,
    EV_BELADY,
    EV_LFU,
    EV_LRU,
    EV_MI_MAX,
    EV_MI_MIN,
    EV_MI_PRIO,
    EV_STALE,
    EV_VISITS_MAX,
    EV_VISITS_MIN,
    F_DN,
    F_FIN,
    F_FREE,
    F_RFIN,
    F_RSTART,
    FV,
    HIT,
    I_COUNTING,
    I_CWIDTH,
    I_DEMAND,
    I_DSRC,
    I_DUNI,
    I_EAMCAP,
    I_ENGINES,
    I_ERROR,
    I_EVICTIONS,
    I_FILLED,
    I_LAYER,
    I_NQ,
    I_NUME,
    I_NUML,
    I_NUMP,
    I_PERSIST,
    I_PF_HOST,
    I_PSTAMP,
    I_QBASE,
    I_QCAP,
    I_RSIZE,
    I_SERVED,
    I_SWAPMODE,
    I_TCUR,
    I_TOPOK,
    I_UNUSED,
    I_USEFUL,
    IV,
    K_CAND,
    K_CURSOR,
    K_HEAP,
    K_HOT,
    K_HPOS,
    K_INFL,
    K_MARK,
    K_NXT,
    K_OUT,
    K_PART,
    K_PIN,
    K_PRV,
    K_QSEQ,
    K_STATE,
    K_TODO,
    L_TOPV,
    LATE,
    MISS,
    NO_USE,
    NUM_FROWS,
    NUM_FV,
    NUM_IV,
    NUM_ROWS,
    P_CAP,
    P_HEAD,
    P_HOFF,
    P_TAIL,
    PA_HEAD,
    PA_TAIL,
    PF_MOE_INF,
    PF_NONE,
    PROMOTED,
    PT_ISSUED,
    PT_PRE,
    PT_ROUTED,
    RESIDENT,
    TOP_NONE,
    V_CLIP,
    V_LT,
    V_NOW,
    V_STALL_LATE,
    V_STALL_MISS,
    V_SWAP_D,
    V_TAU,
    V_TIME,
    jit,
)
from moesim.sim.compiled.link import _advance, _submit_demand
from moesim.sim.compiled.lists import _merge_current
from moesim.sim.compiled.prefetch import _issue_keys, _prefetch
from moesim.sim.link import wait_for_gate

__all__ = ["next_occurrences", "replay"]


@jit
def _out(S, F, layer_counts, layer_stall, step_t):
    # S and F whole as well: a streamed run (sim.stream) resumes from them on its next chunk
    return (S[IV, :NUM_IV].copy(), F[FV, :NUM_FV].copy(), layer_counts, layer_stall, step_t,
            S, F)



# -- the run --------------------------------------------------------------------------------
@jit
def _await(k, r, nw, S, F, wait_r, wait_i):
    """Add awaited key ``k`` (rank ``r`` in the layer) to the first ``nw`` waits, sorted by
    (ready time, rank) as engine._schedule sorts them; -1 if it is neither in flight nor
    resident (a broken invariant)."""
    if S[K_INFL, k]:
        ready = F[F_FIN, k]
    elif S[K_STATE, k] == RESIDENT:
        ready = F[FV, V_LT]
    else:
        return -1
    q = nw  # insertion sort by (ready, rank)
    while q > 0 and wait_r[q - 1] > ready:
        wait_r[q] = wait_r[q - 1]
        wait_i[q] = wait_i[q - 1]
        q -= 1
    wait_r[q] = ready
    wait_i[q] = r
    return nw + 1


@jit
def _gate(engines, F):
    """``max(HostLink._free)``: when every copy booked on the copy engines has landed."""
    gate = F[F_FREE, 0]
    for e in range(1, engines):
        if F[F_FREE, e] > gate:
            gate = F[F_FREE, e]
    return gate


# the SimPy engine's own function, compiled: one definition of the wait for both engines
_wait_for_gate = jit(wait_for_gate)


@jit
def _submit_after(k, duration, evicted, direct, at, S, F):
    """``HostLink.submit_demand(k, evicted, not_before=at)``: the link's time raised to ``at``
    for the one submission (a copy handed to the stream later, ``CopyRules.window``);
    returns its arrival."""
    lt = F[FV, V_LT]
    if at > lt:
        F[FV, V_LT] = at
    _submit_demand(k, duration, evicted, direct, S, F)
    F[FV, V_LT] = lt
    return F[F_FIN, k]


@jit
def _drop_cpu(n, cpu_on, num_e, S):
    """The first ``n`` prefetch keys (``S[B_PKEYS]``) without those of CPU layers, in order
    (``Simulation.prefetch`` drops them: they never take a slot); returns how many remain."""
    m = 0
    for i in range(n):
        k = S[B_PKEYS, i]
        if not cpu_on[k // num_e]:
            S[B_PKEYS, m] = k
            m += 1
    return m


@jit
def _queue(n, any_cpu, cpu_on, num_e, timed, touch, ev, position, S, F, nocc):
    """Prefetch the ``n`` keys a prediction point issued (``S[B_PKEYS]``), those of CPU layers
    dropped first (``Simulation.prefetch``): one place for every point, GPU or CPU layer."""
    if any_cpu:
        n = _drop_cpu(n, cpu_on, num_e, S)
    if n:
        _prefetch(n, timed, touch, ev, position, S, F, nocc)


@jit
def replay(keys, counts, use_counts, counted, attn, shared, dense_step, dense_n, part, caps,
           num_e, timed, pin_layer, engines, duration, cost, ev, hot, touch, pf, point,
           hooks, ahead, top, wrap, warm, table, resets, inst_off, inst_keys, nocc, cursor, mi,
           state, rt):
    """One run; returns (int scalars, float scalars, layer counts [4, L], layer stall [L],
    step times [S]: every step's duration, the whole S and F). ``mi`` holds
    MoE-Infinity's arrays (``sim.compiled.MIState``; tiny placeholders for other runs).
    ``state``: (S, F, layer counts, layer stall) a previous call returned, to resume a run on
    its next chunk of steps (``sim.stream``; positions then count from the chunk's start), or
    empty arrays for a fresh run. ``rt``: the copy rules of a runtime (``sim.link.CopyRules``)
    and the host parts of the compute times (``sim.link.host_time``): per-step attention,
    shared-expert and dense-layer host time, the expert host-time table, and
    ``CopyRules.vector``: [compute stream, swap mode, swap seconds, host seconds per copy
    (demand copies and started prefetches: I_PF_HOST), fifo window, host sync per expert, own
    prefetch stream, per-layer windows]."""
    (eams, unit, access, ordr, lrid, leam, lsq, lrsum, ldots, req_off, req_ids, join_off,
     join_rid, cfg) = mi
    attn_h, shared_h, dense_h, cost_h, copyv, cpu_on, cpu_before, cpu_experts = rt
    any_cpu = False  # layers run whole on the host (placement cpu_layers)
    for j in range(cpu_on.shape[0]):
        if cpu_on[j]:
            any_cpu = True
    cs = copyv[0] != 0  # copies on the compute stream: the link runs on link time (V_TAU)
    host_s = copyv[3]  # the compute thread's work per demand copy (CopyRules.issue_time)
    win = int(copyv[4])  # copy.order: fifo: demand copies handed at routing (0: not fifo)
    fifo = cs and win > 0
    sync = fifo and copyv[5] != 0  # copy.sync: expert: wait for the stream, then host work
    own = fifo and copyv[6] != 0  # copy.prefetch_stream: own: prefetches gate no kernel
    lcs = cs and not own  # the link on link time (CopyRules.link_clock), else on wall time
    num_s, num_l, width = keys.shape
    num_k = num_l * num_e
    num_p = caps.shape[0]
    layer_counts = np.zeros((4, num_l), np.int64)
    layer_stall = np.zeros(num_l)
    step_t = np.zeros(num_s)
    qcap = 4 * num_k + 16
    nb = max(qcap, caps.sum() + 1, table.shape[2] + num_e + 1, NUM_IV, num_k + 1)
    S = np.zeros((NUM_ROWS, nb), np.int64)
    F = np.zeros((NUM_FROWS, max(num_k + 1, engines, NUM_FV)))
    for row in (K_PIN, K_PRV, K_NXT, K_HPOS, K_TODO, P_HEAD, P_TAIL, K_CAND):
        S[row, :] = -1
    for lst in range(A_T1, A_B2 + 1):
        S[PA_HEAD + lst, :] = -1
        S[PA_TAIL + lst, :] = -1
    layer_heaps = ev in (EV_MI_MIN, EV_MI_MAX, EV_MI_PRIO)  # one heap per layer
    for k in range(num_k):
        S[K_HOT, k] = 1 if hot[k] else 0
        S[K_PART, k] = part[k // num_e]
        S[K_HEAP, k] = k // num_e if layer_heaps else part[k // num_e]
        S[K_CURSOR, k] = cursor[k] if cursor.shape[0] == num_k else NO_USE
    for p in range(num_p):
        S[P_CAP, p] = caps[p]
        if p > 0 and not layer_heaps:
            S[P_HOFF, p] = S[P_HOFF, p - 1] + caps[p - 1]
    if layer_heaps:
        for j in range(num_l):
            S[P_HOFF, j] = j * num_e
            S[L_TOPV, j] = TOP_NONE
    tops = ev == EV_MI_MIN or ev == EV_MI_MAX  # L_TOPV kept (evict._settop)
    S[IV, I_TOPOK] = 1 if tops else 0
    S[IV, I_NUME] = num_e
    S[IV, I_NUML] = num_l
    S[IV, I_NUMP] = num_p
    mask, horizon = cfg[0] != 0, cfg[1]
    S[IV, I_CWIDTH] = cfg[2]
    S[IV, I_EAMCAP] = cfg[3]
    S[IV, I_FILLED] = cfg[4]
    S[IV, I_PERSIST] = cfg[5]
    S[IV, I_DSRC] = -1
    S[IV, I_DUNI] = 0 if pf == PF_MOE_INF else 1
    S[IV, I_TCUR] = -1
    prio = ev == EV_MI_PRIO
    mi_pf = pf == PF_MOE_INF
    for k in range(num_k):  # D before any request's EAM: all ones, normalised
        F[F_DN, k] = 1.0 / num_k + 1e-6
    if mi_pf:
        sort_all(eams, ordr, cfg[4], num_l, num_e)
        begin(unit, num_s)
    # MoE-Infinity with one cache partition: per layer, the matched slot's whole list (held
    # keys included) up to cap + E keys, [slot, length, layer heads, keys...]
    # (eamc._cached_list); no room for keys: merged at every call
    mcw = num_l + min(caps[0] + num_e, num_k) if mi_pf and num_p == 1 else 0
    mc = np.full((num_l, MC_HEADS + mcw), -1, np.int64)
    mcs = np.zeros((num_l, num_l))  # the head scores of mc's merges (eamc._extend)
    ebuf = np.zeros(max(width, num_l) + 1, np.int64)
    buf = np.zeros((10, max(num_e, num_l, width, eams.shape[0]) + 1))  # eamc's scratch
    S[IV, I_ENGINES] = engines
    S[IV, I_QCAP] = qcap
    kinds = np.zeros(width, np.int64)
    lkeys = np.zeros(width, np.int64)
    wait_r = np.zeros(width)
    wait_i = np.zeros(width, np.int64)
    hand_k = np.zeros(width, np.int64)  # fifo: the layer's demand copies in issue order
    hand_e = np.zeros(width, np.bool_)  # ... and whether reserving each evicted an expert
    hook_pre, hook_routed, hook_issued = hooks[0], hooks[1], hooks[2]
    direct = timed and pf == PF_NONE
    lru_zl = ev == EV_LRU and not timed  # zero-latency LRU misses: cache._lru_demand
    heap = ev in (EV_LFU, EV_BELADY, EV_VISITS_MIN, EV_VISITS_MAX, EV_MI_MIN, EV_MI_MAX,
                  EV_MI_PRIO)
    position = 0
    for i in range(inst_off[0], inst_off[1]):  # the cache the engine built before the run
        _install(ev, inst_keys[i], position, S, F, nocc)
    S[IV, I_SWAPMODE] = int(copyv[1])
    F[FV, V_SWAP_D] = copyv[2]
    n_reset = 0
    now = 0.0
    if state[0].shape[0]:  # resume a streamed run: the previous chunk's state, in place
        S, F, layer_counts, layer_stall = state[0], state[1], state[2], state[3]
        now = F[FV, V_NOW]
    for s in range(num_s):
        if resets[s]:  # cache.reset_per_request: a fresh cache for the joining request
            if timed:
                _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
            _reset(num_k, num_p, S, F)
            n_reset += 1
            for i in range(inst_off[n_reset], inst_off[n_reset + 1]):
                _install(ev, inst_keys[i], position, S, F, nocc)
        counting = counted[s]
        S[IV, I_COUNTING] = 1 if counting else 0
        if mi_pf:
            for t in range(join_off[s], join_off[s + 1]):
                request_start(s, join_rid[t], req_off, req_ids, eams, unit, access, ordr, lrid,
                              leam, lsq, lrsum, ldots, buf, mc, S)
        step_start = now
        for j in range(num_l):
            base = (s * num_l + j) * width
            position = base
            S[IV, I_LAYER] = j
            if hook_pre:
                if timed:
                    _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
                if point == PT_PRE:
                    n = _issue_keys(pf, s, j, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, S)
                    _queue(n, any_cpu, cpu_on, num_e, timed, touch, ev, position, S, F, nocc)
                if timed:
                    _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
            if any_cpu and cpu_on[j]:  # engine.Simulation._cpu_layer: the layer on the host
                if timed:  # host time: on the compute stream the link's clock runs too
                    d = cpu_before[s, j]
                    if d > 0:
                        now = now + d
                    if lcs and cpu_on[j] == 1:  # host time (not an offloaded layer's copies)
                        F[FV, V_TAU] += d
                    _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
                n_keys = 0
                for r in range(width):
                    k = keys[s, j, r]
                    if k >= 0:
                        lkeys[n_keys] = k
                        n_keys += 1
                if hook_routed:
                    if mi_pf:
                        routed(s, j, lkeys, n_keys, prio, req_off, req_ids, unit, lrid, leam,
                               lsq, lrsum, ldots, ebuf, buf, S, F)
                    if point == PT_ROUTED:
                        n = _issue_keys(pf, s, j, num_l, num_e, ahead, top, wrap, warm,
                                        counting, table, S)
                        _queue(n, True, cpu_on, num_e, timed, touch, ev, position, S, F, nocc)
                    if timed:
                        _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F,
                                 nocc)
                if counting:
                    layer_counts[MISS, j] += n_keys
                position = base + width - 1
                if hook_issued and point == PT_ISSUED:
                    if mi_pf:
                        n = demand_issued(s, j, timed, False, prio, horizon, mask, req_off,
                                          req_ids, eams, unit, access, ordr, lrid, leam, lsq,
                                          lrsum, ldots, ebuf, buf, mc, mcs, S, F)
                    else:
                        n = _issue_keys(pf, s, j, num_l, num_e, ahead, top, wrap, warm,
                                        counting, table, S)
                    _queue(n, True, cpu_on, num_e, timed, touch, ev, position, S, F, nocc)
                if timed:
                    if S[IV, I_NQ] > 0:
                        _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F,
                                 nocc)
                    d = cpu_experts[s, j]
                    if d > 0:
                        now = now + d
                    if lcs and cpu_on[j] == 1:  # host time (not an offloaded layer's copies)
                        F[FV, V_TAU] += d
                    if S[IV, I_NQ] > 0:
                        _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F,
                                 nocc)
                continue
            if timed:
                d = attn[s]
                if dense_n[j]:
                    d += dense_n[j] * dense_step[s]
                h = 0.0
                if cs:  # engine: host part first (the link runs), then the kernels
                    h = attn_h[s]
                    if dense_n[j]:
                        h += dense_n[j] * dense_h[s]
                    if fifo and not own and d > h:  # its kernels wait for the copies in flight
                        _advance(F[FV, V_TAU], duration, ev, position, S, F, nocc)
                        gate = _gate(engines, F)
                        if gate > F[FV, V_TAU] + h:
                            wait = gate - (F[FV, V_TAU] + h)
                            d += wait
                            h += wait
                            if counting:
                                F[FV, V_STALL_LATE] += wait
                                layer_stall[j] += wait
                if d > 0:
                    now = now + d
                if lcs:
                    F[FV, V_TAU] += h
                _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
            n_keys = 0
            pstamp = S[IV, I_PSTAMP]
            for r in range(width):
                k = keys[s, j, r]
                if k >= 0:
                    lkeys[n_keys] = k
                    n_keys += 1
                    if pin_layer:
                        S[K_PIN, k] = pstamp
                        if heap and S[K_HPOS, k] >= 0:
                            _hremove(S[K_HEAP, k], k, S)
                            S[K_OUT, k] = 1
                            if tops:
                                _settop(S[K_HEAP, k], S)
            if hook_routed:
                if mi_pf:
                    routed(s, j, lkeys, n_keys, prio, req_off, req_ids, unit, lrid, leam, lsq,
                           lrsum, ldots, ebuf, buf, S, F)
                if point == PT_ROUTED:
                    n = _issue_keys(pf, s, j, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, S)
                    _queue(n, any_cpu, cpu_on, num_e, timed, touch, ev, position, S, F, nocc)
                if timed:
                    _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
            any_wait = False
            n_dem = 0  # demand copies issued (misses and promoted prefetches)
            n_hand = 0
            for r in range(n_keys):  # Simulation._access
                k = lkeys[r]
                position = base + r
                st = S[K_STATE, k]
                if st != ABSENT:
                    kind = HIT if st == RESIDENT else LATE
                    if ev == EV_LRU:  # the common case, without the policy dispatch
                        _to_tail(S[K_PART, k], k, S)
                    else:
                        _on_access(ev, S[K_PART, k], k, position, S, F, nocc)
                    came = S[K_MARK, k]
                    if came:
                        S[K_MARK, k] = 0
                        if came == COUNTED:
                            S[IV, I_USEFUL] += 1
                        if counting:
                            S[IV, I_SERVED] += 1
                else:
                    kind = MISS
                    if S[K_QSEQ, k] > S[IV, I_QBASE]:  # a queued prefetch, withdrawn, promoted
                        S[K_QSEQ, k] = 0
                        S[IV, I_NQ] -= 1
                        kind = PROMOTED
                    if lru_zl:
                        if not _lru_demand(k, S):
                            S[IV, I_ERROR] = j + 1
                            return _out(S, F, layer_counts, layer_stall, step_t)
                    else:
                        evictions = S[IV, I_EVICTIONS]
                        if not _reserve(ev, k, False, position, S, F, nocc):
                            S[IV, I_ERROR] = j + 1
                            return _out(S, F, layer_counts, layer_stall, step_t)
                        if fifo:  # handed over below (engine: Simulation._handoff)
                            hand_k[n_hand] = k
                            hand_e[n_hand] = S[IV, I_EVICTIONS] != evictions
                            n_hand += 1
                        elif timed:
                            _submit_demand(k, duration, S[IV, I_EVICTIONS] != evictions,
                                           direct, S, F)
                        else:
                            S[K_STATE, k] = RESIDENT
                    if counting:
                        S[IV, I_DEMAND] += 1
                    n_dem += 1
                if counting:
                    layer_counts[kind, j] += 1
                kinds[r] = kind
                if kind != HIT:
                    any_wait = True
            wl = win
            if fifo and copyv.shape[0] > 7:  # CopyRules.layer_window
                wl = int(copyv[7 + j])
            wgate = 0.0  # when the window's copies have landed
            for q in range(min(wl, n_hand) if fifo else 0):  # the window, before any kernel
                _submit_demand(hand_k[q], duration, hand_e[q], direct, S, F)
                if F[F_FIN, hand_k[q]] > wgate:
                    wgate = F[F_FIN, hand_k[q]]
            position = base + width - 1
            if hook_issued and point == PT_ISSUED:
                if mi_pf:
                    # without CPU layers the walk queues its keys itself (_queue: no drops)
                    n = demand_issued(s, j, timed, not any_cpu, prio, horizon, mask, req_off,
                                      req_ids, eams, unit, access, ordr, lrid, leam, lsq,
                                      lrsum, ldots, ebuf, buf, mc, mcs, S, F)
                else:
                    n = _issue_keys(pf, s, j, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, S)
                _queue(n, any_cpu, cpu_on, num_e, timed, touch, ev, position, S, F, nocc)
            if timed:
                if S[IV, I_NQ] > 0:
                    _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
                t = now
                # CopyRules.issue_time: the demand copies and the prefetches started since the
                # last routing (engine.Simulation._issue_time)
                n_iss = n_dem + S[IV, I_PF_HOST] if host_s else 0
                S[IV, I_PF_HOST] = 0
                issue = n_iss * host_s if n_iss and host_s else 0.0
                if fifo:  # engine._run_gpu_fifo
                    gate = wgate if own else _gate(engines, F)
                    st_miss = 0.0
                    st_late = 0.0
                    tau = t if own else F[FV, V_TAU]
                    h = issue + shared_h[s]
                    cur_t = t
                    if sync and shared[s] > 0:
                        cur_t, tau, st_miss, st_late = _wait_for_gate(
                            gate, cur_t, tau, n_dem == 0, st_miss, st_late)
                    cur_t += h
                    tau += h
                    if shared[s] > 0:
                        cur_t, tau, st_miss, st_late = _wait_for_gate(
                            gate, cur_t, tau, n_dem == 0, st_miss, st_late)
                    cur_t += shared[s] - shared_h[s]
                    if own:  # the link's clock is the wall clock: it runs during kernels
                        tau += shared[s] - shared_h[s]
                    nxt = min(wl, n_hand)
                    for phase in range(3):  # hits, started prefetches, demand copies
                        for r in range(n_keys):
                            kd = kinds[r]
                            if (kd != HIT if phase == 0 else
                                    (kd != LATE if phase == 1 else kd < PROMOTED)):
                                continue
                            n = counts[s, j, r] if use_counts else 1
                            late = kd == LATE or (kd == HIT and n_dem == 0)
                            if sync:
                                cur_t, tau, st_miss, st_late = _wait_for_gate(
                                    gate, cur_t, tau, late, st_miss, st_late)
                            cur_t += cost_h[n]
                            tau += cost_h[n]
                            cur_t, tau, st_miss, st_late = _wait_for_gate(
                                gate, cur_t, tau, late, st_miss, st_late)
                            if own and kd == LATE:  # its own copy, on the prefetch stream
                                kp = lkeys[r]
                                if S[K_INFL, kp]:
                                    rdy = F[F_FIN, kp]
                                elif S[K_STATE, kp] == RESIDENT:
                                    rdy = F[FV, V_LT]
                                else:
                                    S[IV, I_ERROR] = -(j + 1)
                                    return _out(S, F, layer_counts, layer_stall, step_t)
                                if rdy > tau:
                                    st_late += rdy - tau
                                    cur_t += rdy - tau
                                    tau = rdy
                            cur_t += cost[n] - cost_h[n]
                            if own:
                                tau += cost[n] - cost_h[n]
                            if kd >= PROMOTED and nxt < n_hand:
                                if own and S[IV, I_NQ] > 0:  # prefetches that start first
                                    _advance(tau, duration, ev, position, S, F, nocc)
                                ready = _submit_after(hand_k[nxt], duration, hand_e[nxt],
                                                      direct, tau, S, F)
                                nxt += 1
                                if ready > gate:
                                    gate = ready
                    end = cur_t
                    if lcs:
                        F[FV, V_TAU] = tau
                    if counting:
                        F[FV, V_STALL_MISS] += st_miss
                        F[FV, V_STALL_LATE] += st_late
                        layer_stall[j] += st_miss + st_late
                elif cs:  # engine._run_gpu_stream
                    tau = F[FV, V_TAU]
                    cur_t = t + issue + shared[s]
                    tau += issue + shared_h[s]
                    nw = 0
                    for r in range(n_keys):
                        n = counts[s, j, r] if use_counts else 1
                        if kinds[r] == HIT:
                            cur_t += cost[n]
                            tau += cost_h[n]
                            continue
                        nw = _await(lkeys[r], r, nw, S, F, wait_r, wait_i)
                        if nw < 0:
                            S[IV, I_ERROR] = -(j + 1)
                            return _out(S, F, layer_counts, layer_stall, step_t)
                    st_miss = 0.0
                    st_late = 0.0
                    for q in range(nw):
                        r = wait_i[q]
                        ready = wait_r[q]
                        n = counts[s, j, r] if use_counts else 1
                        cur_t += cost_h[n]
                        tau += cost_h[n]
                        if ready > tau:
                            if kinds[r] == LATE:
                                st_late += ready - tau
                            else:
                                st_miss += ready - tau
                            cur_t += ready - tau
                            tau = ready
                        cur_t += cost[n] - cost_h[n]
                    end = cur_t
                    F[FV, V_TAU] = tau
                    if counting:
                        F[FV, V_STALL_MISS] += st_miss
                        F[FV, V_STALL_LATE] += st_late
                        layer_stall[j] += st_miss + st_late
                elif not use_counts and not any_wait:
                    end = t + issue + shared[s] + n_keys * cost[1]  # issue: started prefetches
                else:  # engine._schedule: resident experts first, then by arrival
                    nw = 0
                    cur_t = t
                    if issue:
                        cur_t = t + issue
                    cur_t = cur_t + shared[s]
                    for r in range(n_keys):
                        if kinds[r] == HIT:
                            cur_t += cost[counts[s, j, r]] if use_counts else cost[1]
                            continue
                        nw = _await(lkeys[r], r, nw, S, F, wait_r, wait_i)
                        if nw < 0:
                            S[IV, I_ERROR] = -(j + 1)
                            return _out(S, F, layer_counts, layer_stall, step_t)
                    st_miss = 0.0
                    st_late = 0.0
                    for q in range(nw):
                        r = wait_i[q]
                        ready = wait_r[q]
                        if ready > cur_t:
                            if kinds[r] == LATE:
                                st_late += ready - cur_t
                            else:
                                st_miss += ready - cur_t
                            cur_t = ready
                        cur_t += cost[counts[s, j, r]] if use_counts else cost[1]
                    end = cur_t
                    if counting:
                        F[FV, V_STALL_MISS] += st_miss
                        F[FV, V_STALL_LATE] += st_late
                        layer_stall[j] += st_miss + st_late
                if end > t:
                    now = now + (end - t)
                if S[IV, I_NQ] > 0:
                    _advance(F[FV, V_TAU] if lcs else now, duration, ev, position, S, F, nocc)
            if pin_layer:
                if heap:
                    for r in range(n_keys):
                        k = lkeys[r]
                        if S[K_OUT, k]:
                            S[K_OUT, k] = 0
                            if S[K_STATE, k] != ABSENT:
                                _hpush(S[K_HEAP, k], k, S)
                                if tops:
                                    _settop(S[K_HEAP, k], S)
                S[IV, I_PSTAMP] += 1
        if ev == EV_STALE:  # a new forward pass: every current key is stale again
            for p in range(num_p):
                _merge_current(p, S)
        step_t[s] = now - step_start
        if counting:
            F[FV, V_TIME] += now - step_start
    unused = 0
    for k in range(num_k):
        if S[K_MARK, k] == COUNTED:
            unused += 1
    S[IV, I_UNUSED] = unused
    F[FV, V_NOW] = now
    clip = 0.0
    for i in range(S[IV, I_RSIZE]):
        f = F[F_RFIN, i]
        s0 = max(F[FV, V_TAU] if lcs else now, F[F_RSTART, i])
        if f - s0 > 0:
            clip += f - s0
    F[FV, V_CLIP] = clip
    return _out(S, F, layer_counts, layer_stall, step_t)

