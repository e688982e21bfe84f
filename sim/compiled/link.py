"""The compiled host link (``sim/link.py``): engine free times, a heap of running copies
and a FIFO ring of queued prefetches (every shipped prefetcher queues at the default
priority, which is submission order), advanced in time order like ``HostLink.advance``.
The copy rules of a runtime (``sim.link.CopyRules``) are mirrored by :func:`_swap`; on the
compute stream the kernel advances the link on link time (``V_TAU``), as the engine does."""

from __future__ import annotations

from moesim.sim.compiled.cache import _reserve
from moesim.sim.compiled.layout import (
    B_PKEYS,
    B_QKEY,
    B_QSEQ,
    B_RKEY,
    B_RKIND,
    B_RSEQ,
    EV_MI_MIN,
    F_FIN,
    F_FREE,
    F_RFIN,
    F_RSTART,
    FV,
    I_CANCELLED,
    I_COUNTING,
    I_ENGINES,
    I_EVICTIONS,
    I_ISSUED,
    I_L_DEMAND,
    I_L_DROPPED,
    I_L_PREFETCH,
    I_LSEQ,
    I_NQ,
    I_NUMP,
    I_PF_HOST,
    I_QBASE,
    I_QHEAD,
    I_QTAIL,
    I_RSIZE,
    I_SWAPMODE,
    I_SWAPS,
    I_TSTAMP,
    INF,
    IV,
    K_INFL,
    K_QSEQ,
    K_STATE,
    RESIDENT,
    SFN,
    V_BUSY,
    V_LT,
    V_SWAP_D,
    V_SWAP_T,
    fn,
    typed,
)


# -- the host link (sim/link.py) ------------------------------------------------------------
@fn
def _rless(a, b, S, F):
    return F[F_RFIN, a] < F[F_RFIN, b] or (F[F_RFIN, a] == F[F_RFIN, b]
                                             and S[B_RSEQ, a] < S[B_RSEQ, b])


@fn
def _rswap(a, b, S, F):
    F[F_RFIN, a], F[F_RFIN, b] = F[F_RFIN, b], F[F_RFIN, a]
    F[F_RSTART, a], F[F_RSTART, b] = F[F_RSTART, b], F[F_RSTART, a]
    S[B_RSEQ, a], S[B_RSEQ, b] = S[B_RSEQ, b], S[B_RSEQ, a]
    S[B_RKEY, a], S[B_RKEY, b] = S[B_RKEY, b], S[B_RKEY, a]
    S[B_RKIND, a], S[B_RKIND, b] = S[B_RKIND, b], S[B_RKIND, a]


@fn
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


@fn
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


@fn
def _argmin_free(S, F):
    e = 0
    for i in range(1, S[IV, I_ENGINES]):
        if F[F_FREE, i] < F[F_FREE, e]:
            e = i
    return e


@fn
def _swap(duration, S, F):
    """``HostLink._swap``: the copy back of an evicted expert is counted, and on the compute
    stream the load waits behind it (``CopyRules.load_time``)."""
    if S[IV, I_COUNTING]:
        S[IV, I_SWAPS] += 1
        F[FV, V_SWAP_T] += F[FV, V_SWAP_D]
    return duration + F[FV, V_SWAP_D] if S[IV, I_SWAPMODE] % 2 == 0 else duration


@fn
def _submit_demand(k, duration, evicted, direct, S, F):
    """``HostLink.submit_demand``. ``direct``: a run without prefetches, where nothing can
    observe a copy in flight (the GPU waits for every copy of a layer before the next one,
    whose pinned keys are the only ones it touches), so the copy lands at once and only its
    arrival time is kept for the layer's schedule."""
    e = _argmin_free(S, F)
    free = F[F_FREE, e]
    start = free if free > F[FV, V_LT] else F[FV, V_LT]
    if S[IV, I_SWAPMODE] and (evicted or S[IV, I_SWAPMODE] >= 3):
        duration = _swap(duration, S, F)
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


@fn
def _queue_compact(S):
    """Drop the ring's withdrawn entries, keep the live ones' order, from position 0."""
    n = 0
    for i in range(S[IV, I_QHEAD], S[IV, I_QTAIL]):
        if S[K_QSEQ, S[B_QKEY, i]] == S[B_QSEQ, i]:
            S[B_QKEY, n] = S[B_QKEY, i]
            S[B_QSEQ, n] = S[B_QSEQ, i]
            n += 1
    S[IV, I_QHEAD] = 0
    S[IV, I_QTAIL] = n


