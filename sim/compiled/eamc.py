"""MoE-Infinity's prefetcher (``policies/moe_infinity.py``: ``MoEInfinity`` and ``EAMC``) on
the compiled engine.

The EAMC, each running request's EAM and its dot products with the stored unit rows are plain
arrays that ``sim.compiled.mi_arrays`` builds from the run's prefetcher (a warm EAMC included);
unit rows are transposed (``[L E, slots]``) and dot products kept as ``[request, L, slots]``,
so the per-layer updates and the match run along contiguous slots. Every float is computed
with the operations and summation order of the policy's numpy code (``sim.compiled.sums``),
so matches, priorities and the queued lists are the same.
The list itself is never sorted whole: per stored EAM each layer's experts are kept sorted by
count once (when the slot is written), and a prediction merges the layers' heads by score,
stopping once every partition's room (``prefetch_room() + E`` absent keys) is used up; held
keys in the list are no-ops for these evictors, so only absent keys are queued, and each
layer's head skips the held ones (the order of the absent keys is the whole list's).
Where the time goes (whole DeepSeek-V2-Lite training trace, batch 1, ``perf``): the merge and
the queue it feeds, the per-layer update of every stored slot's dot product (memory-bound:
the layer's experts' unit rows are read three per pass over the slots) and the match; the
priority evictor's D is recomputed only when its request's EAM changed (at routing).
"""

from __future__ import annotations

import math

from moesim.sim.compiled.layout import (
    ABSENT,
    B_PKEYS,
    B_SKIP,
    F_DN,
    I_CHI,
    I_CLO,
    I_CSTAMP,
    I_CWIDTH,
    I_DEMPH,
    I_DSRC,
    I_EAMCAP,
    I_ERROR,
    I_FILLED,
    I_HASCAND,
    I_NUME,
    I_NUML,
    I_NUMP,
    I_PERSIST,
    INF,
    IV,
    K_CAND,
    K_PART,
    K_STATE,
    L_HELD,
    P_CAP,
    P_NC,
    P_USED,
    fn,
)
from moesim.sim.compiled.link import _cancel_all
from moesim.sim.compiled.sums import pairwise


@fn
def _sort_layers(eams, ordr, c, num_l, num_e):
    """Per layer of slot ``c``: experts by count descending, lower expert first on ties (the
    order of a stable sort of the layer's scores, which grow with the count)."""
    for i in range(num_l):
        b = i * num_e
        for e in range(num_e):
            v = eams[c, b + e]
            q = e
            while q > 0 and eams[c, b + ordr[c, b + q - 1]] < v:
                ordr[c, b + q] = ordr[c, b + q - 1]
                q -= 1
            ordr[c, b + q] = e


@fn
def sort_all(eams, ordr, filled, num_l, num_e):
    for c in range(filled):
        _sort_layers(eams, ordr, c, num_l, num_e)


@fn
def _live_of(rid, lrid, leam, lsq, lrsum, ldots):
    """The live slot of request ``rid``, a fresh one if it has none (``MoEInfinity._request``);
    -1 if every slot is taken (the caller sized them, so that is an engine bug)."""
    free = -1
    for i in range(lrid.shape[0]):
        if lrid[i] == rid:
            return i
        if lrid[i] < 0 and free < 0:
            free = i
    if free < 0:
        return -1
    lrid[free] = rid
    for t in range(leam.shape[1]):
        leam[free, t] = 0.0
    for i in range(lsq.shape[1]):
        lsq[free, i] = 0.0
        lrsum[free, i] = 0.0
        for c in range(ldots.shape[2]):
            ldots[free, i, c] = 0.0
    if lrsum.shape[1] > lsq.shape[1]:
        lrsum[free, lsq.shape[1]] = -1.0  # no suffix sums yet (see _suffixes)
    return free


