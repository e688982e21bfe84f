"""The compiled twin of ``sim.engine``'s GPU loop, host link and expert cache (numba).

Every rule here mirrors a line of ``sim/engine.py``, ``sim/link.py``, ``sim/cache.py`` and the
shipped ``policies/*.py`` (eviction order, tie-breaks, when the link is advanced and with which
pins in place), so that a run gives the SimPy engine's counters exactly; the property test
``tests/sim/test_compiled_engine.py`` checks it run for run. Comments name the Python line a
block follows where the reason is not obvious.

State lives in flat arrays indexed by expert key; the per-partition eviction orders are either
a doubly linked list (LRU, FIFO, static, least-stale) or an indexed binary heap (LFU, Belady).
The host link keeps engine free times, a heap of running copies and a FIFO ring of queued
prefetches (every shipped prefetcher uses the default priority, i.e. submission order).
"""

from __future__ import annotations

import numba
import numpy as np

# Eviction kernels (sim.compiled.EVICTION maps classes to these).
EV_LRU, EV_FIFO, EV_STATIC, EV_STALE, EV_LFU, EV_BELADY = 0, 1, 2, 3, 4, 5
# Prefetch kernels.
PF_NONE, PF_ORACLE, PF_NEXT_ALL, PF_PRED, PF_BEYOND = 0, 1, 2, 3, 4
PT_PRE, PT_ROUTED, PT_ISSUED = 0, 1, 2
ABSENT, LOADING, RESIDENT = 0, 1, 2
COUNTED, WARMUP = 1, 2
HIT, LATE, PROMOTED, MISS = 0, 1, 2, 3
NO_USE = 1 << 62
INF = np.inf

# Slots of the int64 scalar array ``iv``.
I_PSTAMP, I_SMARK, I_SEQ, I_LSEQ, I_NQ, I_QHEAD, I_QTAIL, I_RSIZE, I_COUNTING = range(9)
I_DEMAND, I_ISSUED, I_PF_STARTED, I_PF_DROPPED, I_SERVED, I_USEFUL = range(9, 15)
I_WASTED, I_EVICTIONS, I_L_DEMAND, I_L_PREFETCH, I_L_DROPPED, I_ERROR, I_UNUSED = range(15, 22)
NUM_IV = 22
# Slots of the float64 scalar array ``fv``.
F_LT, F_BUSY, F_STALL_MISS, F_STALL_LATE, F_TIME, F_NOW, F_CLIP = range(7)
NUM_FV = 7

_jit = numba.njit(cache=True, nogil=True)


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


@_jit
def _next_use(k, p, incl, nocc, cursor):
    """``WorkloadFuture.next_use``: first position > p (>= p if incl) of key k."""
    i = cursor[k]
    while i < p:
        i = nocc[i]
    cursor[k] = i
    if not incl and i == p:
        i = nocc[i]
    return i


# -- indexed heap (LFU, Belady): min of (s1, s2) per partition ------------------------------
@_jit
def _less(a, b, s1, s2):
    return s1[a] < s1[b] or (s1[a] == s1[b] and s2[a] < s2[b])


@_jit
def _sift_up(off, i, hkey, hpos, s1, s2):
    k = hkey[off + i]
    while i > 0:
        parent = (i - 1) >> 1
        q = hkey[off + parent]
        if _less(k, q, s1, s2):
            hkey[off + i] = q
            hpos[q] = i
            i = parent
        else:
            break
    hkey[off + i] = k
    hpos[k] = i


@_jit
def _sift_down(off, i, size, hkey, hpos, s1, s2):
    k = hkey[off + i]
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and _less(hkey[off + c + 1], hkey[off + c], s1, s2):
            c += 1
        q = hkey[off + c]
        if _less(q, k, s1, s2):
            hkey[off + i] = q
            hpos[q] = i
            i = c
        else:
            break
    hkey[off + i] = k
    hpos[k] = i


