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

import numpy as np

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
from moesim.sim.compiled.link import _cancel_all, _queue_listed
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
    for i in range(lsq.shape[1]):  # squared norms (and their inverses, when kept)
        lsq[free, i] = 0.0
    num_l = min(lsq.shape[1], lrsum.shape[1] - 1)  # L (lrsum: L row sums, then a step)
    for i in range(num_l):
        lrsum[free, i] = 0.0
        for c in range(ldots.shape[2]):
            ldots[free, i, c] = 0.0
    lrsum[free, num_l] = -1.0  # no suffix sums yet (see _suffixes)
    return free


@fn
def _add(li, leam, eams, mt, access, ordr, S):
    """``EAMC.add`` of live request ``li``'s EAM; returns its slot or -1. The slot's unit
    rows are written in both layouts, its counts and inverse row norms for the lazy match."""
    unit, unit_s, cnt, inv = mt[0], mt[1], mt[2], mt[3]
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
            x = eams[idx, b + e] / nrm if nrm > 0 else 0.0
            unit[b + e, idx] = x
            unit_s[idx, b + e] = x
            cnt[b + e, idx] = int(eams[idx, b + e])
        inv[i, idx] = 1.0 / nrm if nrm > 0 else 0.0
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


# The lazy match (mask_observed, the default). A match only looks at the layers after the
# current one, whose rows no routing of this step has touched yet; it ranks every slot by its
# integer dot products ``C[c, i] . eam[i]`` (exact in any order: counts are integers) scaled
# by the row norms, and sums exactly only the slots within a tolerance of the best. Their float
# dot products are brought up to date then (``_catch_up``), replaying the routings of the rows
# they lack from a ring of the run's last steps, with the same additions in the same order as
# ``EAMC.observe`` made them: so most slots' float dot products are never computed.
# mt (sim.compiled.mi_arrays): unit rows [L E, slots] and [slots, L E], counts [L E, slots]
# (int32), inverse row norms [L, slots], the ring of routed experts [R, L E] and how many per
# layer [R, L], run scalars (G_*), and per live request: integer dot products [L, slots]
# (int64), the step each float dot product is exact up to (exclusive) [slots, L], M_MIN /
# M_LAST, the float dot products [slots, L] (one slot's contiguous: a match sums a few slots
# whole), and the maxima of the approximate suffix sums (``_approx_suffixes``).
G_OFF, G_NS, G_LAZY, G_STEP = 0, 1, 2, 3  # step offset of this call, its steps, lazy?, ring row
M_MIN, M_LAST = 0, 1  # no marker below M_MIN; the last step the request was routed in


@fn
def begin(mt, num_s):
    """A replay call starts (the run, or a streamed chunk whose steps count from 0 again): its
    steps are numbered on from the previous call's."""
    gst = mt[6]
    gst[G_OFF] += gst[G_NS]
    gst[G_NS] = num_s


@fn
def _lazy(mt, lrid, ldots, S):
    """Whether the lazy match runs: masked, and its per-request tables sized for every live
    request (``sim.stream._mi_state`` sizes them with the live buffers it re-sizes)."""
    return (mt[6][G_LAZY] != 0 and mt[7].shape[0] >= lrid.shape[0]
            and ldots.shape[1] >= 2 * S[IV, I_NUML])


@fn
def _live(rid, g, upto, lazy, lrid, leam, lsq, lrsum, ldots, mt, S):
    """``_live_of``; a new live request's float dot products are exact (all zero) up to step
    ``g`` (``g + 1`` for layers before ``upto``, which this step routed without it)."""
    for i in range(lrid.shape[0]):
        if lrid[i] == rid:
            return i
    li = _live_of(rid, lrid, leam, lsq, lrsum, ldots)
    if li >= 0 and lazy:
        lip, lmk, ldx = mt[7], mt[8], mt[10]
        for i in range(lip.shape[1]):
            for c in range(lip.shape[2]):
                lip[li, i, c] = 0
        for c in range(lmk.shape[1]):
            for i in range(lmk.shape[2]):
                lmk[li, c, i] = g + 1 if i < upto else g
                ldx[li, c, i] = 0.0
        mt[9][li, M_MIN] = g
        mt[9][li, M_LAST] = g - 1
    return li


