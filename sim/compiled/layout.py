"""The compiled engine's state layout: kernel codes, the rows of ``S`` and ``F``, decorators.

All state lives in two 2-D arrays, one row per field: ``S`` (int64: scalars and counters,
per-partition fields, per-key fields, buffers such as the eviction heaps, the running copies
and the prefetch queue) and ``F`` (float64). Every array passed to a helper costs two atomic
reference-count updates per call: a first version that passed a dozen arrays per call was
30x slower, so the per-access helpers take ``S`` and ``F`` (and Belady's next-use array) only.
"""

from __future__ import annotations

import numba
import numpy as np

# Eviction kernels (sim.compiled.EVICTION maps classes to these).
EV_LRU, EV_FIFO, EV_STATIC, EV_STALE, EV_LFU, EV_BELADY, EV_ARC = 0, 1, 2, 3, 4, 5, 6
# moe_infinity_lfu without its prefetcher (no candidates): the fewest (order=min) or most
# (order=max) in-cache visits, ties by earliest insertion (policies/moe_infinity.py)
EV_VISITS_MIN, EV_VISITS_MAX = 7, 8
# moe_infinity_lfu beside the moe_infinity prefetcher (candidate protection: one heap per
# layer, so the candidates' layers are skipped whole), and moe_infinity_priority (T * D * F;
# one heap per layer by visits, then key: a layer's least visited key scores least there
# while D is the same for every key)
EV_MI_MIN, EV_MI_MAX, EV_MI_PRIO = 9, 10, 11
# Prefetch kernels.
PF_NONE, PF_ORACLE, PF_NEXT_ALL, PF_PRED, PF_BEYOND, PF_MOE_INF = 0, 1, 2, 3, 4, 5
PT_PRE, PT_ROUTED, PT_ISSUED = 0, 1, 2
ABSENT, LOADING, RESIDENT = 0, 1, 2
COUNTED, WARMUP = 1, 2
HIT, LATE, PROMOTED, MISS = 0, 1, 2, 3
NO_USE = 1 << 62
INF = np.inf

# Rows of S (one int64 array: scalars, per partition, per key, buffers). Per key:
K_STATE, K_MARK, K_PIN, K_PRV, K_NXT, _K_FREE, K_HPOS, K_S1, K_S2, K_HOT = range(7, 17)
K_QSEQ, K_INFL, K_PART, K_CURSOR = range(17, 21)
# Per partition (per heap for P_HOFF / P_HSIZE: a partition, or a layer for EV_MI_*):
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
# MoE-Infinity: candidate stamp per key (prefetch_width > 0), held non-candidates and visit
# sum per partition, keys holding a slot per layer, the heap a key lives in.
K_CAND, P_NC, P_CSUM, L_HELD, K_HEAP = 51, 52, 53, 54, 55
# moe_infinity_lfu's layer heaps (EV_MI_MIN / EV_MI_MAX): each heap's top as one int64,
# ``(S1 + TOP_OFF) << TOP_SHIFT | S2`` (TOP_NONE when empty), so that the least top of a range
# of layers is a scan of one contiguous row (sim.compiled.evict._mi_best)
L_TOPV = 56
NUM_ROWS = 57
TOP_SHIFT = 40
TOP_OFF = 1 << 21
TOP_NONE = (1 << 63) - 1
IV = 0  # row of S holding the int scalars
F_FIN, F_RFIN, F_RSTART, F_FREE, F_ARCP = range(5)
FV = 5  # row of F holding the float scalars
F_DN, F_TN = 6, 7  # moe_infinity_priority: D (normalised) per key, T per layer
F_TTAB = 8  # moe_infinity_priority: T per layer for every current layer (L x L, then 1.0)
NUM_FROWS = 9
# Columns of row IV of S (int scalars and counters). I_PF_HOST: prefetch copies started
# whose ``copy.host_s`` is not charged yet (``HostLink.uncharged_prefetches``; the kernel takes
# and zeroes it at each routing; in S, so it travels between streamed chunks).
I_PSTAMP, I_PF_HOST, I_SEQ, I_LSEQ, I_NQ, I_QHEAD, I_QTAIL, I_RSIZE, I_COUNTING = range(9)
I_DEMAND, I_ISSUED, I_PF_STARTED, I_PF_DROPPED, I_SERVED, I_USEFUL = range(9, 15)
I_WASTED, I_EVICTIONS, I_L_DEMAND, I_L_PREFETCH, I_L_DROPPED, I_ERROR, I_UNUSED = range(15, 22)
I_ENGINES, I_QCAP, I_TSTAMP = 22, 23, 24
# MoE-Infinity: the layer being computed, the demand phase (routed .. demand issued), the
# candidate set (layers CLO..CHI, top CWIDTH per layer if > 0, stamp), the shape, the EAMC.
I_LAYER, I_DEMPH, I_HASCAND, I_CLO, I_CHI, I_CWIDTH, I_CSTAMP = range(25, 32)
I_NUME, I_NUML, I_NUMP, I_CANCELLED, I_FILLED, I_PERSIST, I_DSRC, I_EAMCAP = range(32, 40)
# moe_infinity_priority: D is the same for every key (no moe_infinity prefetcher); the layer
# whose T is in F[F_TN] (-1: none yet).
I_DUNI, I_TCUR = 40, 41
# Copy rules (sim.link.CopyRules): copies back of evicted experts counted; the swap mode
# (0: no swap, 1: swap on its own stream, 2: swap before the load on the compute stream;
# 3, 4: the same with ``swap: always``, every load copying one back).
I_SWAPS, I_SWAPMODE = 42, 43
# The prefetch queue's base: a key is queued while its K_QSEQ is above it (emptying the queue
# raises it to the last sequence number issued instead of visiting every entry).
I_QBASE = 44
# 1 while L_TOPV holds every layer heap's top (a moe_infinity_lfu run whose visit counts and
# insertion numbers fit the packing; else 0: the plain scan)
I_TOPOK = 45
NUM_IV = 46
# Columns of row FV of F.
V_LT, V_BUSY, V_STALL_MISS, V_STALL_LATE, V_TIME, V_NOW, V_CLIP = range(7)
# The link time at the GPU's last step boundary (compute stream: wall time less kernel time),
# one swap's seconds, and the counted swaps' seconds.
V_TAU, V_SWAP_D, V_SWAP_T = 7, 8, 9
NUM_FV = 10

jit = numba.njit(cache=True, nogil=True)
# Helpers allocate nothing: compiled without NRT, a call passes arrays without the atomic
# reference-count updates that otherwise cost more than the work of a cache operation.
fn = numba.njit(cache=True, nogil=True, _nrt=False)


def typed(sig: str):
    """``fn`` with fixed argument types (``S``: ``i8[:, ::1]``, ``F``: ``f8[:, ::1]``, Belady's
    next-use array ``i8[::1]``): a literal argument (``True``, ``0``, a row constant) would
    otherwise compile one more copy of the helper and of everything it calls (cold compile
    time grew 3.5x before the big helpers were typed)."""
    return numba.njit(sig, cache=True, nogil=True, _nrt=False)


SF = "i8[:, ::1], f8[:, ::1]"  # S, F
SFN = "i8[:, ::1], f8[:, ::1], i8[::1]"  # S, F, nocc