@fn
def _add(li, leam, eams, unit, access, ordr, S):
    """``EAMC.add`` of live request ``li``'s EAM; returns its slot or -1."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    nonzero = False
    for t in range(num_l * num_e):
        if leam[li, t] != 0.0:
            nonzero = True
            break
    if not nonzero:
        return -1
    cap = S[IV, I_EAMCAP]
    if S[IV, I_FILLED] < cap:
        idx = S[IV, I_FILLED]
        S[IV, I_FILLED] += 1
    elif S[IV, I_PERSIST] < cap:
        idx = S[IV, I_PERSIST]
        for c in range(S[IV, I_PERSIST] + 1, cap):
            if access[c] < access[idx]:
                idx = c
    else:
        return -1
    for i in range(num_l):
        b = i * num_e
        ss = 0.0
        for e in range(num_e):
            x = leam[li, b + e]
            eams[idx, b + e] = x
            ss += x * x  # integer counts: exact in any order
        nrm = math.sqrt(ss)
        for e in range(num_e):
            unit[b + e, idx] = eams[idx, b + e] / nrm if nrm > 0 else 0.0
    access[idx] = 1.0
    _sort_layers(eams, ordr, idx, num_l, num_e)
    return idx


@fn
def _refresh(li, idx, leam, unit, ldots, buf, S):
    """``EAMC.refresh``: request ``li``'s dot products with the rewritten slot ``idx``."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    for i in range(num_l):
        b = i * num_e
        for e in range(num_e):
            buf[0, e] = unit[b + e, idx] * leam[li, b + e]
        ldots[li, i, idx] = pairwise(buf, 0, 0, num_e)


@fn
def _running(rid, s, req_off, req_ids):
    r = req_off[s]
    while r < req_off[s + 1] and req_ids[r] != rid:
        r += 1
    return r < req_off[s + 1]


@fn
def request_start(s, rid, req_off, req_ids, eams, unit, access, ordr, lrid, leam, lsq, lrsum,
                  ldots, buf, mc, S):
    """``MoEInfinity.on_request_start``: requests no longer running are finished (their EAMs
    join the EAMC, lowest id first), then ``rid`` gets a live slot. A rewritten slot's merged
    lists (``mc``, see ``_cached_list``) are forgotten."""
    while True:
        gone = -1
        for i in range(lrid.shape[0]):
            if lrid[i] >= 0 and not _running(lrid[i], s, req_off, req_ids) and (
                    gone < 0 or lrid[i] < lrid[gone]):
                gone = i
        if gone < 0:
            break
        if S[IV, I_DSRC] == gone:  # D keeps the finished request's EAM (already in F_DN)
            S[IV, I_DSRC] = -1
        lrid[gone] = -1
        idx = _add(gone, leam, eams, unit, access, ordr, S)
        if idx >= 0:
            for i in range(mc.shape[0]):
                if mc[i, 0] == idx:
                    mc[i, 0] = -1
            for i in range(lrid.shape[0]):
                if lrid[i] >= 0:
                    _refresh(i, idx, leam, unit, ldots, buf, S)
    if _live_of(rid, lrid, leam, lsq, lrsum, ldots) < 0:
        S[IV, I_ERROR] = -1_000_000


