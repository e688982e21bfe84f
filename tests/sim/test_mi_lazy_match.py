"""MoE-Infinity's lazy compiled match (``sim/compiled/eamc.py: _match_lazy``) picks the slot
the reference's ``EAMC.match`` picks, every time.

The lazy match ranks slots by integer dot products and brings the float dot products of the
few slots near the best up to date from a ring of the last steps' routed experts; a request
running longer than the ring has all of them brought up to date once per ring. These tests
compare the EAMC's access counts (every match adds one to the slot it picked) after whole
runs on both engines, with a ring of a few steps (flushes every few steps), with duplicated
requests (exact ties: the first slot must win) and with batches (slots rewritten while
requests run: their dot products are recomputed), besides the runs' metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import moesim.sim.compiled as compiled
from moesim.policies.moe_infinity import EAMC
from moesim.sim import FixedCompute, FixedLink
from moesim.sim.compiled.eamc import G_LAZY
from tests.helpers import random_trace
from tests.sim.test_compiled_engine import equal_on_both_engines


def _both(monkeypatch: pytest.MonkeyPatch, trace: Any, policy: dict[str, Any],
          kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run both engines; the SimPy EAMC's access counts, the compiled one's, its tables."""
    seen: list[EAMC] = []
    orig_match = EAMC.match

    def match(self: EAMC, req: Any, layer: int) -> int:
        seen.append(self)
        return orig_match(self, req, layer)

    got: list[tuple[Any, ...]] = []
    orig_arrays = compiled.mi_arrays

    def arrays(sim: Any) -> tuple[Any, ...]:
        out = orig_arrays(sim)
        if sim is not None:
            got.append(out)
        return out

    monkeypatch.setattr(EAMC, "match", match)
    monkeypatch.setattr(compiled, "mi_arrays", arrays)
    assert equal_on_both_engines(trace, policy, kw) is not None
    assert seen, "the reference never matched"
    ref = seen[-1].access
    assert ref.sum() > np.count_nonzero(ref)  # matches counted besides the first accesses
    mi = got[-1]
    return ref, mi[2], mi[1]


def _kw(mode: str, batch: int, capacity: int) -> dict[str, Any]:
    return dict(capacity=capacity, mode=mode, batch=batch, link=FixedLink(1e-4, 1e9, 1),
                compute=FixedCompute(attention_s=1e-4, expert_s=3e-4))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch", [1, 3])
def test_short_ring_flushes_give_the_same_matches(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                  batch: int) -> None:
    """A ring of 3 steps: every request longer than that is flushed every 3 steps."""
    trace = random_trace(num_requests=7, tokens=12, layers=4, experts=8, top_k=2, seed=seed)
    num_k = 4 * 8
    monkeypatch.setattr(compiled, "RING_BYTES", 2 * (num_k + 4) * 3)
    for mode in ("zero_latency", "timed"):
        for cap in (2, 50):  # slots rewritten while requests run, or never
            policy = {"name": "moe_infinity", "eamc_capacity": cap}
            ref, acc, mt = _both(monkeypatch, trace, policy, _kw(mode, batch, 10))
            assert mt[4].shape[0] == 3 and mt[6][G_LAZY] == 1  # the lazy match ran
            assert np.array_equal(ref, acc[: ref.shape[0]]), (mode, cap, ref, acc)


@pytest.mark.parametrize("seed", range(3))
def test_duplicated_requests_tie_and_the_first_slot_wins(monkeypatch: pytest.MonkeyPatch,
                                                         seed: int) -> None:
    """Few experts and layers: many stored EAMs are identical (exact ties at every layer)."""
    trace = random_trace(num_requests=12, tokens=3, layers=3, experts=4, top_k=2, seed=seed)
    for batch in (1, 2):
        ref, acc, _ = _both(monkeypatch, trace, {"name": "moe_infinity"},
                            _kw("zero_latency", batch, 8))
        assert np.array_equal(ref, acc[: ref.shape[0]]), (batch, ref, acc)


def test_long_requests_and_many_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deeper model, more requests than the ring's steps, both evictions."""
    trace = random_trace(num_requests=25, tokens=15, layers=10, experts=16, top_k=4, seed=5)
    monkeypatch.setattr(compiled, "RING_BYTES", 2 * (160 + 10) * 5)
    for eviction in ("moe_infinity_lfu", "moe_infinity_priority"):
        policy = {"name": "moe_infinity", "eviction": eviction}
        ref, acc, _ = _both(monkeypatch, trace, policy, _kw("timed", 1, 30))
        assert np.array_equal(ref, acc[: ref.shape[0]])


def test_eager_masked_fallback_gives_the_same_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without per-request lazy tables for every live request (a streamed run that re-sizes
    its live buffers) the masked match runs eagerly, on the same matcher tables."""
    orig = compiled.mi_arrays

    def eager(sim: Any) -> tuple[Any, ...]:
        out = orig(sim)
        if sim is None:
            return out
        mt = list(out[1])
        mt[7] = mt[7][:0]  # sized for no live request: _lazy is false
        return (out[0], tuple(mt), *out[2:])

    monkeypatch.setattr(compiled, "mi_arrays", eager)
    trace = random_trace(num_requests=8, tokens=8, layers=4, experts=8, top_k=2, seed=11)
    for batch in (1, 2):
        for cap in (3, 50):
            policy = {"name": "moe_infinity", "eamc_capacity": cap}
            ref, acc, mt = _both(monkeypatch, trace, policy, _kw("timed", batch, 12))
            assert mt[7].shape[0] == 0
            assert np.array_equal(ref, acc[: ref.shape[0]]), (batch, cap)
