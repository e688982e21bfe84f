"""Prefetch issue on the compiled engine: ``Simulation.prefetch`` (queue or load at once) and
the keys of the table-driven prefetchers (oracle, next_layer_all, prediction replay,
MoE-Beyond) at their point of each layer."""

from __future__ import annotations

from moesim.sim.compiled.cache import _reserve
from moesim.sim.compiled.heaps import _to_tail
from moesim.sim.compiled.layout import (
    ABSENT,
    B_PKEYS,
    B_QKEY,
    B_QSEQ,
    B_TODO,
    EV_LRU,
    EV_STATIC,
    I_COUNTING,
    I_ISSUED,
    I_LSEQ,
    I_NQ,
    I_PF_DROPPED,
    I_PF_STARTED,
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
from moesim.sim.compiled.link import _queue_compact


# -- prefetch issue (Simulation.prefetch) ---------------------------------------------------
@typed(f"void(i8, b1, b1, i8, i8, {SFN})")
def _prefetch(n, timed, touch, ev, position, S, F, nocc):
    """Prefetch the ``n`` keys in ``S[B_PKEYS]``: queue them (timed) or load them at once."""
    m = 0
    S[IV, I_TSTAMP] += 1
    counting = S[IV, I_COUNTING]
    if timed:  # onto the link's FIFO ring, its scalars kept in locals for the call
        if S[IV, I_QTAIL] + n > S[IV, I_QCAP]:  # room for every key (a live key is queued
            _queue_compact(S)  # once, so at most num_k live): the same live entries, in order
        tail = S[IV, I_QTAIL]
        seq = S[IV, I_LSEQ]
        for i in range(n):
            k = S[B_PKEYS, i]
            if S[K_STATE, k] != ABSENT:
                if touch and (ev == EV_LRU or (ev == EV_STATIC and not S[K_HOT, k])):
                    _to_tail(S[K_PART, k], k, S)
            elif S[K_QSEQ, k] == 0 and not S[K_INFL, k]:
                seq += 1
                S[K_QSEQ, k] = seq
                S[B_QKEY, tail] = k
                S[B_QSEQ, tail] = seq
                tail += 1
                m += 1
        S[IV, I_QTAIL] = tail
        S[IV, I_LSEQ] = seq
        S[IV, I_NQ] += m
        if counting:
            S[IV, I_ISSUED] += m
        return
    for i in range(n):
        k = S[B_PKEYS, i]
        if S[K_STATE, k] != ABSENT:
            if touch and (ev == EV_LRU or (ev == EV_STATIC and not S[K_HOT, k])):
                _to_tail(S[K_PART, k], k, S)
        elif S[K_TODO, k] != S[IV, I_TSTAMP]:  # listed once per call
            S[K_TODO, k] = S[IV, I_TSTAMP]
            S[B_TODO, m] = k
            m += 1
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
def _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm, counting, table, S):
    """The keys the prefetcher asks for at its point of layer j (in ``S[B_PKEYS]``), and how
    many (policies/oracle_prefetch.py, next_layer_all.py, prediction_prefetch.py,
    moe_beyond_replay.py)."""
    n = 0
    if pf == PF_ORACLE:
        g = s * num_l + j + ahead
        s2 = g // num_l
        t2 = g - s2 * num_l
        if s2 >= num_s:
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


