"""The compiled twin of ``sim.engine``'s GPU loop, host link and expert cache (numba).

Every rule here mirrors a line of ``sim/engine.py``, ``sim/link.py``, ``sim/cache.py`` and the
shipped ``policies/*.py`` (eviction order, tie-breaks, when the link is advanced and with which
pins in place), so that a run gives the SimPy engine's counters exactly; the property test
``tests/sim/test_compiled_engine.py`` checks it run for run.

All state lives in two 2-D arrays, one row per field: ``S`` (int64: scalars and counters,
per-partition fields, per-key fields, buffers such as the eviction heaps, the running copies
and the prefetch queue) and ``F`` (float64). Every array passed to a helper costs two atomic
reference-count updates per call: a first version that passed a dozen arrays per call was
30x slower.
Eviction orders per partition are a doubly linked list (LRU, FIFO, static, least-stale) or an
indexed binary heap (LFU, Belady). The host link keeps engine free times, a heap of running
copies and a FIFO ring of queued prefetches (every shipped prefetcher uses the default
priority, which is submission order).
"""

from __future__ import annotations

import numba
import numpy as np

# Eviction kernels (sim.compiled.EVICTION maps classes to these).
EV_LRU, EV_FIFO, EV_STATIC, EV_STALE, EV_LFU, EV_BELADY, EV_ARC = 0, 1, 2, 3, 4, 5, 6
# moe_infinity_lfu without its prefetcher (no candidates): the fewest (order=min) or most
# (order=max) in-cache visits, ties by earliest insertion (policies/moe_infinity.py)
EV_VISITS_MIN, EV_VISITS_MAX = 7, 8
# Prefetch kernels.
PF_NONE, PF_ORACLE, PF_NEXT_ALL, PF_PRED, PF_BEYOND = 0, 1, 2, 3, 4
PT_PRE, PT_ROUTED, PT_ISSUED = 0, 1, 2
ABSENT, LOADING, RESIDENT = 0, 1, 2
COUNTED, WARMUP = 1, 2
HIT, LATE, PROMOTED, MISS = 0, 1, 2, 3
NO_USE = 1 << 62
INF = np.inf

# Rows of S (one int64 array: scalars, per partition, per key, buffers). Per key:
K_STATE, K_MARK, K_PIN, K_PRV, K_NXT, _K_FREE, K_HPOS, K_S1, K_S2, K_HOT = range(7, 17)
K_QSEQ, K_INFL, K_PART, K_CURSOR = range(17, 21)
# Per partition:
P_USED, P_CAP, P_HEAD, P_TAIL, P_HOFF, P_HSIZE = range(1, 7)
# Int buffers; rows of F (float buffers, then the float scalars):
B_HKEY, B_SKIP, B_TODO, B_PKEYS, B_RSEQ, B_RKEY, B_RKIND, B_QKEY, B_QSEQ = range(21, 30)
K_OUT = 30  # a pinned key held out of its heap until the layer ends (LFU, Belady)
K_TODO = 31  # stamp of the last zero-latency prefetch call that listed the key
# Fate's ARC (policies/fate_arc.py): a key is in at most one resident list (T1, T2, transient:
# K_PRV/K_NXT links) and at most one ghost list (B1, B2: K_GPRV/K_GNXT); per partition a head,
# tail and length per list (rows PA_HEAD + list, ...); the adaptive target p is in F.
K_GPRV, K_GNXT, K_LIST, K_GLIST = 32, 33, 34, 35
A_T1, A_T2, A_TR, A_B1, A_B2 = 1, 2, 3, 4, 5
PA_HEAD, PA_TAIL, PA_LEN = 35, 40, 45  # + list id (1..5)
NUM_ROWS = 51
IV = 0  # row of S holding the int scalars
F_FIN, F_RFIN, F_RSTART, F_FREE, F_ARCP = range(5)
FV = 5  # row of F holding the float scalars
NUM_FROWS = 6
# Columns of row IV of S (int scalars and counters).
I_PSTAMP, _I_FREE, I_SEQ, I_LSEQ, I_NQ, I_QHEAD, I_QTAIL, I_RSIZE, I_COUNTING = range(9)
I_DEMAND, I_ISSUED, I_PF_STARTED, I_PF_DROPPED, I_SERVED, I_USEFUL = range(9, 15)
I_WASTED, I_EVICTIONS, I_L_DEMAND, I_L_PREFETCH, I_L_DROPPED, I_ERROR, I_UNUSED = range(15, 22)
I_ENGINES, I_QCAP, I_TSTAMP = 22, 23, 24
NUM_IV = 25
# Columns of row FV of F.
V_LT, V_BUSY, V_STALL_MISS, V_STALL_LATE, V_TIME, V_NOW, V_CLIP = range(7)
NUM_FV = 7