@_jit
def _hpush(p, k, hkey, hoff, hsize, hpos, s1, s2):
    i = hsize[p]
    hsize[p] = i + 1
    hkey[hoff[p] + i] = k
    hpos[k] = i
    _sift_up(hoff[p], i, hkey, hpos, s1, s2)


@_jit
def _hremove(p, k, hkey, hoff, hsize, hpos, s1, s2):
    off = hoff[p]
    i = hpos[k]
    last = hsize[p] - 1
    hsize[p] = last
    hpos[k] = -1
    if i != last:
        q = hkey[off + last]
        hkey[off + i] = q
        hpos[q] = i
        _sift_up(off, i, hkey, hpos, s1, s2)
        _sift_down(off, hpos[q], last, hkey, hpos, s1, s2)


@_jit
def _hupdate(p, k, hkey, hoff, hsize, hpos, s1, s2):
    _sift_up(hoff[p], hpos[k], hkey, hpos, s1, s2)
    _sift_down(hoff[p], hpos[k], hsize[p], hkey, hpos, s1, s2)


# -- eviction policies ----------------------------------------------------------------------
@_jit
def _unlink(p, k, prv, nxt, head, tail):
    a, b = prv[k], nxt[k]
    if a >= 0:
        nxt[a] = b
    else:
        head[p] = b
    if b >= 0:
        prv[b] = a
    else:
        tail[p] = a


@_jit
def _append(p, k, prv, nxt, head, tail):
    t = tail[p]
    prv[k] = t
    nxt[k] = -1
    if t >= 0:
        nxt[t] = k
    else:
        head[p] = k
    tail[p] = k


@_jit
def _on_insert(ev, p, k, prefetch, position, pol, iv, nocc, cursor):
    prv, nxt, head, tail, _hot, cur, hkey, hoff, hsize, hpos, s1, s2 = pol
    if ev <= EV_STALE:
        _append(p, k, prv, nxt, head, tail)
        if ev == EV_STALE:
            cur[k] = iv[I_SMARK]
    elif ev == EV_LFU:
        iv[I_SEQ] += 1
        s1[k] = 1
        s2[k] = iv[I_SEQ]
        _hpush(p, k, hkey, hoff, hsize, hpos, s1, s2)
    else:  # Belady: a prefetched expert's use may be in the current layer-step itself
        s1[k] = -_next_use(k, position, prefetch, nocc, cursor)
        s2[k] = k
        _hpush(p, k, hkey, hoff, hsize, hpos, s1, s2)


@_jit
def _on_access(ev, p, k, position, pol, iv, nocc, cursor):
    prv, nxt, head, tail, _hot, cur, hkey, hoff, hsize, hpos, s1, s2 = pol
    if ev in (EV_LRU, EV_STATIC):
        if tail[p] != k:
            _unlink(p, k, prv, nxt, head, tail)
            _append(p, k, prv, nxt, head, tail)
    elif ev == EV_STALE:
        cur[k] = iv[I_SMARK]
    elif ev == EV_LFU:
        iv[I_SEQ] += 1
        s1[k] += 1
        s2[k] = iv[I_SEQ]
        _hupdate(p, k, hkey, hoff, hsize, hpos, s1, s2)
    elif ev == EV_BELADY:
        s1[k] = -_next_use(k, position, False, nocc, cursor)
        _hupdate(p, k, hkey, hoff, hsize, hpos, s1, s2)


@_jit
def _on_evict(ev, p, k, pol):
    prv, nxt, head, tail, _hot, cur, hkey, hoff, hsize, hpos, s1, s2 = pol
    if ev <= EV_STALE:
        _unlink(p, k, prv, nxt, head, tail)
        cur[k] = -1
    else:
        _hremove(p, k, hkey, hoff, hsize, hpos, s1, s2)


