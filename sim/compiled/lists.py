"""Fate's ARC per layer and least-stale's two insertion-ordered lists (``S`` rows)."""

from __future__ import annotations

from moesim.sim.compiled.layout import (
    A_B1,
    A_B2,
    A_T1,
    A_T2,
    A_TR,
    B_SKIP,
    F_ARCP,
    I_PSTAMP,
    IV,
    K_GLIST,
    K_GNXT,
    K_GPRV,
    K_LIST,
    K_NXT,
    K_PIN,
    K_PRV,
    K_S2,
    K_STATE,
    P_CAP,
    PA_HEAD,
    PA_LEN,
    PA_TAIL,
    RESIDENT,
    fn,
    typed,
)


# -- Fate's ARC per layer (policies/fate_arc.py) -------------------------------------------
@typed("void(i8, i8, i8, i8[:, ::1])")
def _lpush(p, lst, k, S):
    """Append k to list ``lst`` of partition p (ghost lists use their own links)."""
    prv, nxt = (K_GPRV, K_GNXT) if lst >= A_B1 else (K_PRV, K_NXT)
    t = S[PA_TAIL + lst, p]
    S[prv, k] = t
    S[nxt, k] = -1
    if t >= 0:
        S[nxt, t] = k
    else:
        S[PA_HEAD + lst, p] = k
    S[PA_TAIL + lst, p] = k
    S[PA_LEN + lst, p] += 1
    if lst >= A_B1:
        S[K_GLIST, k] = lst
    else:
        S[K_LIST, k] = lst


@typed("void(i8, i8, i8, i8[:, ::1])")
def _ldel(p, lst, k, S):
    prv, nxt = (K_GPRV, K_GNXT) if lst >= A_B1 else (K_PRV, K_NXT)
    a, b = S[prv, k], S[nxt, k]
    if a >= 0:
        S[nxt, a] = b
    else:
        S[PA_HEAD + lst, p] = b
    if b >= 0:
        S[prv, b] = a
    else:
        S[PA_TAIL + lst, p] = a
    S[PA_LEN + lst, p] -= 1
    if lst >= A_B1:
        S[K_GLIST, k] = 0
    else:
        S[K_LIST, k] = 0


@fn
def _arc_admit(p, k, S, F):
    """``FateARC._admit``: a ghost hit adapts p and goes to T2, any other key to T1."""
    c = S[P_CAP, p]
    g = S[K_GLIST, k]
    if g == A_B1:
        ratio = S[PA_LEN + A_B2, p] / S[PA_LEN + A_B1, p]
        F[F_ARCP, p] = min(float(c), F[F_ARCP, p] + max(ratio, 1.0))
        _ldel(p, A_B1, k, S)
        _lpush(p, A_T2, k, S)
    elif g == A_B2:
        ratio = S[PA_LEN + A_B1, p] / S[PA_LEN + A_B2, p]
        F[F_ARCP, p] = max(0.0, F[F_ARCP, p] - max(ratio, 1.0))
        _ldel(p, A_B2, k, S)
        _lpush(p, A_T2, k, S)
    else:
        _lpush(p, A_T1, k, S)
    while S[PA_LEN + A_T1, p] + S[PA_LEN + A_B1, p] > c and S[PA_LEN + A_B1, p]:
        _ldel(p, A_B1, S[PA_HEAD + A_B1, p], S)
    while (S[PA_LEN + A_T1, p] + S[PA_LEN + A_T2, p] + S[PA_LEN + A_B1, p]
           + S[PA_LEN + A_B2, p] > 2 * c and S[PA_LEN + A_B2, p]):
        _ldel(p, A_B2, S[PA_HEAD + A_B2, p], S)


@typed("i8(i8, i8, i8[:, ::1])")
def _arc_scan(p, lst, S):
    pstamp = S[IV, I_PSTAMP]
    v = S[PA_HEAD + lst, p]
    while v >= 0:
        if S[K_STATE, v] == RESIDENT and S[K_PIN, v] != pstamp:
            return v
        v = S[K_NXT, v]
    return -1


@fn
def _arc_victim(p, S, F):
    v = _arc_scan(p, A_TR, S)
    if v >= 0:
        return v
    first, second = (A_T1, A_T2) if S[PA_LEN + A_T1, p] > F[F_ARCP, p] else (A_T2, A_T1)
    v = _arc_scan(p, first, S)
    if v >= 0:
        return v
    return _arc_scan(p, second, S)


@fn
def _arc_evict(p, k, S):
    lst = S[K_LIST, k]
    if lst == A_TR:
        _ldel(p, A_TR, k, S)
    elif lst == A_T1:
        _ldel(p, A_T1, k, S)
        _lpush(p, A_B1, k, S)
    elif lst == A_T2:
        _ldel(p, A_T2, k, S)
        _lpush(p, A_B2, k, S)


@fn
def _arc_access(p, k, S, F):
    lst = S[K_LIST, k]
    if lst == A_TR:  # a prefetched expert is used: ARC sees it as a miss
        _ldel(p, A_TR, k, S)
        _arc_admit(p, k, S, F)
        return
    if lst != 0:
        _ldel(p, lst, k, S)
    _lpush(p, A_T2, k, S)


# -- least-stale (policies/least_stale.py) as two lists in insertion order -------------------
LS_CUR, LS_STALE = A_T1, A_T2  # the ARC list rows, unused by this policy


@fn
def _linsert_by_seq(p, lst, k, S):
    """Insert k into list ``lst`` (kept sorted by insertion sequence, K_S2)."""
    v = S[PA_TAIL + lst, p]
    while v >= 0 and S[K_S2, v] > S[K_S2, k]:
        v = S[K_PRV, v]
    nxt = S[PA_HEAD + lst, p] if v < 0 else S[K_NXT, v]
    S[K_PRV, k] = v
    S[K_NXT, k] = nxt
    if v >= 0:
        S[K_NXT, v] = k
    else:
        S[PA_HEAD + lst, p] = k
    if nxt >= 0:
        S[K_PRV, nxt] = k
    else:
        S[PA_TAIL + lst, p] = k
    S[PA_LEN + lst, p] += 1
    S[K_LIST, k] = lst


@fn
def _merge_current(p, S):
    """Step end: the current list merges into the stale one, insertion order kept."""
    if S[PA_LEN + LS_CUR, p] == 0:
        return
    a, b = S[PA_HEAD + LS_STALE, p], S[PA_HEAD + LS_CUR, p]
    n = 0
    while a >= 0 or b >= 0:  # merge two sorted lists into B_SKIP
        if b < 0 or (a >= 0 and S[K_S2, a] < S[K_S2, b]):
            S[B_SKIP, n] = a
            a = S[K_NXT, a]
        else:
            S[B_SKIP, n] = b
            b = S[K_NXT, b]
        n += 1
    prev = -1
    for i in range(n):
        k = S[B_SKIP, i]
        S[K_PRV, k] = prev
        S[K_NXT, k] = -1
        S[K_LIST, k] = LS_STALE
        if prev >= 0:
            S[K_NXT, prev] = k
        prev = k
    S[PA_HEAD + LS_STALE, p] = S[B_SKIP, 0]
    S[PA_TAIL + LS_STALE, p] = prev
    S[PA_LEN + LS_STALE, p] = n
    S[PA_HEAD + LS_CUR, p] = -1
    S[PA_TAIL + LS_CUR, p] = -1
    S[PA_LEN + LS_CUR, p] = 0