_jit = numba.njit(cache=True, nogil=True)
# Helpers allocate nothing: compiled without NRT, a call passes arrays without the atomic
# reference-count updates that otherwise cost more than the work of a cache operation.
_fn = numba.njit(cache=True, nogil=True, _nrt=False)


# -- next use (Belady) ----------------------------------------------------------------------
@_jit
def next_occurrences(flat: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position of ``flat`` (the workload's keys, raveled: a position is the flat
    index), the next position of the same key, and each key's first position (NO_USE if none).
    One backward pass, no temporaries beyond the result."""
    nxt = np.empty(flat.shape[0], np.int64)
    last = np.full(num_keys, NO_USE, np.int64)
    for pos in range(flat.shape[0] - 1, -1, -1):
        k = flat[pos]
        if k >= 0:
            nxt[pos] = last[k]
            last[k] = pos
        else:
            nxt[pos] = NO_USE
    return nxt, last


@_fn
def _next_use(k, p, incl, nocc, S):
    """``WorkloadFuture.next_use``: first position > p (>= p if incl) of key k."""
    i = S[K_CURSOR, k]
    while i < p:
        i = nocc[i]
    S[K_CURSOR, k] = i
    if not incl and i == p:
        i = nocc[i]
    return i


# -- indexed heap (LFU, Belady): min of (s1, s2) per partition ------------------------------
@_fn
def _less(a, b, S):
    return S[K_S1, a] < S[K_S1, b] or (S[K_S1, a] == S[K_S1, b] and S[K_S2, a] < S[K_S2, b])


@_fn
def _sift_up(off, i, S):
    k = S[B_HKEY, off + i]
    while i > 0:
        parent = (i - 1) >> 1
        q = S[B_HKEY, off + parent]
        if _less(k, q, S):
            S[B_HKEY, off + i] = q
            S[K_HPOS, q] = i
            i = parent
        else:
            break
    S[B_HKEY, off + i] = k
    S[K_HPOS, k] = i


@_fn
def _sift_down(off, i, size, S):
    k = S[B_HKEY, off + i]
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and _less(S[B_HKEY, off + c + 1], S[B_HKEY, off + c], S):
            c += 1
        q = S[B_HKEY, off + c]
        if _less(q, k, S):
            S[B_HKEY, off + i] = q
            S[K_HPOS, q] = i
            i = c
        else:
            break
    S[B_HKEY, off + i] = k
    S[K_HPOS, k] = i


@_fn
def _hpush(p, k, S):
    i = S[P_HSIZE, p]
    S[P_HSIZE, p] = i + 1
    S[B_HKEY, S[P_HOFF, p] + i] = k
    S[K_HPOS, k] = i
    _sift_up(S[P_HOFF, p], i, S)


@_fn
def _hremove(p, k, S):
    off = S[P_HOFF, p]
    i = S[K_HPOS, k]
    last = S[P_HSIZE, p] - 1
    S[P_HSIZE, p] = last
    S[K_HPOS, k] = -1
    if i != last:
        q = S[B_HKEY, off + last]
        S[B_HKEY, off + i] = q
        S[K_HPOS, q] = i
        _sift_up(off, i, S)
        _sift_down(off, S[K_HPOS, q], last, S)


@_fn
def _hupdate(p, k, S):
    _sift_up(S[P_HOFF, p], S[K_HPOS, k], S)
    _sift_down(S[P_HOFF, p], S[K_HPOS, k], S[P_HSIZE, p], S)


# -- eviction policies ----------------------------------------------------------------------
@_fn
def _unlink(p, k, S):
    a, b = S[K_PRV, k], S[K_NXT, k]
    if a >= 0:
        S[K_NXT, a] = b
    else:
        S[P_HEAD, p] = b
    if b >= 0:
        S[K_PRV, b] = a
    else:
        S[P_TAIL, p] = a


@_fn
def _append(p, k, S):
    t = S[P_TAIL, p]
    S[K_PRV, k] = t
    S[K_NXT, k] = -1
    if t >= 0:
        S[K_NXT, t] = k
    else:
        S[P_HEAD, p] = k
    S[P_TAIL, p] = k


@_fn
def _to_tail(p, k, S):
    if S[P_TAIL, p] != k:
        _unlink(p, k, S)
        _append(p, k, S)


@_fn
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
    elif ev in (EV_LFU, EV_VISITS_MIN, EV_VISITS_MAX):
        S[IV, I_SEQ] += 1
        S[K_S1, k] = -1 if ev == EV_VISITS_MAX else 1
        S[K_S2, k] = S[IV, I_SEQ]
        _hpush_unless_pinned(p, k, S)
    else:  # Belady: a prefetched expert's use may be in the current layer-step itself
        S[K_S1, k] = -_next_use(k, position, prefetch, nocc, S)
        S[K_S2, k] = k
        _hpush_unless_pinned(p, k, S)


@_fn
def _hpush_unless_pinned(p, k, S):
    """A pinned key cannot be a victim: it joins the heap when its layer ends (victim = the
    smallest evictable entry either way, without popping pinned ones at every miss)."""
    if S[K_PIN, k] == S[IV, I_PSTAMP]:
        S[K_OUT, k] = 1
    else:
        _hpush(p, k, S)


@_fn
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
    elif ev in (EV_VISITS_MIN, EV_VISITS_MAX):  # one more visit; insertion order kept
        S[K_S1, k] += -1 if ev == EV_VISITS_MAX else 1
        if not S[K_OUT, k]:
            _hupdate(p, k, S)


@_fn
def _victim(ev, p, S, F):
    """The policy's victim among keys that may be evicted (resident and not pinned), or -1."""
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
    n = 0
    found = -1
    off = S[P_HOFF, p]
    while S[P_HSIZE, p] > 0:
        k = S[B_HKEY, off]
        if S[K_STATE, k] == RESIDENT and S[K_PIN, k] != pstamp:
            found = k
            break
        _hremove(p, k, S)
        S[B_SKIP, n] = k
        n += 1
    for i in range(n):
        _hpush(p, S[B_SKIP, i], S)
    return found


# -- Fate's ARC per layer (policies/fate_arc.py) -------------------------------------------
@_fn
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


@_fn
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


@_fn
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


@_fn
def _arc_scan(p, lst, S):
    pstamp = S[IV, I_PSTAMP]
    v = S[PA_HEAD + lst, p]
    while v >= 0:
        if S[K_STATE, v] == RESIDENT and S[K_PIN, v] != pstamp:
            return v
        v = S[K_NXT, v]
    return -1


@_fn
def _arc_victim(p, S, F):
    v = _arc_scan(p, A_TR, S)
    if v >= 0:
        return v
    first, second = (A_T1, A_T2) if S[PA_LEN + A_T1, p] > F[F_ARCP, p] else (A_T2, A_T1)
    v = _arc_scan(p, first, S)
    if v >= 0:
        return v
    return _arc_scan(p, second, S)


@_fn
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


@_fn
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


@_fn
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


@_fn
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


# -- the cache (sim/cache.py) ---------------------------------------------------------------
@_fn
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
    else:
        _hremove(p, k, S)


@_fn
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


@_fn
def _install(ev, k, position, S, F, nocc):
    p = S[K_PART, k]
    if S[K_STATE, k] != ABSENT or S[P_USED, p] >= S[P_CAP, p]:
        return
    S[P_USED, p] += 1
    S[K_STATE, k] = RESIDENT
    _on_insert(ev, p, k, False, position, S, F, nocc)


# -- the host link (sim/link.py) ------------------------------------------------------------
@_fn
def _rless(a, b, S, F):
    return F[F_RFIN, a] < F[F_RFIN, b] or (F[F_RFIN, a] == F[F_RFIN, b]
                                             and S[B_RSEQ, a] < S[B_RSEQ, b])


@_fn
def _rswap(a, b, S, F):
    F[F_RFIN, a], F[F_RFIN, b] = F[F_RFIN, b], F[F_RFIN, a]
    F[F_RSTART, a], F[F_RSTART, b] = F[F_RSTART, b], F[F_RSTART, a]
    S[B_RSEQ, a], S[B_RSEQ, b] = S[B_RSEQ, b], S[B_RSEQ, a]
    S[B_RKEY, a], S[B_RKEY, b] = S[B_RKEY, b], S[B_RKEY, a]
    S[B_RKIND, a], S[B_RKIND, b] = S[B_RKIND, b], S[B_RKIND, a]


@_fn
def _rpush(fin, key, kind, start, S, F):
    """A scheduled copy (finish, seq, key, kind, start), ordered by (finish, seq)."""
    S[IV, I_LSEQ] += 1
    i = S[IV, I_RSIZE]
    S[IV, I_RSIZE] = i + 1
    F[F_RFIN, i], F[F_RSTART, i] = fin, start
    S[B_RSEQ, i], S[B_RKEY, i], S[B_RKIND, i] = S[IV, I_LSEQ], key, kind
    while i > 0:
        parent = (i - 1) >> 1
        if not _rless(i, parent, S, F):
            break
        _rswap(i, parent, S, F)
        i = parent


@_fn
def _rpop(S, F):
    key = S[B_RKEY, 0]
    last = S[IV, I_RSIZE] - 1
    S[IV, I_RSIZE] = last
    _rswap(0, last, S, F)
    i = 0
    while True:
        c = 2 * i + 1
        if c >= last:
            break
        if c + 1 < last and _rless(c + 1, c, S, F):
            c += 1
        if not _rless(c, i, S, F):
            break
        _rswap(i, c, S, F)
        i = c
    return key


@_fn
def _argmin_free(S, F):
    e = 0
    for i in range(1, S[IV, I_ENGINES]):
        if F[F_FREE, i] < F[F_FREE, e]:
            e = i
    return e


@_fn
def _submit_demand(k, duration, direct, S, F):
    """``HostLink.submit_demand``. ``direct``: a run without prefetches, where nothing can
    observe a copy in flight (the GPU waits for every copy of a layer before the next one,
    whose pinned keys are the only ones it touches), so the copy lands at once and only its
    arrival time is kept for the layer's schedule."""
    e = _argmin_free(S, F)
    free = F[F_FREE, e]
    start = free if free > F[FV, V_LT] else F[FV, V_LT]
    finish = start + duration
    F[F_FREE, e] = finish
    if direct:
        S[K_STATE, k] = RESIDENT
        S[IV, I_LSEQ] += 1
    else:
        _rpush(finish, k, 0, start, S, F)
    F[F_FIN, k] = finish
    S[K_INFL, k] = 1
    F[FV, V_BUSY] += duration
    if S[IV, I_COUNTING]:
        S[IV, I_L_DEMAND] += 1


@_fn
def _queue_push(k, S):
    if S[IV, I_QTAIL] == S[IV, I_QCAP]:  # compact: drop withdrawn entries, keep the order
        n = 0
        for i in range(S[IV, I_QHEAD], S[IV, I_QTAIL]):
            if S[K_QSEQ, S[B_QKEY, i]] == S[B_QSEQ, i]:
                S[B_QKEY, n] = S[B_QKEY, i]
                S[B_QSEQ, n] = S[B_QSEQ, i]
                n += 1
        S[IV, I_QHEAD] = 0
        S[IV, I_QTAIL] = n
    S[IV, I_LSEQ] += 1
    S[K_QSEQ, k] = S[IV, I_LSEQ]
    S[B_QKEY, S[IV, I_QTAIL]] = k
    S[B_QSEQ, S[IV, I_QTAIL]] = S[IV, I_LSEQ]
    S[IV, I_QTAIL] += 1
    S[IV, I_NQ] += 1


@_fn
def _advance(until, duration, ev, position, S, F, nocc):
    """``HostLink.advance``: completions and prefetch starts up to ``until``, in time order."""
    while True:
        done = F[F_RFIN, 0] if S[IV, I_RSIZE] > 0 else INF
        start = INF
        if S[IV, I_NQ] > 0:
            start = F[F_FREE, _argmin_free(S, F)]
            if start < F[FV, V_LT]:
                start = F[FV, V_LT]
        if done <= start:  # a completion frees its engine before a start can use it
            if done > until:
                break
            key = _rpop(S, F)
            F[FV, V_LT] = done
            S[K_INFL, key] = 0
            S[K_STATE, key] = RESIDENT
        else:
            if start > until:
                break
            F[FV, V_LT] = start
            while True:  # the oldest live queued prefetch
                key = S[B_QKEY, S[IV, I_QHEAD]]
                sq = S[B_QSEQ, S[IV, I_QHEAD]]
                S[IV, I_QHEAD] += 1
                if S[K_QSEQ, key] == sq:
                    S[K_QSEQ, key] = 0
                    S[IV, I_NQ] -= 1
                    break
            if not _reserve(ev, key, True, position, S, F, nocc):
                S[IV, I_L_DROPPED] += 1
                continue
            e = _argmin_free(S, F)
            finish = F[FV, V_LT] + duration
            F[F_FREE, e] = finish
            _rpush(finish, key, 1, F[FV, V_LT], S, F)
            F[F_FIN, key] = finish
            S[K_INFL, key] = 1
            F[FV, V_BUSY] += duration
            if S[IV, I_COUNTING]:
                S[IV, I_L_PREFETCH] += 1
    if until > F[FV, V_LT]:
        F[FV, V_LT] = until


# -- prefetch issue (Simulation.prefetch) ---------------------------------------------------
@_fn
def _prefetch(n, timed, touch, ev, position, S, F, nocc):
    """Prefetch the ``n`` keys in ``S[B_PKEYS]``: queue them (timed) or load them at once."""
    m = 0
    S[IV, I_TSTAMP] += 1
    for i in range(n):
        k = S[B_PKEYS, i]
        if S[K_STATE, k] != ABSENT:
            if touch and (ev == EV_LRU or (ev == EV_STATIC and not S[K_HOT, k])):
                _to_tail(S[K_PART, k], k, S)
        elif timed:
            if S[K_QSEQ, k] == 0 and not S[K_INFL, k]:
                _queue_push(k, S)
                m += 1
        elif S[K_TODO, k] != S[IV, I_TSTAMP]:  # listed once per call
            S[K_TODO, k] = S[IV, I_TSTAMP]
            S[B_TODO, m] = k
            m += 1
    counting = S[IV, I_COUNTING]
    if timed:
        if counting:
            S[IV, I_ISSUED] += m
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


@_fn
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


@_fn
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
    for p in range(num_p):
        F[F_ARCP, p] = 0.0
        for lst in range(A_T1, A_B2 + 1):
            S[PA_HEAD + lst, p] = -1
            S[PA_TAIL + lst, p] = -1
            S[PA_LEN + lst, p] = 0
        S[P_USED, p] = 0
        S[P_HEAD, p] = -1
        S[P_TAIL, p] = -1
        S[P_HSIZE, p] = 0
    S[IV, I_NQ] = 0
    S[IV, I_QHEAD] = 0
    S[IV, I_QTAIL] = 0
    S[IV, I_RSIZE] = 0


@_jit
def _out(S, F, layer_counts, layer_stall):
    return S[IV, :NUM_IV].copy(), F[FV, :NUM_FV].copy(), layer_counts, layer_stall


# -- the run --------------------------------------------------------------------------------
@_jit
def replay(keys, counts, use_counts, counted, attn, shared, dense_step, dense_n, part, caps,
           num_e, timed, pin_layer, engines, duration, cost, ev, hot, touch, pf, point,
           hooks, ahead, top, wrap, warm, table, resets, inst_off, inst_keys, nocc, cursor):
    """One run; returns (int scalars, float scalars, layer counts [4, L], layer stall [L])."""
    num_s, num_l, width = keys.shape
    num_k = num_l * num_e
    num_p = caps.shape[0]
    layer_counts = np.zeros((4, num_l), np.int64)
    layer_stall = np.zeros(num_l)
    qcap = 4 * num_k + 16
    nb = max(qcap, caps.sum() + 1, table.shape[2] + num_e + 1, NUM_IV)
    S = np.zeros((NUM_ROWS, nb), np.int64)
    F = np.zeros((NUM_FROWS, max(num_k + 1, engines, NUM_FV)))
    for row in (K_PIN, K_PRV, K_NXT, K_HPOS, K_TODO, P_HEAD, P_TAIL):
        S[row, :] = -1
    for lst in range(A_T1, A_B2 + 1):
        S[PA_HEAD + lst, :] = -1
        S[PA_TAIL + lst, :] = -1
    for k in range(num_k):
        S[K_HOT, k] = 1 if hot[k] else 0
        S[K_PART, k] = part[k // num_e]
        S[K_CURSOR, k] = cursor[k] if cursor.shape[0] == num_k else NO_USE
    for p in range(num_p):
        S[P_CAP, p] = caps[p]
        if p > 0:
            S[P_HOFF, p] = S[P_HOFF, p - 1] + caps[p - 1]
    S[IV, I_ENGINES] = engines
    S[IV, I_QCAP] = qcap
    kinds = np.zeros(width, np.int64)
    lkeys = np.zeros(width, np.int64)
    wait_r = np.zeros(width)
    wait_i = np.zeros(width, np.int64)
    hook_pre, hook_routed, hook_issued = hooks[0], hooks[1], hooks[2]
    direct = timed and pf == PF_NONE
    heap = ev in (EV_LFU, EV_BELADY, EV_VISITS_MIN, EV_VISITS_MAX)
    position = 0
    for i in range(inst_off[0], inst_off[1]):  # the cache the engine built before the run
        _install(ev, inst_keys[i], position, S, F, nocc)
    n_reset = 0
    now = 0.0
    for s in range(num_s):
        if resets[s]:  # cache.reset_per_request: a fresh cache for the joining request
            if timed:
                _advance(now, duration, ev, position, S, F, nocc)
            _reset(num_k, num_p, S, F)
            n_reset += 1
            for i in range(inst_off[n_reset], inst_off[n_reset + 1]):
                _install(ev, inst_keys[i], position, S, F, nocc)
        counting = counted[s]
        S[IV, I_COUNTING] = 1 if counting else 0
        step_start = now
        for j in range(num_l):
            base = (s * num_l + j) * width
            position = base
            if hook_pre:
                if timed:
                    _advance(now, duration, ev, position, S, F, nocc)
                if point == PT_PRE:
                    n = _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, S)
                    if n:
                        _prefetch(n, timed, touch, ev, position, S, F, nocc)
                if timed:
                    _advance(now, duration, ev, position, S, F, nocc)
            if timed:
                d = attn[s]
                if dense_n[j]:
                    d += dense_n[j] * dense_step[s]
                if d > 0:
                    now = now + d
                _advance(now, duration, ev, position, S, F, nocc)
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
                            _hremove(S[K_PART, k], k, S)
                            S[K_OUT, k] = 1
            if hook_routed:
                if point == PT_ROUTED:
                    n = _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, S)
                    if n:
                        _prefetch(n, timed, touch, ev, position, S, F, nocc)
                if timed:
                    _advance(now, duration, ev, position, S, F, nocc)
            any_wait = False
            for r in range(n_keys):  # Simulation._access
                k = lkeys[r]
                position = base + r
                st = S[K_STATE, k]
                if st != ABSENT:
                    kind = HIT if st == RESIDENT else LATE
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
                    if S[K_QSEQ, k] != 0:  # a queued prefetch, withdrawn and promoted
                        S[K_QSEQ, k] = 0
                        S[IV, I_NQ] -= 1
                        kind = PROMOTED
                    if not _reserve(ev, k, False, position, S, F, nocc):
                        S[IV, I_ERROR] = j + 1
                        return _out(S, F, layer_counts, layer_stall)
                    if timed:
                        _submit_demand(k, duration, direct, S, F)
                    else:
                        S[K_STATE, k] = RESIDENT
                    if counting:
                        S[IV, I_DEMAND] += 1
                if counting:
                    layer_counts[kind, j] += 1
                kinds[r] = kind
                if kind != HIT:
                    any_wait = True
            position = base + width - 1
            if hook_issued and point == PT_ISSUED:
                n = _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm, counting,
                                table, S)
                if n:
                    _prefetch(n, timed, touch, ev, position, S, F, nocc)
            if timed:
                if S[IV, I_NQ] > 0:
                    _advance(now, duration, ev, position, S, F, nocc)
                t = now
                if not use_counts and not any_wait:
                    end = t + shared[s] + n_keys * cost[1]
                else:  # engine._schedule: resident experts first, then by arrival
                    nw = 0
                    cur_t = t + shared[s]
                    for r in range(n_keys):
                        if kinds[r] == HIT:
                            cur_t += cost[counts[s, j, r]] if use_counts else cost[1]
                            continue
                        k = lkeys[r]
                        if S[K_INFL, k]:
                            ready = F[F_FIN, k]
                        elif S[K_STATE, k] == RESIDENT:
                            ready = F[FV, V_LT]
                        else:
                            S[IV, I_ERROR] = -(j + 1)
                            return _out(S, F, layer_counts, layer_stall)
                        q = nw  # insertion sort by (ready, rank)
                        while q > 0 and wait_r[q - 1] > ready:
                            wait_r[q] = wait_r[q - 1]
                            wait_i[q] = wait_i[q - 1]
                            q -= 1
                        wait_r[q] = ready
                        wait_i[q] = r
                        nw += 1
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
                    _advance(now, duration, ev, position, S, F, nocc)
            if pin_layer:
                if heap:
                    for r in range(n_keys):
                        k = lkeys[r]
                        if S[K_OUT, k]:
                            S[K_OUT, k] = 0
                            if S[K_STATE, k] != ABSENT:
                                _hpush(S[K_PART, k], k, S)
                S[IV, I_PSTAMP] += 1
        if ev == EV_STALE:  # a new forward pass: every current key is stale again
            for p in range(num_p):
                _merge_current(p, S)
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
        s0 = F[F_RSTART, i] if F[F_RSTART, i] > now else now
        if f - s0 > 0:
            clip += f - s0
    F[FV, V_CLIP] = clip
    return _out(S, F, layer_counts, layer_stall)
