"""The compiled cache (``sim/cache.py``): slots per partition, reserve with eviction, the
initial contents, and a fresh cache per request."""

from __future__ import annotations

from moesim.sim.compiled.evict import _evict, _on_insert, _victim
from moesim.sim.compiled.heaps import _append
from moesim.sim.compiled.layout import (
    A_B2,
    A_T1,
    ABSENT,
    COUNTED,
    EV_LRU,
    F_ARCP,
    I_COUNTING,
    I_NQ,
    I_NUML,
    I_PSTAMP,
    I_QHEAD,
    I_QTAIL,
    I_RSIZE,
    I_WASTED,
    IV,
    K_GLIST,
    K_HPOS,
    K_INFL,
    K_LIST,
    K_MARK,
    K_NXT,
    K_OUT,
    K_PART,
    K_PIN,
    K_QSEQ,
    K_S1,
    K_STATE,
    L_HELD,
    L_TOPV,
    LOADING,
    P_CAP,
    P_CSUM,
    P_HEAD,
    P_HSIZE,
    P_NC,
    P_TAIL,
    P_USED,
    PA_HEAD,
    PA_LEN,
    PA_TAIL,
    RESIDENT,
    SFN,
    TOP_NONE,
    WARMUP,
    fn,
    typed,
)


@typed(f"b1(i8, i8, b1, i8, {SFN})")
def _reserve(ev, k, prefetch, position, S, F, nocc):
    p = S[K_PART, k]
    if S[P_USED, p] >= S[P_CAP, p]:
        v = _victim(ev, p, S, F)
        if v < 0:
            return False
        _evict(ev, p, v, S)
    S[P_USED, p] += 1
    S[K_STATE, k] = LOADING
    if prefetch:
        S[K_MARK, k] = COUNTED if S[IV, I_COUNTING] else WARMUP
    else:
        S[K_MARK, k] = 0
    _on_insert(ev, p, k, prefetch, position, S, F, nocc)
    return True


@typed("b1(i8, i8[:, ::1])")
def _lru_demand(k, S):
    """``_reserve`` + landing for a zero-latency LRU miss, without the policy dispatch: the
    first resident unpinned key of the order is the victim, the new key goes to the tail."""
    p = S[K_PART, k]
    if S[P_USED, p] >= S[P_CAP, p]:
        pstamp = S[IV, I_PSTAMP]
        v = S[P_HEAD, p]
        while v >= 0 and (S[K_STATE, v] != RESIDENT or S[K_PIN, v] == pstamp):
            v = S[K_NXT, v]
        if v < 0:
            return False
        _evict(EV_LRU, p, v, S)
    S[P_USED, p] += 1
    S[K_STATE, k] = RESIDENT
    S[K_MARK, k] = 0
    _append(p, k, S)
    return True


@typed(f"void(i8, i8, i8, {SFN})")
def _install(ev, k, position, S, F, nocc):
    p = S[K_PART, k]
    if S[K_STATE, k] != ABSENT or S[P_USED, p] >= S[P_CAP, p]:
        return
    S[P_USED, p] += 1
    S[K_STATE, k] = RESIDENT
    _on_insert(ev, p, k, False, position, S, F, nocc)


@fn
def _reset(num_k, num_p, S, F):
    """``cache.reset_per_request``: the old cache's unused prefetches are wasted; a fresh cache
    and an empty link queue (copies on the engines keep them busy but land nowhere)."""
    for k in range(num_k):
        if S[K_MARK, k] == COUNTED:
            S[IV, I_WASTED] += 1
        S[K_STATE, k] = ABSENT
        S[K_MARK, k] = 0
        S[K_HPOS, k] = -1
        S[K_QSEQ, k] = 0
        S[K_INFL, k] = 0
        S[K_OUT, k] = 0
        S[K_LIST, k] = 0
        S[K_GLIST, k] = 0
        S[K_S1, k] = 0
    for h in range(max(num_p, S[IV, I_NUML])):  # heaps per partition or per layer
        S[P_HSIZE, h] = 0
        S[L_HELD, h] = 0
        S[L_TOPV, h] = TOP_NONE
    for p in range(num_p):
        F[F_ARCP, p] = 0.0
        for lst in range(A_T1, A_B2 + 1):
            S[PA_HEAD + lst, p] = -1
            S[PA_TAIL + lst, p] = -1
            S[PA_LEN + lst, p] = 0
        S[P_USED, p] = 0
        S[P_HEAD, p] = -1
        S[P_TAIL, p] = -1
        S[P_NC, p] = 0
        S[P_CSUM, p] = 0
    S[IV, I_NQ] = 0
    S[IV, I_QHEAD] = 0
    S[IV, I_QTAIL] = 0
    S[IV, I_RSIZE] = 0