@fn
def _enqueue(k, tail, seq, S):
    """Key ``k`` queued at ring slot ``tail`` with sequence number ``seq`` (its entry is live
    while the key's ``K_QSEQ`` matches; the callers keep ``tail`` and ``seq`` in locals and
    publish them with :func:`_queue_commit`)."""
    S[K_QSEQ, k] = seq
    S[B_QKEY, tail] = k
    S[B_QSEQ, tail] = seq


@fn
def _queue_commit(tail, seq, m, S):
    """The ring's tail and last sequence number after ``m`` keys were queued
    (:func:`_enqueue`), and the queued and (while counting) issued totals."""
    S[IV, I_QTAIL] = tail
    S[IV, I_LSEQ] = seq
    S[IV, I_NQ] += m
    if S[IV, I_COUNTING]:
        S[IV, I_ISSUED] += m


@fn
def _queue_listed(n, S):
    """``Simulation.prefetch`` of the ``n`` keys in ``S[B_PKEYS]`` right after the queue was
    emptied (``_cancel_all``), for a list of distinct absent keys (MoE-Infinity's walk): each
    is queued unless in flight, as ``prefetch._prefetch`` queues it, without its checks that
    cannot fail here (held, already queued) or the ring's compaction (the ring starts at 0 and
    holds ``4 L E`` entries)."""
    if n == 0:
        return
    S[IV, I_TSTAMP] += 1
    tail = S[IV, I_QTAIL]
    seq = S[IV, I_LSEQ]
    for i in range(n):
        k = S[B_PKEYS, i]
        if not S[K_INFL, k]:
            seq += 1
            _enqueue(k, tail, seq, S)
            tail += 1
    _queue_commit(tail, seq, tail - S[IV, I_QTAIL], S)


@fn
def _drop_queued(S):
    """Every live queued prefetch dropped at once, as ``_advance`` drops them one by one
    after a first drop with MoE-Infinity's evictors and one cache partition: the next starts
    are at the same time (a drop takes no engine and no completion comes first: the next one
    was already later), a failed reservation changes nothing, and whether it fails depends on
    the partition only (``_mi_victim``), which is the same for every key."""
    S[IV, I_L_DROPPED] += _clear_queue(S)


@fn
def _clear_queue(S):
    """Empty the queue of prefetches; returns how many live ones it held. Without visiting
    them: ``I_NQ`` counts the live entries (a key's entry is live while its sequence number
    matches, and a key has at most one), and raising ``I_QBASE`` to the last sequence number
    issued makes every key's number stale at once (a key is queued while its ``K_QSEQ`` is
    above the base; numbers only grow)."""
    n = S[IV, I_NQ]
    S[IV, I_QBASE] = S[IV, I_LSEQ]
    S[IV, I_NQ] = 0
    S[IV, I_QHEAD] = 0
    S[IV, I_QTAIL] = 0
    return n


@typed(f"void(f8, f8, i8, i8, {SFN})")
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
            evictions = S[IV, I_EVICTIONS]
            if not _reserve(ev, key, True, position, S, F, nocc):
                S[IV, I_L_DROPPED] += 1
                if ev >= EV_MI_MIN and S[IV, I_NUMP] == 1:
                    _drop_queued(S)
                continue
            d = duration
            if S[IV, I_SWAPMODE] and (S[IV, I_SWAPMODE] >= 3
                                      or S[IV, I_EVICTIONS] != evictions):
                d = _swap(d, S, F)
            e = _argmin_free(S, F)
            finish = F[FV, V_LT] + d
            F[F_FREE, e] = finish
            _rpush(finish, key, 1, F[FV, V_LT], S, F)
            F[F_FIN, key] = finish
            S[K_INFL, key] = 1
            F[FV, V_BUSY] += d
            S[IV, I_PF_HOST] += 1
            if S[IV, I_COUNTING]:
                S[IV, I_L_PREFETCH] += 1
    if until > F[FV, V_LT]:
        F[FV, V_LT] = until



@fn
def _cancel_all(S):
    """``HostLink.cancel()``: every queued prefetch is dropped (counted whether or not the step
    counts, as the link does)."""
    S[IV, I_CANCELLED] += _clear_queue(S)
