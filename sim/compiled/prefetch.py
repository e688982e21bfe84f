"""Prefetch issue on the compiled engine: ``Simulation.prefetch`` (queue or load at once) and
the keys of the table-driven prefetchers (oracle, next_layer_all, prediction replay,
MoE-Beyond) at their point of each layer."""

from __future__ import annotations

from moesim.sim.compiled.cache import _reserve
from moesim.sim.compiled.heaps import _to_tail
from moesim.sim.compiled.layout import (
    ABSENT,
    B_PKEYS,
    B_TODO,
    EV_LRU,
    EV_STATIC,
    I_COUNTING,
    I_ISSUED,
    I_LSEQ,
    I_PF_DROPPED,
    I_PF_STARTED,
    I_QBASE,
    I_QCAP,
    I_QTAIL,
    I_TSTAMP,
    IV,
    K_HOT,
    K_INFL,
    K_PART,
    K_QSEQ,
    K_STATE,
    K_TODO,
    PF_BEYOND,
    PF_NEXT_ALL,
    PF_ORACLE,
    PF_PRED,
    RESIDENT,
    SFN,
    fn,
    typed,
)
from moesim.sim.compiled.link import _enqueue, _queue_commit, _queue_compact


# -- prefetch issue (Simulation.prefetch) ---------------------------------------------------
@typed(f"void(i8, b1, b1, i8, i8, {SFN})")
def _prefetch(n, timed, touch, ev, position, S, F, nocc):
    """Prefetch the ``n`` keys in ``S[B_PKEYS]``: queue them (timed) or load them at once.
    One pass over the keys for both: a key already held is touched the same way in either
    mode (``prefetch_touch``), an absent one is queued (timed) or listed once (untimed)."""
    m = 0
    S[IV, I_TSTAMP] += 1
    stamp = S[IV, I_TSTAMP]
    counting = S[IV, I_COUNTING]
    if timed and S[IV, I_QTAIL] + n > S[IV, I_QCAP]:  # room on the link's FIFO ring for
        _queue_compact(S)  # every key (a live key is queued once, so at most num_k live)
    tail = S[IV, I_QTAIL]  # the ring's scalars kept in locals for the call
    seq = S[IV, I_LSEQ]
    base = S[IV, I_QBASE]  # queued: K_QSEQ above it
    for i in range(n):
        k = S[B_PKEYS, i]
        if S[K_STATE, k] != ABSENT:  # held: LRU-like evictions count the ask as a use
            if touch and (ev == EV_LRU or (ev == EV_STATIC and not S[K_HOT, k])):
                _to_tail(S[K_PART, k], k, S)
        elif timed:
            if S[K_QSEQ, k] <= base and not S[K_INFL, k]:
                seq += 1
                _enqueue(k, tail, seq, S)
                tail += 1
                m += 1
        elif S[K_TODO, k] != stamp:  # listed once per call
            S[K_TODO, k] = stamp
            S[B_TODO, m] = k
            m += 1
    if timed:
        _queue_commit(tail, seq, m, S)
        return
    done = 0
    for q in range(m):
        k = S[B_TODO, q]
        if _reserve(ev, k, True, position, S, F, nocc):
            S[K_STATE, k] = RESIDENT
            done += 1
            if counting:
                S[IV, I_PF_STARTED] += 1
        elif counting:
            S[IV, I_PF_DROPPED] += 1
    if counting:
        S[IV, I_ISSUED] += done


@fn
def _issue_keys(pf, s, j, num_l, num_e, ahead, top, wrap, warm, counting, table, S):
    """The keys the prefetcher asks for at its point of layer j (in ``S[B_PKEYS]``), and how
    many (policies/oracle_prefetch.py, next_layer_all.py, prediction_prefetch.py,
    moe_beyond_replay.py). The oracle's table has a row per step it may read: the run's
    steps in memory; a streamed chunk's steps and the look-ahead window after them
    (``sim.stream``), which stops short only where the run ends. Past its last row the
    oracle asks for nothing, as ``WorkloadFuture.keys_at`` past the run's end."""
    n = 0
    if pf == PF_ORACLE:
        g = s * num_l + j + ahead
        s2 = g // num_l
        t2 = g - s2 * num_l
        if s2 >= table.shape[0]:
            return 0
        for r in range(table.shape[2]):
            k = table[s2, t2, r]
            if k >= 0:
                S[B_PKEYS, n] = k
                n += 1
    elif pf == PF_NEXT_ALL:
        t2 = j + 1
        if t2 >= num_l:
            if not wrap:
                return 0
            t2 = 0
        for e in range(num_e):
            S[B_PKEYS, e] = t2 * num_e + e
        n = num_e
    elif pf in (PF_PRED, PF_BEYOND):
        if pf == PF_BEYOND:
            if not warm and not counting:
                return 0
            t2 = j
        else:
            t2 = j + ahead
            if t2 >= num_l:
                return 0
        for r in range(table.shape[2]):
            k = table[s, t2, r]
            if k >= 0:
                S[B_PKEYS, n] = k
                n += 1
                if top > 0 and n == top:
                    break
    return n


