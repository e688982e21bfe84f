"""Eviction policies on the compiled cache: insertion, access, victim and eviction per kernel
code (``EV_*``), each the twin of a shipped ``policies/*.py`` class (tie-breaks included)."""

from __future__ import annotations

from moesim.sim.compiled.heaps import (
    _append,
    _hpush,
    _hremove,
    _hupdate,
    _less,
    _next_use,
    _to_tail,
    _unlink,
)
from moesim.sim.compiled.layout import (
    A_TR,
    ABSENT,
    B_HKEY,
    B_SKIP,
    COUNTED,
    EV_ARC,
    EV_BELADY,
    EV_LFU,
    EV_LRU,
    EV_MI_MAX,
    EV_MI_MIN,
    EV_MI_PRIO,
    EV_STALE,
    EV_STATIC,
    EV_VISITS_MAX,
    EV_VISITS_MIN,
    F_DN,
    F_TN,
    F_TTAB,
    I_CHI,
    I_CLO,
    I_CSTAMP,
    I_CWIDTH,
    I_DEMPH,
    I_DUNI,
    I_EVICTIONS,
    I_HASCAND,
    I_LAYER,
    I_NUME,
    I_NUML,
    I_NUMP,
    I_PSTAMP,
    I_SEQ,
    I_TCUR,
    I_TOPOK,
    I_WASTED,
    INF,
    IV,
    K_CAND,
    K_HEAP,
    K_HOT,
    K_LIST,
    K_MARK,
    K_NXT,
    K_OUT,
    K_PIN,
    K_S1,
    K_S2,
    K_STATE,
    L_HELD,
    L_TOPV,
    NO_USE,
    P_CSUM,
    P_HEAD,
    P_HOFF,
    P_HSIZE,
    P_NC,
    P_USED,
    RESIDENT,
    SF,
    SFN,
    TOP_NONE,
    TOP_OFF,
    TOP_SHIFT,
    fn,
    typed,
)
from moesim.sim.compiled.lists import (
    LS_CUR,
    LS_STALE,
    _arc_access,
    _arc_admit,
    _arc_evict,
    _arc_scan,
    _arc_victim,
    _ldel,
    _linsert_by_seq,
    _lpush,
)
from moesim.sim.compiled.sums import pairwise


# -- MoE-Infinity's evictors (policies/moe_infinity.py: _VisitCounts and its subclasses) ---
@fn
def _is_cand(k, S):
    """In the prefetcher's current candidate set (layers CLO..CHI, top CWIDTH of each)."""
    if not S[IV, I_HASCAND]:
        return False
    j = k // S[IV, I_NUME]
    if j < S[IV, I_CLO] or j > S[IV, I_CHI]:
        return False
    return S[IV, I_CWIDTH] == 0 or S[K_CAND, k] == S[IV, I_CSTAMP]


@fn
def _hpush_unless_pinned(h, k, S):
    """A pinned key cannot be a victim: it joins the heap when its layer ends (victim = the
    smallest evictable entry either way, without popping pinned ones at every miss)."""
    if S[K_PIN, k] == S[IV, I_PSTAMP]:
        S[K_OUT, k] = 1
    else:
        _hpush(h, k, S)


@fn
def _settop(h, S):
    """``L_TOPV[h]``: layer heap ``h``'s top packed as one int64 that orders as ``_less``
    does (TOP_NONE when empty); a count or number outside the packing turns the packed scan
    off for the rest of the run (``I_TOPOK``)."""
    if S[P_HSIZE, h] == 0:
        S[L_TOPV, h] = TOP_NONE
        return
    k = S[B_HKEY, S[P_HOFF, h]]
    a = S[K_S1, k] + TOP_OFF
    b = S[K_S2, k]
    if a < 0 or a >= 2 * TOP_OFF or b < 0 or b >= (1 << TOP_SHIFT):
        S[IV, I_TOPOK] = 0
    S[L_TOPV, h] = (a << TOP_SHIFT) | b