@_jit
def _victim(ev, p, state, pin, pol, iv, skipped):
    """The policy's victim among keys that may be evicted (resident and not pinned), or -1."""
    _prv, nxt, head, _tail, hot, cur, hkey, hoff, hsize, hpos, s1, s2 = pol
    pstamp = iv[I_PSTAMP]
    if ev <= EV_STALE:
        fallback = -1
        v = head[p]
        while v >= 0:
            if state[v] == RESIDENT and pin[v] != pstamp and not (ev == EV_STATIC and hot[v]):
                if ev != EV_STALE or cur[v] != iv[I_SMARK]:
                    return v
                if fallback < 0:
                    fallback = v
            v = nxt[v]
        return fallback
    # heap: set aside the smallest entries that may not be evicted now, as policies/_heap.py
    n = 0
    found = -1
    while hsize[p] > 0:
        k = hkey[hoff[p]]
        if state[k] == RESIDENT and pin[k] != pstamp:
            found = k
            break
        _hremove(p, k, hkey, hoff, hsize, hpos, s1, s2)
        skipped[n] = k
        n += 1
    for i in range(n):
        _hpush(p, skipped[i], hkey, hoff, hsize, hpos, s1, s2)
    return found


# -- the cache (sim/cache.py) ---------------------------------------------------------------
@_jit
def _evict(ev, p, k, state, mark, used, pol, iv):
    state[k] = ABSENT
    used[p] -= 1
    iv[I_EVICTIONS] += 1
    if mark[k]:
        if mark[k] == COUNTED:
            iv[I_WASTED] += 1
        mark[k] = 0
    _on_evict(ev, p, k, pol)