@fn
def _set_dn(li, leam, lrsum, S, F):
    """``MoEInfinityPriority``'s D from request ``li``'s EAM: rows normalised (empty rows
    uniform), then ``D / sum D + 1e-6``."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    for i in range(num_l):
        b = i * num_e
        rs = lrsum[li, i]
        for e in range(num_e):
            F[F_DN, b + e] = 1.0 / num_e if rs == 0 else leam[li, b + e] / rs
    total = pairwise(F, F_DN, 0, num_l * num_e)
    for t in range(num_l * num_e):
        F[F_DN, t] = F[F_DN, t] / total + 1e-6


@fn
def _column_sums(unit, b, ebuf, m, n, out):
    """``out[c]`` = the stored unit rows ``b + ebuf[t]`` of slot ``c`` summed one by one
    (``0.0 + u_0 + u_1 + ...``, numpy's order for the columns of several slots), three rows
    per pass over the slots (the same additions in the same order per slot; one read and
    write of ``out`` per three rows: the pass is bound by reading the rows)."""
    u = unit[b + ebuf[0]]
    for c in range(n):
        out[c] = 0.0 + u[c]
    t = 1
    while t + 2 < m:
        ua = unit[b + ebuf[t]]
        ub = unit[b + ebuf[t + 1]]
        uc = unit[b + ebuf[t + 2]]
        for c in range(n):
            out[c] = ((out[c] + ua[c]) + ub[c]) + uc[c]
        t += 3
    while t < m:
        ua = unit[b + ebuf[t]]
        for c in range(n):
            out[c] += ua[c]
        t += 1


@fn
def routed(s, j, lkeys, n_keys, prio, req_off, req_ids, unit, lrid, leam, lsq, lrsum, ldots,
           ebuf, buf, S, F):
    """``MoEInfinity.on_routed``: the demand phase starts; every running request's EAM and dot
    products take the layer's experts (``EAMC.observe``)."""
    S[IV, I_DEMPH] = 1
    if n_keys == 0:
        return
    num_e = S[IV, I_NUME]
    m = 0
    for r in range(n_keys):  # np.unique: sorted, without repeats
        e = lkeys[r] - j * num_e
        q = m
        while q > 0 and ebuf[q - 1] > e:
            q -= 1
        if q > 0 and ebuf[q - 1] == e:
            continue
        for t in range(m, q, -1):
            ebuf[t] = ebuf[t - 1]
        ebuf[q] = e
        m += 1
    b = j * num_e
    n = S[IV, I_FILLED]
    # the stored unit rows' sums over the layer's experts (every running request gets the same
    # experts): one stored row is summed pairwise by numpy, the columns of several one by one
    if n == 1:
        for t in range(m):
            buf[0, t] = unit[b + ebuf[t], 0]
        buf[2, 0] = pairwise(buf, 0, 0, m)
    elif n > 1:
        _column_sums(unit, b, ebuf, m, n, buf[2])
    for r in range(req_off[s], req_off[s + 1]):
        li = _live_of(req_ids[r], lrid, leam, lsq, lrsum, ldots)
        add = 0.0
        for t in range(m):
            add += 2.0 * leam[li, b + ebuf[t]] + 1.0
        lsq[li, j] += add
        for t in range(m):
            leam[li, b + ebuf[t]] += 1.0
        lrsum[li, j] += m
        dots = ldots[li, j]
        col = buf[2]
        for c in range(n):
            dots[c] += col[c]
        if prio and li == S[IV, I_DSRC]:
            _set_dn(li, leam, lrsum, S, F)


# How far a suffix sum (``_suffixes``, summed in another order) may lie from the match's own
# sum of the same cosines: each is within ``m u sum|x|`` (m <= 128 layers, cosines in [0, 1],
# u = 2**-53, so < 4e-12) of the exact value, and two sums rounding to the same distance differ
# by a few ulps of 128; every slot within this margin of the best suffix is evaluated exactly.
PRUNE_TOL = 1e-9


@fn
def _suffixes(li, lo, n, ldots, buf, S):
    """Request ``li``'s cosine sums over the layers after each layer ``t >= lo - 1``, per
    slot, into ``ldots[li, L + t]`` (rows ``L..2L-1``): ``sum_{i > t} ldots[li, i] * w_i``.
    Rows after the current layer change only when their own layer is routed (later in the
    step) or at a request's start (before the step), so one pass per step serves every
    layer's match; ``lrsum[li, L]`` keeps the step they were taken at."""
    num_l = S[IV, I_NUML]
    top = num_l + num_l - 1
    for c in range(n):
        ldots[li, top, c] = 0.0
    for t in range(num_l - 2, lo - 2, -1):
        w = buf[1, t + 1]
        out = ldots[li, num_l + t]  # views: the loop over slots runs on contiguous rows
        after = ldots[li, num_l + t + 1]
        cos = ldots[li, t + 1]
        for c in range(n):
            out[c] = after[c] + cos[c] * w


@fn
def _exact(li, c, lo, m, ldots, buf):
    """The match's sum of slot ``c``'s cosines over layers ``lo..lo+m-1``: the scalar form of
    the vectorised pairwise leaf below (same operations, same order, same float)."""
    if m < 8:
        tot = -0.0
        for t in range(m):
            tot += ldots[li, lo + t, c] * buf[1, lo + t]
        return tot
    a0 = ldots[li, lo, c] * buf[1, lo]
    a1 = ldots[li, lo + 1, c] * buf[1, lo + 1]
    a2 = ldots[li, lo + 2, c] * buf[1, lo + 2]
    a3 = ldots[li, lo + 3, c] * buf[1, lo + 3]
    a4 = ldots[li, lo + 4, c] * buf[1, lo + 4]
    a5 = ldots[li, lo + 5, c] * buf[1, lo + 5]
    a6 = ldots[li, lo + 6, c] * buf[1, lo + 6]
    a7 = ldots[li, lo + 7, c] * buf[1, lo + 7]
    i = 8
    stop = m - m % 8
    while i < stop:
        b = lo + i
        a0 += ldots[li, b, c] * buf[1, b]
        a1 += ldots[li, b + 1, c] * buf[1, b + 1]
        a2 += ldots[li, b + 2, c] * buf[1, b + 2]
        a3 += ldots[li, b + 3, c] * buf[1, b + 3]
        a4 += ldots[li, b + 4, c] * buf[1, b + 4]
        a5 += ldots[li, b + 5, c] * buf[1, b + 5]
        a6 += ldots[li, b + 6, c] * buf[1, b + 6]
        a7 += ldots[li, b + 7, c] * buf[1, b + 7]
        i += 8
    tot = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while i < m:
        tot += ldots[li, lo + i, c] * buf[1, lo + i]
        i += 1
    return tot


@fn
def _match(s, li, j, lsq, lrsum, ldots, access, mask, buf, S):
    """``EAMC.match``: the stored EAM at the least ``1 - mean cos`` (first on ties).

    With the observed layers masked (the default) the slots are ranked first by their suffix
    sums (``_suffixes``, taken once per step) and only those within ``PRUNE_TOL`` of the best
    are summed exactly, in the order numpy sums them: the same slot as summing every slot,
    for ``3 L N`` instead of ``L^2 N / 2`` operations per step. Unmasked, every slot is
    summed (all rows change each step)."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    for i in range(num_l):
        nrm = math.sqrt(lsq[li, i])
        buf[1, i] = 1.0 / nrm if nrm > 0 else 0.0
    masked = 0.0
    lo = 0
    if mask:
        for i in range(j + 1):
            buf[0, i] = lrsum[li, i] * buf[1, i]
        masked = pairwise(buf, 0, 0, j + 1) / math.sqrt(num_e)
        lo = j + 1
    m = num_l - lo
    n = S[IV, I_FILLED]
    best = -1
    best_d = INF
    if mask and ldots.shape[1] >= 2 * num_l:
        if lrsum[li, num_l] != s:
            _suffixes(li, lo, n, ldots, buf, S)
            lrsum[li, num_l] = s
        suf = ldots[li, num_l + j]
        # one pass: the best suffix, and the slots within PRUNE_TOL of the best so far (a
        # superset of those within it of the best, in order; kept as floats in buf[2])
        near = buf[2]
        top = suf[0]
        near[0] = 0.0
        cnt = 1
        for c in range(1, n):
            v = suf[c]
            if v > top:
                top = v
            if v >= top - PRUNE_TOL:
                near[cnt] = c
                cnt += 1
        floor = top - PRUNE_TOL
        for q in range(cnt):
            c = int(near[q])
            if suf[c] >= floor:
                d = 1.0 - (masked + _exact(li, c, lo, m, ldots, buf)) / num_l
                if d < best_d:
                    best_d = d
                    best = c
        access[best] += 1.0
        return best
    # numpy's pairwise sum of each slot's cosines over layers lo.. (m <= 128: one leaf), for
    # all slots at once: rows 2..9 of buf are the eight accumulators per slot
    if m < 8:
        for c in range(n):
            buf[2, c] = -0.0
        for t in range(m):
            w = buf[1, lo + t]
            for c in range(n):
                buf[2, c] += ldots[li, lo + t, c] * w
    else:
        for q in range(8):
            w = buf[1, lo + q]
            for c in range(n):
                buf[2 + q, c] = ldots[li, lo + q, c] * w
        i = 8
        stop = m - m % 8
        while i < stop:
            for q in range(8):
                w = buf[1, lo + i + q]
                for c in range(n):
                    buf[2 + q, c] += ldots[li, lo + i + q, c] * w
            i += 8
        for c in range(n):
            buf[2, c] = (((buf[2, c] + buf[3, c]) + (buf[4, c] + buf[5, c]))
                         + ((buf[6, c] + buf[7, c]) + (buf[8, c] + buf[9, c])))
        while i < m:
            w = buf[1, lo + i]
            for c in range(n):
                buf[2, c] += ldots[li, lo + i, c] * w
            i += 1
    for c in range(n):
        tot = buf[2, c]
        if mask:
            tot = masked + tot
        d = 1.0 - tot / num_l
        if d < best_d:
            best_d = d
            best = c
    access[best] += 1.0
    return best


@fn
def _recount(S):
    """``_VisitCounts.recount`` of every partition: held keys outside the candidate set."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    single = S[IV, I_NUMP] == 1
    width = S[IV, I_CWIDTH]
    nc = 0
    for i in range(num_l):
        if i < S[IV, I_CLO] or i > S[IV, I_CHI]:
            held = S[L_HELD, i]
        elif width == 0:
            held = 0
        else:
            held = 0
            for e in range(num_e):
                k = i * num_e + e
                if S[K_STATE, k] != ABSENT and S[K_CAND, k] != S[IV, I_CSTAMP]:
                    held += 1
        if single:
            nc += held
        else:
            S[P_NC, i] = held
    if single:
        S[P_NC, 0] = nc


@fn
def _head(idx, i, lenw, ibuf, eams, ordr, buf, S):
    """Move layer ``i``'s head (``ibuf[i]``) past the keys held in the cache and put its
    score, ``priority``'s ``(count + 1e-8) * decay``, in ``buf[1, i]`` (-1 when used up)."""
    num_e = S[IV, I_NUME]
    b = i * num_e
    q = ibuf[i]
    while q < lenw and S[K_STATE, b + ordr[idx, b + q]] != ABSENT:
        q += 1
    ibuf[i] = q
    if q < lenw:
        buf[1, i] = (eams[idx, b + ordr[idx, b + q]] + 1e-8) * buf[3, i]
    else:
        buf[1, i] = -1.0


@fn
def _merge_list(idx, j, chi, lenw, ibuf, eams, ordr, buf, S):
    """The list as the merge of the layers' sorted lists by score (the lower layer first on
    ties), from the start: its first absent keys, per partition up to ``S[B_SKIP]``, into
    ``S[B_PKEYS]``; returns how many. Each layer's head skips the keys held in the cache
    (resident or loading: they take no room), its score is in buf[1] (-1 once the layer is used
    up or, with several partitions, out of room: every real score is > 0), its decay in buf[3]
    (computed once per call, as ``priority`` computes it)."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    single = S[IV, I_NUMP] == 1
    for i in range(j, chi + 1):
        ibuf[i] = 0
        buf[3, i] = 1.0 - (i - j) / (num_l + 1)
        _head(idx, i, lenw, ibuf, eams, ordr, buf, S)
        if not single and S[B_SKIP, i] <= 0:
            buf[1, i] = -1.0
    n = 0
    while True:
        bi = j  # highest score; the lower layer first on ties
        for i in range(j + 1, chi + 1):
            if buf[1, i] > buf[1, bi]:
                bi = i
        if buf[1, bi] < 0.0:
            break
        k = bi * num_e + ordr[idx, bi * num_e + ibuf[bi]]  # absent: the head skips held keys
        ibuf[bi] += 1
        _head(idx, bi, lenw, ibuf, eams, ordr, buf, S)
        p = S[K_PART, k]
        if S[B_SKIP, p] > 0:
            S[B_PKEYS, n] = k
            n += 1
            S[B_SKIP, p] -= 1
            if single:
                if S[B_SKIP, 0] == 0:
                    break
            elif S[B_SKIP, p] == 0 and j <= p <= chi:
                buf[1, p] = -1.0  # layer p is out of the running (B_SKIP is read by layer)
    return n


# mc[j] (one cache partition): [slot, length, head of each layer (L cells), keys...]
MC_HEADS = 2


@fn
def _extend(idx, j, chi, lenw, need, eams, ordr, buf, mc, S):
    """Slot ``idx``'s whole list at layer ``j`` (held keys included) merged on in ``mc[j]``
    until it holds ``need`` keys (or the list or ``mc``'s width ends): the merge of
    ``_merge_list`` (scores, decays and ties computed alike) without the cache's state,
    resumed from the layers' heads kept in ``mc[j]``; a layer keeps the lead while its next
    score beats the runner-up's, so most keys cost no scan of the layers."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    off = MC_HEADS + num_l
    for i in range(j, chi + 1):
        buf[3, i] = 1.0 - (i - j) / (num_l + 1)
        b = i * num_e
        q = mc[j, MC_HEADS + i]
        buf[1, i] = (eams[idx, b + ordr[idx, b + q]] + 1e-8) * buf[3, i] if q < lenw else -1.0
    stop = min(need, mc.shape[1] - off)
    t = mc[j, 1]
    while t < stop:
        bi = j  # highest score, the lower layer first on ties; ri: the runner-up
        ri = -1
        for i in range(j + 1, chi + 1):
            if buf[1, i] > buf[1, bi]:
                ri = bi
                bi = i
            elif ri < 0 or buf[1, i] > buf[1, ri]:
                ri = i
        top = buf[1, bi]
        if top < 0.0:
            break
        second = buf[1, ri] if ri >= 0 else -1.0
        b = bi * num_e
        q = mc[j, MC_HEADS + bi]
        # layer bi leads while its score beats the runner-up's (or ties it from a lower layer);
        # -1 once it is used up (every real score is > 0)
        while t < stop and top > 0.0 and (top > second or (top == second and bi < ri)):
            mc[j, off + t] = b + ordr[idx, b + q]
            t += 1
            q += 1
            top = (eams[idx, b + ordr[idx, b + q]] + 1e-8) * buf[3, bi] if q < lenw else -1.0
        mc[j, MC_HEADS + bi] = q
        buf[1, bi] = top
    mc[j, 1] = t


@fn
def _cached_list(idx, j, chi, lenw, eams, ordr, buf, mc, S):
    """``_merge_list`` for one cache partition, walking slot ``idx``'s whole list at layer
    ``j`` kept in ``mc[j]`` (begun afresh when the matched slot changed: the same slot is
    matched again at the same layer for most steps; merged on as far as a walk needs): its
    absent keys in order, up to ``S[B_SKIP, 0]``. Returns how many keys, or -1 when ``mc``
    is too narrow for this walk (then the list is merged afresh; never with ``mc`` holding
    cap + E keys: the walk reads the listed keys, at most room = cap - used + NC + E, and
    the held candidates it passes, at most used - NC)."""
    num_l = S[IV, I_NUML]
    off = MC_HEADS + num_l
    if mc[j, 0] != idx:
        mc[j, 0] = idx
        mc[j, 1] = 0
        for i in range(j, chi + 1):
            mc[j, MC_HEADS + i] = 0
    total = (chi - j + 1) * lenw
    skip = S[B_SKIP, 0]
    n = 0
    t = 0
    while skip > 0:
        if t == mc[j, 1]:
            if t == total:
                break  # the whole list is walked
            if t == mc.shape[1] - off:
                return -1
            _extend(idx, j, chi, lenw, t + skip, eams, ordr, buf, mc, S)
        stop = mc[j, 1]
        while t < stop and skip > 0:  # without branches: every key is written, absent ones kept
            k = mc[j, off + t]
            t += 1
            S[B_PKEYS, n] = k
            a = 1 if S[K_STATE, k] == ABSENT else 0
            n += a
            skip -= a
    S[B_SKIP, 0] = skip
    return n


@fn
def demand_issued(s, j, timed, prio, horizon, mask, req_off, req_ids, eams, access, ordr,
                  lrid, leam, lsq, lrsum, ldots, ibuf, buf, mc, S, F):
    """``MoEInfinity.on_demand_issued``: match every running request, flush the link's queue,
    make the last match's list the candidate set and put its first absent keys (per partition
    ``prefetch_room() + E``, as ``_queueable``) in ``S[B_PKEYS]``; returns how many. With one
    partition the list is walked from the matched slot's whole list kept per layer in ``mc``
    (``_cached_list``; ``mc`` with no room for keys: merged at every call)."""
    S[IV, I_DEMPH] = 0
    r0, r1 = req_off[s], req_off[s + 1]
    if r1 == r0:
        return 0
    last = _live_of(req_ids[r1 - 1], lrid, leam, lsq, lrsum, ldots)
    if prio and last != S[IV, I_DSRC]:  # the same request's D is current: routed redid it
        _set_dn(last, leam, lrsum, S, F)
    S[IV, I_DSRC] = last
    if S[IV, I_FILLED] == 0:
        return 0
    idx = 0
    for r in range(r0, r1):
        li = _live_of(req_ids[r], lrid, leam, lsq, lrsum, ldots)
        idx = _match(s, li, j, lsq, lrsum, ldots, access, mask, buf, S)
    if timed:
        _cancel_all(S)
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    chi = num_l - 1 if horizon < 0 else min(num_l - 1, j + horizon)
    width = S[IV, I_CWIDTH]
    lenw = num_e if width == 0 else min(width, num_e)
    S[IV, I_HASCAND] = 1
    S[IV, I_CLO] = j
    S[IV, I_CHI] = chi
    if width > 0:
        S[IV, I_CSTAMP] += 1
        for i in range(j, chi + 1):
            for r in range(lenw):
                S[K_CAND, i * num_e + ordr[idx, i * num_e + r]] = S[IV, I_CSTAMP]
    _recount(S)
    for p in range(S[IV, I_NUMP]):
        S[B_SKIP, p] = S[P_CAP, p] - S[P_USED, p] + S[P_NC, p] + num_e
    # The list is the layers' sorted lists merged by score, the lower layer first on ties;
    # only its absent keys are queued.
    if S[IV, I_NUMP] == 1 and mc.shape[1] > MC_HEADS + num_l:
        room = S[B_SKIP, 0]
        n = _cached_list(idx, j, chi, lenw, eams, ordr, buf, mc, S)
        if n >= 0:
            return n
        S[B_SKIP, 0] = room
    return _merge_list(idx, j, chi, lenw, ibuf, eams, ordr, buf, S)
