"""The compiled MoE-Infinity prefetcher's list and queue shortcuts (``sim/compiled/eamc.py``,
``sim/compiled/link.py``) list, queue and drop what the plain code does.

- the list walked from the matched slot's whole list kept per layer (``_cached_list``: built
  lazily, kept while the same slot is matched, extended on demand) equals the merge of the
  layers' heads that skip held keys (``_merge_list``) on random EAMs (ties included), cache
  states, rooms, horizons and widths, for fresh, kept and extended lists;
- the MoE-Infinity runs of the engine-equality draws where prefetches are dropped (every
  later queued one is then dropped at once, ``link._drop_queued``) and many are queued and
  cancelled equal SimPy's; the draws do drop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.compiled.eamc import MC_HEADS, _cached_list, _merge_list, sort_all
from moesim.sim.compiled.layout import (
    ABSENT,
    B_PKEYS,
    B_SKIP,
    I_NUME,
    I_NUML,
    I_NUMP,
    IV,
    K_PART,
    K_STATE,
    LOADING,
    NUM_ROWS,
    RESIDENT,
)
from tests.helpers import random_trace
from tests.sim.test_compiled_engine import equal_on_both_engines


def _state(rng: np.random.Generator, num_l: int, num_e: int, held: float) -> np.ndarray:
    num_k = num_l * num_e
    S = np.zeros((NUM_ROWS, max(4 * num_k + 16, 64)), np.int64)
    S[IV, I_NUME], S[IV, I_NUML], S[IV, I_NUMP] = num_e, num_l, 1
    S[K_PART, :num_k] = 0
    u = rng.random(num_k)
    S[K_STATE, :num_k] = np.where(u < held / 2, RESIDENT,
                                  np.where(u < held, LOADING, ABSENT))
    return S


def _kept(num_l: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A fresh ``mc`` of ``width`` columns and its head scores (``_cached_list``'s ``mcs``),
    as the kernel keeps them."""
    return np.full((num_l, width), -1, np.int64), np.zeros((num_l, num_l))


def _lists(S: np.ndarray, idx: int, j: int, chi: int, lenw: int, room: int,
           eams: np.ndarray, ordr: np.ndarray, kept: tuple[np.ndarray, np.ndarray],
           held_bound: int) -> None:
    """Both lists from the same state, and the list by a plain sort."""
    num_l = int(S[IV, I_NUML])
    buf = np.zeros((10, 2 * num_l + 8))
    ibuf = np.zeros(num_l + 1, np.int64)
    S[B_SKIP, 0] = room
    n_ref = _merge_list(idx, j, chi, lenw, ibuf, eams, ordr, buf, S)
    want = S[B_PKEYS, :n_ref].copy()
    S[B_SKIP, 0] = room
    mc, mcs = kept
    n = _cached_list(idx, j, chi, lenw, eams, ordr, buf, mc, mcs, S)
    if mc.shape[1] - MC_HEADS - num_l >= room + held_bound:  # wide enough: never -1
        assert n >= 0
    if n >= 0:
        assert n == n_ref
        assert np.array_equal(S[B_PKEYS, :n], want)
    # the list is the absent keys of layers j..chi (top lenw each) by score, the lower layer
    # first on ties, then by the layer's order (count descending, lower expert first)
    num_e = int(S[IV, I_NUME])
    rows = []
    for i in range(j, chi + 1):
        decay = 1.0 - (i - j) / (num_l + 1)
        for q in range(lenw):
            k = i * num_e + int(ordr[idx, i * num_e + q])
            if S[K_STATE, k] == ABSENT:
                rows.append((-((eams[idx, k] + 1e-8) * decay), i, q, k))
    assert want.tolist() == [k for *_, k in sorted(rows)][:room]