@_jit
def _reserve(ev, k, prefetch, position, num_e, part, caps, used, state, mark, pin, pol, iv,
             nocc, cursor, skipped):
    p = part[k // num_e]
    if used[p] >= caps[p]:
        v = _victim(ev, p, state, pin, pol, iv, skipped)
        if v < 0:
            return False
        _evict(ev, p, v, state, mark, used, pol, iv)
    used[p] += 1
    state[k] = LOADING
    if prefetch:
        mark[k] = COUNTED if iv[I_COUNTING] else WARMUP
    else:
        mark[k] = 0
    _on_insert(ev, p, k, prefetch, position, pol, iv, nocc, cursor)
    return True


@_jit
def _install(ev, k, position, num_e, part, caps, used, state, pol, iv, nocc, cursor):
    p = part[k // num_e]
    if state[k] != ABSENT:
        return
    if used[p] >= caps[p]:
        return
    used[p] += 1
    state[k] = RESIDENT
    _on_insert(ev, p, k, False, position, pol, iv, nocc, cursor)


# -- the host link (sim/link.py) ------------------------------------------------------------
@_jit
def _rless(a, b, rfin, rseq):
    return rfin[a] < rfin[b] or (rfin[a] == rfin[b] and rseq[a] < rseq[b])


@_jit
def _rpush(fin, seq, key, kind, start, run, iv):
    rfin, rseq, rkey, rkind, rstart = run
    i = iv[I_RSIZE]
    iv[I_RSIZE] = i + 1
    rfin[i], rseq[i], rkey[i], rkind[i], rstart[i] = fin, seq, key, kind, start
    while i > 0:
        parent = (i - 1) >> 1
        if _rless(i, parent, rfin, rseq):
            rfin[i], rfin[parent] = rfin[parent], rfin[i]
            rseq[i], rseq[parent] = rseq[parent], rseq[i]
            rkey[i], rkey[parent] = rkey[parent], rkey[i]
            rkind[i], rkind[parent] = rkind[parent], rkind[i]
            rstart[i], rstart[parent] = rstart[parent], rstart[i]
            i = parent
        else:
            break


@_jit
def _rpop(run, iv):
    rfin, rseq, rkey, rkind, rstart = run
    key = rkey[0]
    last = iv[I_RSIZE] - 1
    iv[I_RSIZE] = last
    rfin[0], rseq[0], rkey[0], rkind[0], rstart[0] = (rfin[last], rseq[last], rkey[last],
                                                      rkind[last], rstart[last])
    i = 0
    while True:
        c = 2 * i + 1
        if c >= last:
            break
        if c + 1 < last and _rless(c + 1, c, rfin, rseq):
            c += 1
        if _rless(c, i, rfin, rseq):
            rfin[i], rfin[c] = rfin[c], rfin[i]
            rseq[i], rseq[c] = rseq[c], rseq[i]
            rkey[i], rkey[c] = rkey[c], rkey[i]
            rkind[i], rkind[c] = rkind[c], rkind[i]
            rstart[i], rstart[c] = rstart[c], rstart[i]
            i = c
        else:
            break
    return key


@_jit
def _argmin(free):
    e = 0
    for i in range(1, free.shape[0]):
        if free[i] < free[e]:
            e = i
    return e


@_jit
def _submit_demand(k, duration, free, fin, infl, run, iv, fv):
    e = _argmin(free)
    start = free[e] if free[e] > fv[F_LT] else fv[F_LT]
    finish = start + duration
    free[e] = finish
    iv[I_LSEQ] += 1
    _rpush(finish, iv[I_LSEQ], k, 0, start, run, iv)
    fin[k] = finish
    infl[k] = True
    fv[F_BUSY] += duration
    if iv[I_COUNTING]:
        iv[I_L_DEMAND] += 1


@_jit
def _queue_push(k, queue, qseq, iv):
    qkeys, qseqs = queue
    if iv[I_QTAIL] == qkeys.shape[0]:  # compact: drop withdrawn entries, keep the order
        n = 0
        for i in range(iv[I_QHEAD], iv[I_QTAIL]):
            if qseq[qkeys[i]] == qseqs[i]:
                qkeys[n] = qkeys[i]
                qseqs[n] = qseqs[i]
                n += 1
        iv[I_QHEAD] = 0
        iv[I_QTAIL] = n
    iv[I_LSEQ] += 1
    qseq[k] = iv[I_LSEQ]
    qkeys[iv[I_QTAIL]] = k
    qseqs[iv[I_QTAIL]] = iv[I_LSEQ]
    iv[I_QTAIL] += 1
    iv[I_NQ] += 1


@_jit
def _advance(until, duration, ev, position, num_e, part, caps, used, state, mark, pin, pol, iv,
             fv, nocc, cursor, skipped, free, fin, infl, run, queue, qseq):
    """``HostLink.advance``: completions and prefetch starts up to ``until``, in time order."""
    rfin = run[0]
    qkeys, qseqs = queue
    while True:
        done = rfin[0] if iv[I_RSIZE] > 0 else INF
        start = INF
        if iv[I_NQ] > 0:
            start = free[_argmin(free)]
            if start < fv[F_LT]:
                start = fv[F_LT]
        if done <= start:  # a completion frees its engine before a start can use it
            if done > until:
                break
            key = _rpop(run, iv)
            fv[F_LT] = done
            infl[key] = False
            state[key] = RESIDENT
        else:
            if start > until:
                break
            fv[F_LT] = start
            while True:  # the oldest live queued prefetch
                key = qkeys[iv[I_QHEAD]]
                sq = qseqs[iv[I_QHEAD]]
                iv[I_QHEAD] += 1
                if qseq[key] == sq:
                    qseq[key] = 0
                    iv[I_NQ] -= 1
                    break
            if not _reserve(ev, key, True, position, num_e, part, caps, used, state, mark, pin,
                            pol, iv, nocc, cursor, skipped):
                iv[I_L_DROPPED] += 1
                continue
            e = _argmin(free)
            finish = fv[F_LT] + duration
            free[e] = finish
            iv[I_LSEQ] += 1
            _rpush(finish, iv[I_LSEQ], key, 1, fv[F_LT], run, iv)
            fin[key] = finish
            infl[key] = True
            fv[F_BUSY] += duration
            if iv[I_COUNTING]:
                iv[I_L_PREFETCH] += 1
    if until > fv[F_LT]:
        fv[F_LT] = until


# -- prefetch issue (Simulation.prefetch) ---------------------------------------------------
@_jit
def _prefetch(keys, n, timed, touch, ev, position, num_e, part, caps, used, state, mark, pin,
              pol, iv, nocc, cursor, skipped, qseq, infl, queue, todo):
    prv, nxt, head, tail = pol[0], pol[1], pol[2], pol[3]
    m = 0
    for i in range(n):
        k = keys[i]
        if state[k] != ABSENT:
            if touch and ev in (EV_LRU, EV_STATIC):  # on_prefetch_resident
                p = part[k // num_e]
                if tail[p] != k:
                    _unlink(p, k, prv, nxt, head, tail)
                    _append(p, k, prv, nxt, head, tail)
        elif timed:
            if qseq[k] == 0 and not infl[k]:
                _queue_push(k, queue, qseq, iv)
                m += 1
        else:
            dup = False
            for q in range(m):
                if todo[q] == k:
                    dup = True
                    break
            if not dup:
                todo[m] = k
                m += 1
    if timed:
        if iv[I_COUNTING]:
            iv[I_ISSUED] += m
        return
    done = 0
    for q in range(m):
        k = todo[q]
        if _reserve(ev, k, True, position, num_e, part, caps, used, state, mark, pin, pol, iv,
                    nocc, cursor, skipped):
            state[k] = RESIDENT
            done += 1
            if iv[I_COUNTING]:
                iv[I_PF_STARTED] += 1
        elif iv[I_COUNTING]:
            iv[I_PF_DROPPED] += 1
    if iv[I_COUNTING]:
        iv[I_ISSUED] += done


@_jit
def _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm, counting, table, out):
    """The keys the prefetcher asks for at its point of layer j (in ``out``), and how many."""
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
                out[n] = k
                n += 1
    elif pf == PF_NEXT_ALL:
        t2 = j + 1
        if t2 >= num_l:
            if not wrap:
                return 0
            t2 = 0
        for e in range(num_e):
            out[e] = t2 * num_e + e
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
                out[n] = k
                n += 1
                if top > 0 and n == top:
                    break
    return n


# -- the run --------------------------------------------------------------------------------
@_jit
def replay(keys, counts, use_counts, counted, attn, shared, dense_step, dense_n, part, caps,
           num_e, timed, pin_layer, engines, duration, cost, ev, hot, touch, pf, point,
           hooks, ahead, top, wrap, warm, table, resets, inst_off, inst_keys, nocc, cursor):
    """One run; returns (int scalars, float scalars, layer counts [4, L], layer stall [L])."""
    num_s, num_l, width = keys.shape
    num_k = num_l * num_e
    num_p = caps.shape[0]
    iv = np.zeros(NUM_IV, np.int64)
    fv = np.zeros(NUM_FV)
    layer_counts = np.zeros((4, num_l), np.int64)
    layer_stall = np.zeros(num_l)
    state = np.zeros(num_k, np.uint8)
    mark = np.zeros(num_k, np.uint8)
    pin = np.full(num_k, -1, np.int64)
    used = np.zeros(num_p, np.int64)
    prv = np.full(num_k, -1, np.int64)
    nxt = np.full(num_k, -1, np.int64)
    head = np.full(num_p, -1, np.int64)
    tail = np.full(num_p, -1, np.int64)
    cur = np.full(num_k, -1, np.int64)
    hoff = np.zeros(num_p, np.int64)
    for p in range(1, num_p):
        hoff[p] = hoff[p - 1] + caps[p - 1]
    hkey = np.zeros(max(caps.sum(), 1), np.int64)
    hsize = np.zeros(num_p, np.int64)
    hpos = np.full(num_k, -1, np.int64)
    s1 = np.zeros(num_k, np.int64)
    s2 = np.zeros(num_k, np.int64)
    pol = (prv, nxt, head, tail, hot, cur, hkey, hoff, hsize, hpos, s1, s2)
    skipped = np.zeros(num_k, np.int64)
    free = np.zeros(engines)
    fin = np.zeros(num_k)
    infl = np.zeros(num_k, np.bool_)
    run = (np.zeros(num_k + 1), np.zeros(num_k + 1, np.int64), np.zeros(num_k + 1, np.int64),
           np.zeros(num_k + 1, np.int8), np.zeros(num_k + 1))
    qcap = 4 * num_k + 16
    queue = (np.zeros(qcap, np.int64), np.zeros(qcap, np.int64))
    qseq = np.zeros(num_k, np.int64)
    todo = np.zeros(num_k, np.int64)
    pkeys = np.zeros(max(num_k, table.shape[2]), np.int64)
    kinds = np.zeros(width, np.int64)
    lkeys = np.zeros(width, np.int64)
    wait_r = np.zeros(width)
    wait_i = np.zeros(width, np.int64)
    hook_pre, hook_routed, hook_issued = hooks[0], hooks[1], hooks[2]
    position = 0
    for i in range(inst_off[0], inst_off[1]):  # the cache the engine built before the run
        _install(ev, inst_keys[i], position, num_e, part, caps, used, state, pol, iv, nocc,
                 cursor)
    n_reset = 0
    now = 0.0
    for s in range(num_s):
        if resets[s]:  # cache.reset_per_request: a fresh cache for the joining request
            if timed:
                _advance(now, duration, ev, position, num_e, part, caps, used, state, mark, pin,
                         pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run, queue, qseq)
            for k in range(num_k):  # Simulation._discard
                if mark[k] == COUNTED:
                    iv[I_WASTED] += 1
                state[k] = ABSENT
                mark[k] = 0
                cur[k] = -1
                hpos[k] = -1
                qseq[k] = 0
                infl[k] = False
            used[:] = 0
            head[:] = -1
            tail[:] = -1
            hsize[:] = 0
            iv[I_NQ] = 0
            iv[I_QHEAD] = 0
            iv[I_QTAIL] = 0
            iv[I_RSIZE] = 0
            n_reset += 1
            for i in range(inst_off[n_reset], inst_off[n_reset + 1]):
                _install(ev, inst_keys[i], position, num_e, part, caps, used, state, pol, iv,
                         nocc, cursor)
        counting = counted[s]
        iv[I_COUNTING] = 1 if counting else 0
        step_start = now
        for j in range(num_l):
            base = (s * num_l + j) * width
            position = base
            if hook_pre:
                if timed:
                    _advance(now, duration, ev, position, num_e, part, caps, used, state, mark,
                             pin, pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run,
                             queue, qseq)
                if point == PT_PRE:
                    n = _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, pkeys)
                    if n:
                        _prefetch(pkeys, n, timed, touch, ev, position, num_e, part, caps, used,
                                  state, mark, pin, pol, iv, nocc, cursor, skipped, qseq, infl,
                                  queue, todo)
                if timed:
                    _advance(now, duration, ev, position, num_e, part, caps, used, state, mark,
                             pin, pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run,
                             queue, qseq)
            if timed:
                d = attn[s]
                if dense_n[j]:
                    d += dense_n[j] * dense_step[s]
                if d > 0:
                    now = now + d
                _advance(now, duration, ev, position, num_e, part, caps, used, state, mark, pin,
                         pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run, queue, qseq)
            n_keys = 0
            for r in range(width):
                k = keys[s, j, r]
                if k >= 0:
                    lkeys[n_keys] = k
                    n_keys += 1
                    if pin_layer:
                        pin[k] = iv[I_PSTAMP]
            if hook_routed:
                if point == PT_ROUTED:
                    n = _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm,
                                    counting, table, pkeys)
                    if n:
                        _prefetch(pkeys, n, timed, touch, ev, position, num_e, part, caps, used,
                                  state, mark, pin, pol, iv, nocc, cursor, skipped, qseq, infl,
                                  queue, todo)
                if timed:
                    _advance(now, duration, ev, position, num_e, part, caps, used, state, mark,
                             pin, pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run,
                             queue, qseq)
            any_wait = False
            for r in range(n_keys):  # Simulation._access
                k = lkeys[r]
                position = base + r
                st = state[k]
                if st != ABSENT:
                    kind = HIT if st == RESIDENT else LATE
                    _on_access(ev, part[k // num_e], k, position, pol, iv, nocc, cursor)
                    came = mark[k]
                    if came:
                        mark[k] = 0
                        if came == COUNTED:
                            iv[I_USEFUL] += 1
                        if counting:
                            iv[I_SERVED] += 1
                else:
                    kind = MISS
                    if qseq[k] != 0:  # a queued prefetch, withdrawn and promoted to demand
                        qseq[k] = 0
                        iv[I_NQ] -= 1
                        kind = PROMOTED
                    if not _reserve(ev, k, False, position, num_e, part, caps, used, state,
                                    mark, pin, pol, iv, nocc, cursor, skipped):
                        iv[I_ERROR] = j + 1
                        return iv, fv, layer_counts, layer_stall
                    if timed:
                        _submit_demand(k, duration, free, fin, infl, run, iv, fv)
                    else:
                        state[k] = RESIDENT
                    if counting:
                        iv[I_DEMAND] += 1
                if counting:
                    layer_counts[kind, j] += 1
                kinds[r] = kind
                if kind != HIT:
                    any_wait = True
            position = base + width - 1
            if hook_issued and point == PT_ISSUED:
                n = _issue_keys(pf, s, j, num_s, num_l, num_e, ahead, top, wrap, warm, counting,
                                table, pkeys)
                if n:
                    _prefetch(pkeys, n, timed, touch, ev, position, num_e, part, caps, used,
                              state, mark, pin, pol, iv, nocc, cursor, skipped, qseq, infl,
                              queue, todo)
            if timed:
                if iv[I_NQ] > 0:
                    _advance(now, duration, ev, position, num_e, part, caps, used, state, mark,
                             pin, pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run,
                             queue, qseq)
                t = now
                if not use_counts and not any_wait:
                    end = t + shared[s] + n_keys * cost[1]
                else:  # engine._schedule
                    nw = 0
                    cur_t = t + shared[s]
                    for r in range(n_keys):
                        dr = cost[counts[s, j, r]] if use_counts else cost[1]
                        if kinds[r] == HIT:
                            cur_t += dr
                        else:
                            k = lkeys[r]
                            if infl[k]:
                                ready = fin[k]
                            elif state[k] == RESIDENT:
                                ready = fv[F_LT]
                            else:
                                iv[I_ERROR] = -(j + 1)
                                return iv, fv, layer_counts, layer_stall
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
                        fv[F_STALL_MISS] += st_miss
                        fv[F_STALL_LATE] += st_late
                        layer_stall[j] += st_miss + st_late
                if end > t:
                    now = now + (end - t)
                if iv[I_NQ] > 0:
                    _advance(now, duration, ev, position, num_e, part, caps, used, state, mark,
                             pin, pol, iv, fv, nocc, cursor, skipped, free, fin, infl, run,
                             queue, qseq)
            if pin_layer:
                iv[I_PSTAMP] += 1
        iv[I_SMARK] += 1  # least-stale: a new forward pass
        if counting:
            fv[F_TIME] += now - step_start
    unused = 0
    for k in range(num_k):
        if mark[k] == COUNTED:
            unused += 1
    iv[I_UNUSED] = unused
    fv[F_NOW] = now
    clip = 0.0
    rfin, rstart = run[0], run[4]
    for i in range(iv[I_RSIZE]):
        f = rfin[i]
        s0 = rstart[i] if rstart[i] > now else now
        if f - s0 > 0:
            clip += f - s0
    fv[F_CLIP] = clip
    return iv, fv, layer_counts, layer_stall
