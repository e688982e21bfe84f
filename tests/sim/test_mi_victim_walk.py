"""MoE-Infinity's victim searches over per-layer heaps (``sim/compiled/evict.py``) give the victim
of a plain scan over every held key, ties included.

``_prio_layers`` (``moe_infinity_priority``, D the same for every key) walks the layers in order
of T and passes a layer whose heap top has more visits than the best found once one more visit
scores strictly above it; ``_mi_best`` (``moe_infinity_lfu``) passes a heap whose top is no
smaller than the best so far. Both are checked here against linear scans on random caches drawn
to tie (few distinct visit counts, equal T for the current and earlier layers), with pinned,
loading and candidate keys that may not be chosen.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.sim.compiled.evict import _heap_best, _less, _mi_best, _prio_layers, _prio_scan, _prio_t
from moesim.sim.compiled.heaps import _hpush
from moesim.sim.compiled.layout import (
    B_HKEY,
    EV_MI_MIN,
    F_DN,
    F_TN,
    I_CHI,
    I_CLO,
    I_CSTAMP,
    I_CWIDTH,
    I_HASCAND,
    I_LAYER,
    I_NUME,
    I_NUML,
    I_NUMP,
    I_PSTAMP,
    I_TCUR,
    IV,
    K_CAND,
    K_HPOS,
    K_PIN,
    K_S1,
    K_S2,
    K_STATE,
    LOADING,
    NUM_FROWS,
    NUM_IV,
    NUM_ROWS,
    P_CSUM,
    P_HOFF,
    P_HSIZE,
    RESIDENT,
)


@settings(max_examples=40, deadline=None)
@given(num_l=st.integers(1, 40), num_e=st.integers(1, 70), narrow=st.booleans())
def test_priority_t_equals_the_reference(num_l: int, num_e: int, narrow: bool) -> None:
    """T per layer, from the table of every current layer (or computed when the table does
    not fit in a row), is the float ``MoEInfinityPriority._scores`` computes, layer after
    layer and back to layer 0."""
    S = np.zeros((NUM_ROWS, NUM_IV + 1), np.int64)
    width = num_l if narrow else num_l * num_l + 1
    F = np.zeros((NUM_FROWS, width))
    S[IV, I_NUML], S[IV, I_NUME], S[IV, I_TCUR] = num_l, num_e, -1
    for cur in [*range(num_l), 0]:
        S[IV, I_LAYER] = cur
        _prio_t(S, F)
        t = np.arange(num_l, dtype=float) / (num_l + 1)
        t[: cur + 1] = 1.0
        t = t / (t.sum() * num_e) + 1e-6
        assert np.array_equal(F[F_TN, :num_l], t), (cur, F[F_TN, :num_l] - t)


def _cache(seed: int, prio: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A random cache of one partition with one heap per layer: held keys with visit counts
    from a small range (ties), some pinned or loading; returns S, F and the held keys."""
    rng = np.random.default_rng(seed)
    num_l, num_e = int(rng.integers(1, 9)), int(rng.integers(1, 7))
    num_k = num_l * num_e
    S = np.zeros((NUM_ROWS, max(NUM_IV, 2 * num_k + 1)), np.int64)
    F = np.zeros((NUM_FROWS, max(num_k + 1, 16)))
    S[IV, I_NUML], S[IV, I_NUME], S[IV, I_NUMP] = num_l, num_e, 1
    S[IV, I_PSTAMP] = 5
    S[IV, I_LAYER] = int(rng.integers(num_l))
    S[IV, I_TCUR] = -1
    S[K_HPOS, :num_k] = -1
    for j in range(num_l):
        S[P_HOFF, j] = j * num_e
    top = int(rng.integers(1, 4))  # visit counts 1..top: many ties
    held = [k for k in range(num_k) if rng.random() < 0.7]
    seq = 0
    for k in held:
        seq += 1
        S[K_STATE, k] = LOADING if rng.random() < 0.1 else RESIDENT
        S[K_S1, k] = int(rng.integers(1, top + 1)) * (1 if prio else -1 if rng.random() < 0.5
                                                    else 1)
        S[K_S2, k] = k if prio else int(rng.permutation(10 * num_k)[0]) * num_k + k
        if rng.random() < 0.15:
            S[K_PIN, k] = S[IV, I_PSTAMP]  # pinned: held out of its heap, as the kernel does
            continue
        _hpush(k // num_e, k, S)
    if prio:
        S[P_CSUM, 0] = int(sum(S[K_S1, k] for k in held))
        F[F_DN, :num_k] = 1.0 / num_k + 1e-6
        _prio_t(S, F)
    elif rng.random() < 0.5:  # a candidate set: layers CLO..CHI, some keys of them
        S[IV, I_HASCAND] = 1
        S[IV, I_CLO] = int(rng.integers(num_l))
        S[IV, I_CHI] = int(rng.integers(S[IV, I_CLO], num_l))
        S[IV, I_CWIDTH] = int(rng.integers(0, num_e + 1))
        S[IV, I_CSTAMP] = 3
        for k in held:
            if rng.random() < 0.5:
                S[K_CAND, k] = 3
    return S, F, held


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_priority_walk_equals_a_scan_of_every_key(seed: int) -> None:
    S, F, _ = _cache(seed, prio=True)
    num_l = int(S[IV, I_NUML])
    if S[P_CSUM, 0] == 0:
        return
    want, _ = _prio_scan(0, 0, num_l - 1, False, S, F)
    got = _prio_layers(0, False, S, F)
    assert got == want


def _scan_lfu(skip_cand: bool, S: np.ndarray) -> int:
    """The least (visits, insertion) evictable key over every layer's heap, one by one."""
    best = -1
    for j in range(int(S[IV, I_NUML])):
        v = _heap_best(j, skip_cand, S)
        if v >= 0 and (best < 0 or _less(v, best, S)):
            best = v
    return best


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31), skip_cand=st.booleans())
def test_lfu_heaps_walk_equals_a_scan(seed: int, skip_cand: bool) -> None:
    S, F, _ = _cache(seed, prio=False)
    want = _scan_lfu(skip_cand, S)
    heaps = S[B_HKEY].copy()
    got = _mi_best(EV_MI_MIN, 0, skip_cand, S, F)
    assert got == want
    assert np.array_equal(np.sort(S[B_HKEY]), np.sort(heaps))  # entries set aside come back
    for j in range(int(S[IV, I_NUML])):
        assert S[P_HSIZE, j] >= 0
