"""Indexed binary heaps (LFU, Belady, MoE-Infinity's visit counts) and the doubly linked
eviction orders (LRU, FIFO, static), on the rows of ``S`` (``sim.compiled.layout``)."""

from __future__ import annotations

import numpy as np

from moesim.sim.compiled.layout import (
    B_HKEY,
    K_CURSOR,
    K_HPOS,
    K_NXT,
    K_PRV,
    K_S1,
    K_S2,
    NO_USE,
    P_HEAD,
    P_HOFF,
    P_HSIZE,
    P_TAIL,
    fn,
    jit,
    typed,
)


# -- next use (Belady) ----------------------------------------------------------------------
@jit
def next_occurrences(flat: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position of ``flat`` (the workload's keys, raveled: a position is the flat
    index), the next position of the same key, and each key's first position (NO_USE if none).
    One backward pass, no temporaries beyond the result."""
    return next_occurrences_after(flat, np.full(num_keys, NO_USE, np.int64))


@jit
def next_occurrences_after(flat: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`next_occurrences` seeded with ``after``, each key's next position beyond
    ``flat`` (a streamed run's later chunks, relative to this one; NO_USE if none)."""
    nxt = np.empty(flat.shape[0], np.int64)
    last = after.copy()
    for pos in range(flat.shape[0] - 1, -1, -1):
        k = flat[pos]
        if k >= 0:
            nxt[pos] = last[k]
            last[k] = pos
        else:
            nxt[pos] = NO_USE
    return nxt, last


@typed("i8(i8, i8, b1, i8[::1], i8[:, ::1])")
def _next_use(k, p, incl, nocc, S):
    """``WorkloadFuture.next_use``: first position > p (>= p if incl) of key k."""
    i = S[K_CURSOR, k]
    while i < p:
        i = nocc[i]
    S[K_CURSOR, k] = i
    if not incl and i == p:
        i = nocc[i]
    return i


# -- indexed heap: min of (s1, s2) per heap (a partition, or a layer) -----------------------
@fn
def _less(a, b, S):
    return S[K_S1, a] < S[K_S1, b] or (S[K_S1, a] == S[K_S1, b] and S[K_S2, a] < S[K_S2, b])


@fn
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


@fn
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


@typed("void(i8, i8, i8[:, ::1])")
def _hpush(p, k, S):
    i = S[P_HSIZE, p]
    S[P_HSIZE, p] = i + 1
    S[B_HKEY, S[P_HOFF, p] + i] = k
    S[K_HPOS, k] = i
    _sift_up(S[P_HOFF, p], i, S)


@typed("void(i8, i8, i8[:, ::1])")
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


@fn
def _hupdate(p, k, S):
    _sift_up(S[P_HOFF, p], S[K_HPOS, k], S)
    _sift_down(S[P_HOFF, p], S[K_HPOS, k], S[P_HSIZE, p], S)


# -- linked eviction orders per partition ---------------------------------------------------
@fn
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


@fn
def _append(p, k, S):
    t = S[P_TAIL, p]
    S[K_PRV, k] = t
    S[K_NXT, k] = -1
    if t >= 0:
        S[K_NXT, t] = k
    else:
        S[P_HEAD, p] = k
    S[P_TAIL, p] = k


@fn
def _to_tail(p, k, S):
    if S[P_TAIL, p] != k:
        _unlink(p, k, S)
        _append(p, k, S)