@fn
def _lazy_refresh(li, idx, g, leam, ldots, mt, S):
    """Live request ``li`` after slot ``idx`` was rewritten (``_refresh`` recomputed its float
    dot products from the whole EAM): those and its integer ones, exact as of step ``g``."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    cnt, lip, lmk, ldx = mt[2], mt[7], mt[8], mt[10]
    for i in range(num_l):
        b = i * num_e
        v = 0
        for e in range(num_e):
            v += cnt[b + e, idx] * int(leam[li, b + e])
        lip[li, i, idx] = v
        lmk[li, idx, i] = g
        ldx[li, idx, i] = ldots[li, i, idx]


@fn
def _catch_up(li, c, i, g_to, mt, num_e):
    """Request ``li``'s float dot product with slot ``c`` in layer ``i`` brought up to step
    ``g_to`` (exclusive): each routing it lacks added as ``EAMC.observe`` adds it (the layer's
    experts' unit values from ``0.0``, one by one, then onto the dot product)."""
    lmk = mt[8]
    g = lmk[li, c, i]
    if g >= g_to:
        return
    unit_s, ring, ringm, ldx = mt[1], mt[4], mt[5], mt[10]
    r = ring.shape[0]
    b = i * num_e
    d = ldx[li, c, i]
    while g < g_to:
        p = g % r
        m = ringm[p, i]
        if m > 0:
            col = 0.0 + unit_s[c, b + ring[p, b]]
            for t in range(1, m):
                col += unit_s[c, b + ring[p, b + t]]
            d += col
        g += 1
    ldx[li, c, i] = d
    lmk[li, c, i] = g_to


@fn
def _flush(li, g_to, mt, S):
    """Every filled slot's float dot products of request ``li`` up to step ``g_to``."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    for c in range(S[IV, I_FILLED]):
        for i in range(num_l):
            _catch_up(li, c, i, g_to, mt, num_e)


@fn
def _mark(li, g, mt, S):
    """Request ``li`` was not routed in the steps before ``g`` since its markers (flushed up
    to its last step): nothing to replay there."""
    lmk = mt[8]
    for c in range(S[IV, I_FILLED]):
        for i in range(lmk.shape[2]):
            lmk[li, c, i] = g
    mt[9][li, M_MIN] = g


@fn
def _step_start(g, mt, lrid, S):
    """Step ``g``'s first routing: its ring row is cleared (layers without routed experts
    stay empty) after every live request that might still replay the step it overwrites was
    flushed up to its last routed step."""
    ring, ringm, lmeta = mt[4], mt[5], mt[9]
    r = ring.shape[0]
    p = g % r
    for i in range(ringm.shape[1]):
        ringm[p, i] = 0
    for li in range(lrid.shape[0]):
        if lrid[li] >= 0 and g - lmeta[li, M_MIN] >= r:
            _flush(li, lmeta[li, M_LAST] + 1, mt, S)
            lmeta[li, M_MIN] = g
    mt[6][G_STEP] = g


@fn
def _count_sums(cnt, b, ebuf, m, n, out):
    """``out[c] +=`` slot ``c``'s counts summed over the experts ``b + ebuf[:m]`` (integers:
    exact in any order; ``out`` holds integers, as int64 or as floats). Six rows per pass
    over the slots, then three, then one: ``out`` is read and written once per pass."""
    t = 0
    while t + 5 < m:
        ua = cnt[b + ebuf[t]]
        ub = cnt[b + ebuf[t + 1]]
        uc = cnt[b + ebuf[t + 2]]
        ud = cnt[b + ebuf[t + 3]]
        ue = cnt[b + ebuf[t + 4]]
        uf = cnt[b + ebuf[t + 5]]
        for c in range(n):
            out[c] += ((ua[c] + ub[c]) + (uc[c] + ud[c])) + (ue[c] + uf[c])
        t += 6
    while t + 2 < m:
        ua = cnt[b + ebuf[t]]
        ub = cnt[b + ebuf[t + 1]]
        uc = cnt[b + ebuf[t + 2]]
        for c in range(n):
            out[c] += ua[c] + ub[c] + uc[c]
        t += 3
    while t < m:
        ua = cnt[b + ebuf[t]]
        for c in range(n):
            out[c] += ua[c]
        t += 1


@fn
def _approx_suffixes(li, lo, n, mt, ldots, buf, S):
    """``_suffixes`` from the integer dot products: ``sum_{i > t} C.eam[i] / |C[i]| * w_i``
    per slot into ``ldots[li, L + t]``, within ``_match_lazy``'s tolerance of the float sum;
    with each row's maximum and its blocks' of ``SCAN`` slots (``mt[11][li, t]``: the row's,
    then the blocks'), so that a match scans only the blocks that reach its floor."""
    num_l = S[IV, I_NUML]
    inv, lip, lbm = mt[3], mt[7], mt[11]
    top = num_l + num_l - 1
    for c in range(n):
        ldots[li, top, c] = 0.0
    for t in range(num_l - 2, lo - 2, -1):
        _suffix_row(ldots[li, num_l + t], ldots[li, num_l + t + 1], lip[li, t + 1],
                    inv[t + 1], buf[1, t + 1], n, lbm[li, t])


@fn
def _suffix_row(out, after, ip, iv, w, n, bm):
    """``out[c] = after[c] + ip[c] * (iv[c] * w)`` for the first ``n`` slots; the maximum of
    each block of ``SCAN`` slots into ``bm[q + 1]`` and the row's into ``bm[0]``.

    The maxima are taken over the sums' bit patterns as integers: every sum is a float >= 0
    (products of counts and inverse norms, no NaN), and for those the order of the bit
    patterns is the order of the values; an integer maximum vectorises (a float one does not
    without fast-math flags), and the sums' loop runs whole before it."""
    for c in range(n):
        out[c] = after[c] + ip[c] * (iv[c] * w)
    ob = out.view(np.int64)
    bb = bm.view(np.int64)
    row = 0
    for q in range((n + SCAN - 1) // SCAN):
        c0 = q * SCAN
        c1 = min(c0 + SCAN, n)
        hi = 0
        for c in range(c0, c1):
            x = ob[c]
            hi = x if x > hi else hi
        bb[q + 1] = hi
        row = hi if hi > row else row
    bb[0] = row


@fn
def _match_lazy(s, g, li, j, mt, lsq, lrsum, ldots, access, buf, S):
    """``EAMC.match`` (masked) from the integer dot products: every slot whose approximate
    sum is within ``tol`` of the best is brought up to date and summed exactly, in numpy's
    order, and the first least distance among them wins, as over all slots.

    Why ``tol`` suffices: a float dot product is a sum of at most ``lrsum`` (+ a row's
    experts) positive terms, each within a relative ``2u`` (``u = 2**-53``: a square root and
    a division) of the real one, so it is within ``(lrsum + E + 2) u`` of ``C.eam / |C|``
    relatively (in any order of the additions); the norms, products and the sum
    over at most L cosines (each <= 1) add ``(L + 10) u``: both the approximate and the
    exact sum lie within ``L (lrsum + E + L + 64) 1.2e-16`` of the real one, and ``tol`` is
    four times that (plus 1e-12): a slot left out is below the best by more than the rounding
    of ``1 - (masked + sum) / L`` can hide."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    most = 0.0
    later = False  # a later layer routed: the sums can differ (else every slot's is 0)
    kept = lsq.shape[1] >= 2 * num_l  # the inverse row norms kept by routed
    for i in range(num_l):
        if kept:
            buf[1, i] = lsq[li, num_l + i]
        else:
            nrm = math.sqrt(lsq[li, i])
            buf[1, i] = 1.0 / nrm if nrm > 0 else 0.0
        if lrsum[li, i] > most:
            most = lrsum[li, i]
        if i > j and lsq[li, i] > 0:
            later = True
    if not later:  # the last layer, or a request's first step: every distance ties
        access[0] += 1.0
        return 0
    for i in range(j + 1):
        buf[0, i] = lrsum[li, i] * buf[1, i]
    masked = pairwise(buf, 0, 0, j + 1) / math.sqrt(num_e)
    lo = j + 1
    m = num_l - lo
    n = S[IV, I_FILLED]
    if lrsum[li, num_l] != s:
        _approx_suffixes(li, lo, n, mt, ldots, buf, S)
        lrsum[li, num_l] = s
    suf = ldots[li, num_l + j]
    bm = mt[11][li, j]
    floor = bm[0] - (1e-12 + 4.8e-16 * num_l * (most + num_e + num_l + 64))
    best = -1
    best_d = INF
    for q in range((n + SCAN - 1) // SCAN):  # only the blocks that reach the floor
        if bm[q + 1] < floor:
            continue
        for c in range(q * SCAN, min(q * SCAN + SCAN, n)):
            if suf[c] >= floor:
                for i in range(lo, num_l):
                    _catch_up(li, c, i, g, mt, num_e)
                d = 1.0 - (masked + _exact_s(mt[10][li, c], lo, m, buf)) / num_l
                if d < best_d:
                    best_d = d
                    best = c
    access[best] += 1.0
    return best


SCAN = 32  # slots per block of a match's scan


@fn
def request_start(s, rid, req_off, req_ids, eams, mt, access, ordr, lrid, leam, lsq, lrsum,
                  ldots, buf, mc, S):
    """``MoEInfinity.on_request_start``: requests no longer running are finished (their EAMs
    join the EAMC, lowest id first), then ``rid`` gets a live slot. A rewritten slot's merged
    lists (``mc``, see ``_cached_list``) are forgotten; the live requests' dot products with
    it are recomputed (exact as of this step: the lazy match's markers say so)."""
    lazy = _lazy(mt, lrid, ldots, S)
    g = mt[6][G_OFF] + s
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
        idx = _add(gone, leam, eams, mt, access, ordr, S)
        if idx >= 0:
            for i in range(mc.shape[0]):
                if mc[i, 0] == idx:
                    mc[i, 0] = -1
            for i in range(lrid.shape[0]):
                if lrid[i] >= 0:
                    _refresh(i, idx, leam, mt[0], ldots, buf, S)
                    if lazy:
                        _lazy_refresh(i, idx, g, leam, ldots, mt, S)
    if _live(rid, g, 0, lazy, lrid, leam, lsq, lrsum, ldots, mt, S) < 0:
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
def routed(s, j, lkeys, n_keys, prio, req_off, req_ids, mt, lrid, leam, lsq, lrsum, ldots,
           ebuf, buf, S, F):
    """``MoEInfinity.on_routed``: the demand phase starts; every running request's EAM and dot
    products take the layer's experts (``EAMC.observe``). Lazily (``_lazy``): the experts go
    into the step ring and only the integer dot products are updated (the float ones when a
    match needs them, ``_catch_up``)."""
    S[IV, I_DEMPH] = 1
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    lazy = _lazy(mt, lrid, ldots, S)
    g = mt[6][G_OFF] + s
    if lazy and mt[6][G_STEP] != g:
        _step_start(g, mt, lrid, S)
    if n_keys == 0:
        return
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
    unit = mt[0]
    # the stored unit rows' sums over the layer's experts (every running request gets the same
    # experts): one stored row is summed pairwise by numpy, the columns of several one by one
    if n == 1:
        for t in range(m):
            buf[0, t] = unit[b + ebuf[t], 0]
        buf[2, 0] = pairwise(buf, 0, 0, m)
    elif n > 1 and not lazy:
        _column_sums(unit, b, ebuf, m, n, buf[2])
    if lazy:
        ring, ringm = mt[4], mt[5]
        p = g % ring.shape[0]
        for t in range(m):
            ring[p, b + t] = ebuf[t]
        ringm[p, j] = m
        one = req_off[s + 1] - req_off[s] == 1  # the integer sums go straight to its row
        if n > 0 and not one:
            for c in range(n):
                buf[3, c] = 0.0
            _count_sums(mt[2], b, ebuf, m, n, buf[3])
    for r in range(req_off[s], req_off[s + 1]):
        li = _live(req_ids[r], g, j, lazy, lrid, leam, lsq, lrsum, ldots, mt, S)
        if lazy and mt[9][li, M_LAST] < g - 1:  # not routed in the steps between: none to replay
            _flush(li, mt[9][li, M_LAST] + 1, mt, S)
            _mark(li, g, mt, S)
        add = 0.0
        for t in range(m):
            add += 2.0 * leam[li, b + ebuf[t]] + 1.0
        lsq[li, j] += add
        if lsq.shape[1] >= 2 * num_l:  # the inverse norm, for _match_lazy's every call
            nrm = math.sqrt(lsq[li, j])
            lsq[li, num_l + j] = 1.0 / nrm if nrm > 0 else 0.0
        for t in range(m):
            leam[li, b + ebuf[t]] += 1.0
        lrsum[li, j] += m
        if lazy:
            ip = mt[7][li, j]
            if one:
                _count_sums(mt[2], b, ebuf, m, n, ip)
            else:
                col = buf[3]
                for c in range(n):
                    ip[c] += int(col[c])
            if n == 1:  # numpy's pairwise order: applied now, the replay sums in another
                mt[10][li, 0, j] += buf[2, 0]
                mt[8][li, 0, j] = g + 1
            mt[9][li, M_LAST] = g
        else:
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
def _exact_s(dots, lo, m, buf):
    """``_exact`` for one slot's float dot products held contiguously (the lazy match's)."""
    if m < 8:
        tot = -0.0
        for t in range(m):
            tot += dots[lo + t] * buf[1, lo + t]
        return tot
    a0 = dots[lo] * buf[1, lo]
    a1 = dots[lo + 1] * buf[1, lo + 1]
    a2 = dots[lo + 2] * buf[1, lo + 2]
    a3 = dots[lo + 3] * buf[1, lo + 3]
    a4 = dots[lo + 4] * buf[1, lo + 4]
    a5 = dots[lo + 5] * buf[1, lo + 5]
    a6 = dots[lo + 6] * buf[1, lo + 6]
    a7 = dots[lo + 7] * buf[1, lo + 7]
    i = 8
    stop = m - m % 8
    while i < stop:
        b = lo + i
        a0 += dots[b] * buf[1, b]
        a1 += dots[b + 1] * buf[1, b + 1]
        a2 += dots[b + 2] * buf[1, b + 2]
        a3 += dots[b + 3] * buf[1, b + 3]
        a4 += dots[b + 4] * buf[1, b + 4]
        a5 += dots[b + 5] * buf[1, b + 5]
        a6 += dots[b + 6] * buf[1, b + 6]
        a7 += dots[b + 7] * buf[1, b + 7]
        i += 8
    tot = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while i < m:
        tot += dots[lo + i] * buf[1, lo + i]
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
def _head_score(idx, i, j, q, lenw, eams, ordr, num_l, num_e):
    """``priority``'s score of layer ``i``'s ``q``-th key of slot ``idx`` at layer ``j``
    (-1 once the layer is used up); ``_merge_list``'s expression."""
    if q >= lenw:
        return -1.0
    b = i * num_e
    return (eams[idx, b + ordr[idx, b + q]] + 1e-8) * (1.0 - (i - j) / (num_l + 1))


@fn
def _extend(idx, j, chi, lenw, need, eams, ordr, buf, mc, mcs, S):
    """Slot ``idx``'s whole list at layer ``j`` (held keys included) merged on in ``mc[j]``
    until it holds ``need`` keys (or the list or ``mc``'s width ends): the merge of
    ``_merge_list`` (scores, decays and ties computed alike) without the cache's state,
    resumed from the layers' heads kept in ``mc[j]`` and their scores in ``mcs[j]`` (no
    reads of the slot's rows to resume); a layer keeps the lead while its next score beats
    the runner-up's, so most keys cost no scan of the layers."""
    num_l, num_e = S[IV, I_NUML], S[IV, I_NUME]
    off = MC_HEADS + num_l
    for i in range(j, chi + 1):
        buf[1, i] = mcs[j, i]
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
            top = _head_score(idx, bi, j, q, lenw, eams, ordr, num_l, num_e)
        mc[j, MC_HEADS + bi] = q
        buf[1, bi] = top
        mcs[j, bi] = top
    mc[j, 1] = t


@fn
def _cached_list(idx, j, chi, lenw, eams, ordr, buf, mc, mcs, S):
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
            mcs[j, i] = _head_score(idx, i, j, 0, lenw, eams, ordr, num_l, S[IV, I_NUME])
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
            _extend(idx, j, chi, lenw, t + skip, eams, ordr, buf, mc, mcs, S)
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
def demand_issued(s, j, timed, fuse, prio, horizon, mask, req_off, req_ids, eams, mt, access,
                  ordr, lrid, leam, lsq, lrsum, ldots, ibuf, buf, mc, mcs, S, F):
    """``MoEInfinity.on_demand_issued``: match every running request, flush the link's queue,
    make the last match's list the candidate set and put its first absent keys (per partition
    ``prefetch_room() + E``, as ``_queueable``) in ``S[B_PKEYS]``; returns how many. With one
    partition the list is walked from the matched slot's whole list kept per layer in ``mc``
    (``_cached_list``; ``mc`` with no room for keys: merged at every call)."""
    S[IV, I_DEMPH] = 0
    r0, r1 = req_off[s], req_off[s + 1]
    if r1 == r0:
        return 0
    lazy = _lazy(mt, lrid, ldots, S)
    g = mt[6][G_OFF] + s
    last = _live(req_ids[r1 - 1], g, j + 1, lazy, lrid, leam, lsq, lrsum, ldots, mt, S)
    if prio and last != S[IV, I_DSRC]:  # the same request's D is current: routed redid it
        _set_dn(last, leam, lrsum, S, F)
    S[IV, I_DSRC] = last
    if S[IV, I_FILLED] == 0:
        return 0
    idx = 0
    for r in range(r0, r1):
        li = _live(req_ids[r], g, j + 1, lazy, lrid, leam, lsq, lrsum, ldots, mt, S)
        if lazy:
            idx = _match_lazy(s, g, li, j, mt, lsq, lrsum, ldots, access, buf, S)
        else:
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
        n = _cached_list(idx, j, chi, lenw, eams, ordr, buf, mc, mcs, S)
        if n >= 0 and fuse and timed:  # queued here: nothing left for the kernel to queue
            _queue_listed(n, S)
            return 0
        if n >= 0:
            return n
        S[B_SKIP, 0] = room
    return _merge_list(idx, j, chi, lenw, ibuf, eams, ordr, buf, S)