@fn
def _mi_insert(ev, p, k, S):
    """``_VisitCounts.on_insert``: one visit, a new insertion number, one more non-candidate
    unless protected."""
    S[IV, I_SEQ] += 1
    S[K_S1, k] = -1 if ev == EV_MI_MAX else 1
    S[K_S2, k] = k if ev == EV_MI_PRIO else S[IV, I_SEQ]  # ties: lowest key / first inserted
    S[L_HELD, k // S[IV, I_NUME]] += 1
    if not _is_cand(k, S):
        S[P_NC, p] += 1
    if ev == EV_MI_PRIO:
        S[P_CSUM, p] += 1
    _hpush_unless_pinned(S[K_HEAP, k], k, S)
    if ev != EV_MI_PRIO:
        _settop(S[K_HEAP, k], S)


@fn
def _mi_evict(ev, p, k, S):
    S[L_HELD, k // S[IV, I_NUME]] -= 1
    if not _is_cand(k, S):
        S[P_NC, p] -= 1
    if ev == EV_MI_PRIO:
        S[P_CSUM, p] -= S[K_S1, k]
        S[K_S1, k] = 0
    _hremove(S[K_HEAP, k], k, S)
    if ev != EV_MI_PRIO:
        _settop(S[K_HEAP, k], S)


@typed("i8(i8, b1, i8[:, ::1])")
def _heap_best(h, skip_cand, S):
    """The smallest entry of heap ``h`` that may be evicted now (and is no candidate if
    ``skip_cand``), or -1; entries set aside on the way are put back."""
    n = 0
    found = -1
    off = S[P_HOFF, h]
    pstamp = S[IV, I_PSTAMP]
    while S[P_HSIZE, h] > 0:
        k = S[B_HKEY, off]
        if (S[K_STATE, k] == RESIDENT and S[K_PIN, k] != pstamp
                and not (skip_cand and _is_cand(k, S))):
            found = k
            break
        _hremove(h, k, S)
        S[B_SKIP, n] = k
        n += 1
    for i in range(n):
        _hpush(h, S[B_SKIP, i], S)
    return found


@fn
def _t_of(cur, num_l, num_e, F, row, off):
    """``MoEInfinityPriority``'s T per layer while layer ``cur`` is computed, into
    ``F[row, off:off + num_l]``, with the arithmetic of its numpy expression."""
    for i in range(num_l):
        F[row, off + i] = 1.0 if i <= cur else i / (num_l + 1)
    tsum = pairwise(F, row, off, num_l)
    for i in range(num_l):
        F[row, off + i] = F[row, off + i] / (tsum * num_e) + 1e-6


@fn
def _prio_t(S, F):
    """T per layer in ``F[F_TN]`` for the current layer (when the layer changed): copied from a
    table of every current layer's T (``F_TTAB``, computed at the first use; its last cell
    says it is), or computed if the table does not fit in a row."""
    cur = S[IV, I_LAYER]
    if S[IV, I_TCUR] == cur:
        return
    S[IV, I_TCUR] = cur
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    tab = num_l * num_l
    if tab + 1 > F.shape[1]:
        _t_of(cur, num_l, num_e, F, F_TN, 0)
        return
    if F[F_TTAB, tab] != 1.0:
        for c in range(num_l):
            _t_of(c, num_l, num_e, F, F_TTAB, c * num_l)
        F[F_TTAB, tab] = 1.0
    for i in range(num_l):
        F[F_TN, i] = F[F_TTAB, cur * num_l + i]


@fn
def _prio_scan(p, lo, hi, skip_cand, S, F):
    """The lowest ``T * D * F`` among evictable keys of layers ``lo..hi`` (ties: lowest key),
    with the arithmetic of ``MoEInfinityPriority._scores``; (key or -1, its score). Only the
    held keys are visited: the layer heaps hold every one that is not pinned (a pinned key is
    no victim)."""
    total = float(S[P_CSUM, p])
    pstamp = S[IV, I_PSTAMP]
    best = -1
    best_s = INF
    for i in range(lo, hi + 1):
        off = S[P_HOFF, i]
        for q in range(S[P_HSIZE, i]):
            k = S[B_HKEY, off + q]
            c = S[K_S1, k]
            if c <= 0 or S[K_STATE, k] != RESIDENT or S[K_PIN, k] == pstamp:
                continue
            if skip_cand and _is_cand(k, S):
                continue
            sc = (F[F_TN, i] * F[F_DN, k]) * (c / total + 1e-6)
            if sc < best_s or (sc == best_s and k < best):
                best_s = sc
                best = k
    return best, best_s


@fn
def _evictable_top(h, skip_cand, S):
    """Heap ``h``'s smallest entry if it may be evicted now (else -1: ``_heap_best`` sets the
    entries aside), without the call; -1 too for an empty heap."""
    if S[P_HSIZE, h] == 0:
        return -1
    k = S[B_HKEY, S[P_HOFF, h]]
    if (S[K_STATE, k] == RESIDENT and S[K_PIN, k] != S[IV, I_PSTAMP]
            and not (skip_cand and _is_cand(k, S))):
        return k
    return -1


# Below this total of visits one more visit always scores strictly more (_prio_layers).
TIE_TOTAL = float(2**40)


@fn
def _prio_layers(p, skip_cand, S, F):
    """``_prio_scan`` over the whole partition when D is the same for every key, from the layer
    heaps (visits, then key): within a layer the score grows with the visits (T and D fixed,
    every float step monotone), so the layer's evictable minimum is its heap's best, unless
    one more visit would score the same (then that layer is scanned whole). Layers are taken
    in order of T (after the current layer: ascending; then the current and earlier ones,
    equal), and the walk stops once a layer's least possible score (one visit) is above the
    best so far: every later layer's is at least as large.

    A later layer's weight ``T D`` is at least the best's, so once one more visit scores
    strictly above the best (``w ((c + 1) / total + 1e-6) > best``), a layer whose heap top
    has more visits than the best's ``c`` cannot win, not even on a tie: it is passed on
    two integer loads, without its float score or its heap's walk."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    cur = S[IV, I_LAYER]
    total = float(S[P_CSUM, p])
    dn = F[F_DN, 0]
    best = -1
    best_s = INF
    above = NO_USE  # visits above which a layer cannot win (NO_USE: no such bound yet)
    one = 1 / total + 1e-6  # c / total + 1e-6 for one visit: the same float for every layer
    for q in range(num_l):
        i = cur + 1 + q if cur + 1 + q < num_l else q - (num_l - 1 - cur)
        w = F[F_TN, i] * dn
        low = w * one
        if low > best_s or (low == best_s and best < i * num_e):
            if low > best_s:
                break
            continue
        if S[P_HSIZE, i] == 0 or S[K_S1, S[B_HKEY, S[P_HOFF, i]]] > above:
            continue  # empty (_heap_best: -1), or no key here beats the best
        k = _evictable_top(i, skip_cand, S)
        if k < 0:
            k = _heap_best(i, skip_cand, S)
            if k < 0:
                continue
        c = S[K_S1, k]
        sc = w * one if c == 1 else w * (c / total + 1e-6)
        # one more visit scores the same only for a huge total: below 2**40 the two quotients
        # differ by 1/total, far more than the rounding of the sums and products (each step
        # rounds by at most 2**-53 relative, the values are at most 1 + 1e-6)
        tie = total >= TIE_TOTAL and w * ((c + 1) / total + 1e-6) == sc
        if tie:  # a more visited key could tie: scan the layer
            k, sc = _prio_scan(p, i, i, skip_cand, S, F)
        if sc < best_s or (sc == best_s and k < best):
            best_s = sc
            best = k
            above = NO_USE if tie else c
    return best


@fn
def _prio_best(p, skip_cand, S, F):
    """``MoEInfinityPriority``: the lowest ``T * D * F`` among evictable keys (ties: lowest key),
    with the arithmetic of its numpy expression."""
    _prio_t(S, F)
    if S[IV, I_NUMP] > 1:  # one partition per layer
        k, _ = _prio_scan(p, p, p, skip_cand, S, F)
        return k
    if S[IV, I_DUNI]:
        return _prio_layers(p, skip_cand, S, F)
    k, _ = _prio_scan(p, 0, S[IV, I_NUML] - 1, skip_cand, S, F)
    return k


@fn
def _least_top(lo, hi, skip_whole, S):
    """The layer in ``lo..hi`` (without the candidates' layers ``CLO..CHI`` if
    ``skip_whole``) whose heap top is least (``L_TOPV``), or -1 if their heaps are empty.
    Its top, if it may be evicted, is ``_mi_best``'s victim: every other layer's best is
    at least its own top, which is greater (the insertion numbers are distinct)."""
    a1, b0 = hi, hi + 1  # the two ranges lo..a1 and b0..hi
    if skip_whole:
        a1 = min(hi, S[IV, I_CLO] - 1)
        b0 = max(lo, S[IV, I_CHI] + 1)
    best = -1
    bv = TOP_NONE
    for j in range(lo, a1 + 1):
        if S[L_TOPV, j] < bv:
            bv = S[L_TOPV, j]
            best = j
    for j in range(b0, hi + 1):
        if S[L_TOPV, j] < bv:
            bv = S[L_TOPV, j]
            best = j
    return best


@fn
def _mi_best(ev, p, skip_cand, S, F):
    if ev == EV_MI_PRIO:
        return _prio_best(p, skip_cand, S, F)
    lo, hi = 0, S[IV, I_NUML] - 1
    if S[IV, I_NUMP] > 1:
        lo, hi = p, p
    whole = S[IV, I_HASCAND] and S[IV, I_CWIDTH] == 0
    if S[IV, I_TOPOK]:  # the least packed top; its key, if it may be evicted
        v = _least_top(lo, hi, skip_cand and whole, S)
        if v < 0:
            return -1  # every heap in range is empty
        v = _evictable_top(v, skip_cand, S)
        if v >= 0:
            return v
    best = -1
    for j in range(lo, hi + 1):
        if skip_cand and whole and S[IV, I_CLO] <= j <= S[IV, I_CHI]:
            continue  # every key of this layer is a candidate
        if S[P_HSIZE, j] == 0:
            continue
        if best >= 0 and not _less(S[B_HKEY, S[P_HOFF, j]], best, S):
            continue  # the heap's evictable best is no smaller than its top
        v = _evictable_top(j, skip_cand, S)
        if v < 0:
            v = _heap_best(j, skip_cand, S)
        if v >= 0 and (best < 0 or _less(v, best, S)):
            best = v
    return best


@fn
def _mi_victim(ev, p, S, F):
    """``_VisitCounts.victim``: candidates are protected; a prefetch that finds only candidates
    is dropped, a demand fetch then takes one."""
    if S[P_USED, p] == 0:
        return -1
    protect = S[IV, I_HASCAND] != 0
    demand = S[IV, I_DEMPH] != 0
    if protect and S[P_NC, p] == 0 and not demand:
        return -1
    if protect and S[P_NC, p] > 0:  # else no key may be evicted but a candidate
        v = _mi_best(ev, p, True, S, F)
        if v >= 0 or not demand:
            return v
    return _mi_best(ev, p, False, S, F)


# -- every policy ----------------------------------------------------------------------------
@typed(f"void(i8, i8, i8, b1, i8, {SFN})")
def _on_insert(ev, p, k, prefetch, position, S, F, nocc):
    if ev == EV_STALE:  # current until the step ends; insertion order kept as a sequence
        S[IV, I_SEQ] += 1
        S[K_S2, k] = S[IV, I_SEQ]
        _lpush(p, LS_CUR, k, S)
    elif ev <= EV_STATIC:
        if ev == EV_STATIC and S[K_HOT, k]:  # never a victim: kept out of the LRU order
            return
        _append(p, k, S)
    elif ev == EV_ARC:
        if prefetch:
            _lpush(p, A_TR, k, S)
        else:
            _arc_admit(p, k, S, F)
    elif ev >= EV_MI_MIN:
        _mi_insert(ev, p, k, S)
    elif ev in (EV_LFU, EV_VISITS_MIN, EV_VISITS_MAX):
        S[IV, I_SEQ] += 1
        S[K_S1, k] = -1 if ev == EV_VISITS_MAX else 1
        S[K_S2, k] = S[IV, I_SEQ]
        _hpush_unless_pinned(p, k, S)
    else:  # Belady: a prefetched expert's use may be in the current layer-step itself
        S[K_S1, k] = -_next_use(k, position, prefetch, nocc, S)
        S[K_S2, k] = k
        _hpush_unless_pinned(p, k, S)


@typed(f"void(i8, i8, i8, i8, {SFN})")
def _on_access(ev, p, k, position, S, F, nocc):
    if ev == EV_LRU or (ev == EV_STATIC and not S[K_HOT, k]):
        _to_tail(p, k, S)
    elif ev == EV_STALE:
        if S[K_LIST, k] == LS_STALE:
            _ldel(p, LS_STALE, k, S)
            _linsert_by_seq(p, LS_CUR, k, S)
    elif ev == EV_ARC:
        _arc_access(p, k, S, F)
    elif ev == EV_LFU:
        S[IV, I_SEQ] += 1
        S[K_S1, k] += 1
        S[K_S2, k] = S[IV, I_SEQ]
        if not S[K_OUT, k]:
            _hupdate(p, k, S)
    elif ev == EV_BELADY:
        S[K_S1, k] = -_next_use(k, position, False, nocc, S)
        if not S[K_OUT, k]:
            _hupdate(p, k, S)
    elif ev == EV_MI_PRIO:
        S[K_S1, k] += 1
        S[P_CSUM, p] += 1
        if not S[K_OUT, k]:
            _hupdate(S[K_HEAP, k], k, S)
    elif ev in (EV_VISITS_MIN, EV_VISITS_MAX, EV_MI_MIN, EV_MI_MAX):
        # one more visit; insertion order kept
        S[K_S1, k] += -1 if ev in (EV_VISITS_MAX, EV_MI_MAX) else 1
        if not S[K_OUT, k]:
            _hupdate(S[K_HEAP, k], k, S)
            if ev >= EV_MI_MIN:
                _settop(S[K_HEAP, k], S)


@typed(f"i8(i8, i8, {SF})")
def _victim(ev, p, S, F):
    """The policy's victim among keys that may be evicted (resident and not pinned), or -1."""
    if ev >= EV_MI_MIN:
        return _mi_victim(ev, p, S, F)
    if ev == EV_ARC:
        return _arc_victim(p, S, F)
    if ev == EV_STALE:  # the first stale one in insertion order, else the first current one
        v = _arc_scan(p, LS_STALE, S)
        return v if v >= 0 else _arc_scan(p, LS_CUR, S)
    pstamp = S[IV, I_PSTAMP]
    if ev <= EV_STATIC:
        v = S[P_HEAD, p]
        while v >= 0:
            if S[K_STATE, v] == RESIDENT and S[K_PIN, v] != pstamp:
                return v
            v = S[K_NXT, v]
        return -1
    # heap: set aside the smallest entries that may not be evicted now, as policies/_heap.py
    return _heap_best(p, False, S)


@typed("void(i8, i8, i8, i8[:, ::1])")
def _evict(ev, p, k, S):
    S[K_STATE, k] = ABSENT
    S[P_USED, p] -= 1
    S[IV, I_EVICTIONS] += 1
    if S[K_MARK, k]:
        if S[K_MARK, k] == COUNTED:
            S[IV, I_WASTED] += 1
        S[K_MARK, k] = 0
    if ev == EV_STALE:
        _ldel(p, S[K_LIST, k], k, S)
    elif ev <= EV_STATIC:
        _unlink(p, k, S)
    elif ev == EV_ARC:
        _arc_evict(p, k, S)
    elif ev >= EV_MI_MIN:
        _mi_evict(ev, p, k, S)
    else:
        _hremove(p, k, S)
