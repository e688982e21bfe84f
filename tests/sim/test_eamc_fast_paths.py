"""The compiled MoE-Infinity prefetcher's fast paths (``sim/compiled/eamc.py``) give the
reference's floats and lists exactly.

- ``_column_sums`` (the stored unit rows of a layer's experts summed per slot, three rows per
  pass) equals ``EAMC.observe``'s numpy expression bit for bit, for every number of experts;
- ``_suffix_row`` (one row of the lazy match's approximate suffix sums, with its blocks'
  maxima taken over the sums' bit patterns as integers) gives the row's floats and the float
  maxima of every block, ties, zeros and partial blocks included;
- the merged priority list, whose layer heads skip the keys held in the cache, and the
  priority evictor's D, recomputed only when its request's EAM changed, give SimPy's runs on
  small caches, one cache or one partition per layer, with horizons and per-layer widths
  (where most of the list is held and partitions run out of room).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moesim.sim import FixedCompute, FixedLink
from moesim.sim.compiled.eamc import SCAN, _column_sums, _suffix_row
from tests.helpers import random_trace
from tests.sim.test_compiled_engine import equal_on_both_engines


@pytest.mark.parametrize("seed", range(6))
def test_column_sums_are_numpys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_l, num_e, cap = 3, 16, 40
    counts = rng.integers(0, 5, (cap, num_l, num_e)).astype(float)
    norms = np.linalg.norm(counts, axis=2, keepdims=True)
    unit = np.divide(counts, norms, out=np.zeros_like(counts), where=norms > 0)
    unit_t = unit.reshape(cap, num_l * num_e).T.copy()  # the kernel's [L E, slots] layout
    out = np.zeros(cap + 1)
    for m in range(1, num_e + 1):
        for layer in range(num_l):
            experts = np.sort(rng.choice(num_e, size=m, replace=False))
            n = int(rng.integers(2, cap + 1))
            want = unit[:n, layer][:, experts].sum(axis=1)  # EAMC.observe's sum
            _column_sums(unit_t, layer * num_e, experts.astype(np.int64), m, n, out)
            assert out[:n].tobytes() == want.tobytes(), (m, n)


@pytest.mark.parametrize("seed", range(6))
def test_suffix_row_sums_and_block_maxima(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cap = 5 * SCAN + 7
    for n in (1, SCAN - 1, SCAN, SCAN + 1, 3 * SCAN, cap):
        after = rng.random(cap) * 10
        after[rng.random(cap) < 0.3] = 0.0  # zero sums and exact ties
        ip = rng.integers(0, 4, cap).astype(np.int64)
        iv = rng.choice([0.0, 0.5, 0.25, 1 / 3], cap)
        w = float(rng.choice([0.0, 0.7, 1.0]))
        out = np.full(cap, -1.0)
        bm = np.full((cap + SCAN - 1) // SCAN + 1, -1.0)
        _suffix_row(out, after, ip, iv, w, n, bm)
        want = after[:n] + ip[:n] * (iv[:n] * w)
        assert out[:n].tobytes() == want.tobytes()
        assert (out[n:] == -1.0).all()
        blocks = [want[c:c + SCAN].max() for c in range(0, n, SCAN)]
        assert bm[1:len(blocks) + 1].tolist() == blocks
        assert bm[0] == want.max()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("partition", ["global", "per_layer"])
def test_merged_list_on_small_caches(seed: int, partition: str) -> None:
    trace = random_trace(num_requests=5, tokens=10, layers=5, experts=8, top_k=2, seed=seed,
                         prefill_tokens=0)
    for mode in ("timed", "zero_latency"):
        for batch in (1, 2):
            for extra in ({}, {"horizon": 1}, {"prefetch_width": 3}):
                for eviction in ("moe_infinity_lfu", "moe_infinity_priority"):
                    policy = {"name": "moe_infinity", "eviction": eviction, **extra}
                    kw: dict[str, Any] = dict(
                        capacity=(15 if partition == "per_layer" else 6) + 2 * seed,
                        partition=partition, mode=mode, batch=batch,
                        link=FixedLink(1e-4, 1e9, 1 + seed % 2),
                        compute=FixedCompute(attention_s=1e-4, expert_s=3e-4))
                    equal_on_both_engines(trace, policy, kw)
