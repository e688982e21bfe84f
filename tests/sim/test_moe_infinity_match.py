"""MoE-Infinity's compiled matcher (``sim/compiled/eamc.py: _match``) picks the slot the
reference's ``EAMC.match`` picks, call for call.

The compiled match ranks slots by suffix sums taken once per step and sums only the slots near
the best exactly; these tests drive both from one EAMC state through whole steps (every
layer's match, the suffix sums reused across a step), with stored EAMs built to tie exactly
(duplicates, scaled copies) or nearly, masked and unmasked, short and deep models (the exact
sum's sequential and eight-accumulator paths).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.moe_infinity import EAMC
from moesim.sim.compiled.eamc import _match
from moesim.sim.compiled.layout import I_FILLED, I_NUME, I_NUML, IV, NUM_IV, NUM_ROWS


def _stored(rng: np.random.Generator, n: int, num_l: int, num_e: int) -> list[np.ndarray]:
    """EAMs to store: random counts, with duplicates, scaled copies (the same unit rows) and
    copies off by one count (near ties) mixed in."""
    out: list[np.ndarray] = []
    for _ in range(n):
        kind = rng.integers(4) if out else 0
        if kind == 0:
            eam = rng.integers(0, 4, (num_l, num_e)).astype(float)
            eam[rng.random(num_l) < 0.2] = 0.0  # some empty rows
        else:
            eam = out[int(rng.integers(len(out)))].copy()
            if kind == 2:
                eam *= float(rng.integers(2, 5))
            elif kind == 3:
                eam[int(rng.integers(num_l)), int(rng.integers(num_e))] += 1.0
        if not eam.any():
            eam[0, 0] = 1.0
        out.append(eam)
    return out


def _run(seed: int, num_l: int, num_e: int, n: int, mask: bool, steps: int) -> None:
    rng = np.random.default_rng(seed)
    eamc = EAMC(n + 2, num_l, num_e, mask_observed=mask)
    for eam in _stored(rng, n, num_l, num_e):
        eamc.add(eam)
    req = eamc.new_request()
    cap = eamc.capacity
    lsq, lrsum = np.zeros((1, num_l)), np.zeros((1, num_l + 1))
    lrsum[0, num_l] = -1.0  # no suffix sums taken yet
    ldots = np.zeros((1, 2 * num_l, cap))
    access = eamc.access.copy()
    buf = np.zeros((10, max(num_e, num_l, cap) + 1))
    S = np.zeros((NUM_ROWS, max(NUM_IV, 8)), np.int64)
    S[IV, I_NUML], S[IV, I_NUME], S[IV, I_FILLED] = num_l, num_e, eamc.filled
    for s in range(steps):
        for j in range(num_l):
            top = int(rng.integers(1, num_e + 1))
            eamc.observe(req, j, np.unique(rng.choice(num_e, size=top)))
            # the kernel's copy of the request (its routed update is checked by the engine
            # equality tests; here only the match is under test)
            lsq[0] = req.sq
            lrsum[0, :num_l] = req.eam.sum(axis=1)
            ldots[0, :num_l, :] = req.dots.T
            want = eamc.match(req, j)
            got = _match(s, 0, j, lsq, lrsum, ldots, access, mask, buf, S)
            assert got == want, (seed, s, j, got, want, eamc.distances(req, j))
            assert np.array_equal(access, eamc.access)  # the match counted its access


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), mask=st.booleans())
def test_match_equals_the_reference(seed: int, mask: bool) -> None:
    rng = np.random.default_rng(seed)
    _run(seed, int(rng.integers(1, 7)), int(rng.integers(2, 9)), int(rng.integers(1, 12)),
         mask, steps=3)


def test_match_deep_model_equals_the_reference() -> None:
    """26 layers (DeepSeek-V2-Lite's count): sums over 8 or more layers."""
    for seed in range(4):
        _run(seed, 26, 16, 40, True, steps=2)
    _run(7, 20, 8, 25, False, steps=2)


def test_match_exact_ties_pick_the_first_slot() -> None:
    """Stored EAMs that are all multiples of one: every distance ties, the first slot wins."""
    num_l, num_e = 10, 6
    eamc = EAMC(8, num_l, num_e)
    base = np.random.default_rng(3).integers(1, 4, (num_l, num_e)).astype(float)
    for k in (3, 1, 2, 1, 4):
        eamc.add(base * k)
    req = eamc.new_request()
    for j in range(num_l):
        eamc.observe(req, j, np.array([0, 2]))
    lsq = req.sq[None, :].copy()
    lrsum = np.append(req.eam.sum(axis=1), -1.0)[None, :]
    ldots = np.zeros((1, 2 * num_l, eamc.capacity))
    ldots[0, :num_l] = req.dots.T
    S = np.zeros((NUM_ROWS, NUM_IV), np.int64)
    S[IV, I_NUML], S[IV, I_NUME], S[IV, I_FILLED] = num_l, num_e, eamc.filled
    buf = np.zeros((10, 16))
    for j in range(num_l):
        d = eamc.distances(req, j)
        assert np.all(d == d[0])
        assert _match(0, 0, j, lsq, lrsum, ldots, np.zeros(8), True, buf, S) == 0