@pytest.mark.parametrize("seed", range(40))
def test_cached_list_equals_the_merge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_l = int(rng.integers(1, 9))
    num_e = int(rng.integers(1, 12))
    slots = 4
    # small counts: many ties within and across layers (scores tie across layers too)
    eams = rng.integers(0, 4, (slots, num_l * num_e)).astype(float)
    ordr = np.zeros((slots, num_l * num_e), np.int64)
    sort_all(eams, ordr, slots, num_l, num_e)
    cap = int(rng.integers(1, num_l * num_e + 1))
    width = num_l + min(cap + num_e, num_l * num_e)
    mc = _kept(num_l, MC_HEADS + width)
    narrow = _kept(num_l, MC_HEADS + num_l + 1)
    for _ in range(30):
        S = _state(rng, num_l, num_e, float(rng.random()))
        j = int(rng.integers(0, num_l))
        horizon = int(rng.integers(-1, num_l))
        chi = num_l - 1 if horizon < 0 else min(num_l - 1, j + horizon)
        lenw = num_e if rng.random() < 0.6 else int(rng.integers(1, num_e + 1))
        idx = int(rng.integers(0, slots))
        held = int((S[K_STATE, :num_l * num_e] != ABSENT).sum())
        room = int(rng.integers(1, cap + num_e + 1))
        if rng.random() < 0.2:
            room = num_l * num_e  # longer than the list
        # mc is kept across the draws of the whole list (horizon and width are a run's
        # constants): same slot and layer (kept, extended) or not (begun afresh)
        if lenw != num_e or horizon >= 0:
            fresh = _kept(num_l, MC_HEADS + width)
            _lists(S, idx, j, chi, lenw, room, eams, ordr, fresh, held)
        else:
            if rng.random() < 0.3:
                mc[0][:, 0] = -1
            _lists(S, idx, j, chi, lenw, room, eams, ordr, mc, held)
        narrow[0][:, 0] = -1
        _lists(S, idx, j, chi, lenw, room, eams, ordr, narrow, held)


def test_a_kept_list_follows_the_cache() -> None:
    """The same slot matched again at the same layer with other keys held: the kept list is
    walked again (and extended), not the previous walk's keys."""
    rng = np.random.default_rng(7)
    num_l, num_e = 4, 8
    eams = rng.integers(0, 6, (2, num_l * num_e)).astype(float)
    ordr = np.zeros((2, num_l * num_e), np.int64)
    sort_all(eams, ordr, 2, num_l, num_e)
    mc, mcs = _kept(num_l, MC_HEADS + num_l + num_l * num_e)
    for held, room in ((0.0, 3), (0.5, 9), (0.9, 20), (0.0, 32), (0.3, 5)):
        S = _state(rng, num_l, num_e, held)
        _lists(S, 1, 1, num_l - 1, num_e, room, eams, ordr, (mc, mcs), num_l * num_e)
    assert mc[1, 0] == 1 and mc[1, 1] == (num_l - 1) * num_e  # kept, extended to the end


@pytest.mark.parametrize("seed", range(6))
def test_dropped_prefetches_equal_simpy(seed: int) -> None:
    """Small global caches with MoE-Infinity's evictors: prefetches are dropped (only
    candidates left to evict) and cancelled; every metric equals SimPy's."""
    trace = random_trace(num_requests=6, tokens=12, layers=6, experts=8, top_k=2, seed=seed,
                         prefill_tokens=0)
    dropped = 0
    for eviction in ("moe_infinity_lfu", "moe_infinity_priority"):
        for batch in (1, 2):
            kw: dict[str, Any] = dict(
                capacity=8 + 2 * seed, mode="timed", batch=batch,
                link=FixedLink(1e-4, 1e9, 1 + seed % 2),
                compute=FixedCompute(attention_s=2e-4, expert_s=3e-4))
            policy = {"name": "moe_infinity", "eviction": eviction}
            ref = equal_on_both_engines(trace, policy, kw)
            assert ref is not None
            dropped += ref.summary["prefetch_dropped"]
            res = simulate(trace, policy, engine="compiled", **kw)
            assert res.summary["prefetch_cancelled"] == ref.summary["prefetch_cancelled"]
    assert dropped > 0
