"""The stand-alone model of the engine's cache rules (traces.residency.engine_rule_lru) on
hand-made access sequences whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np

from moesim.traces.residency import Access, engine_rule_lru


def _acc(cells: list[tuple[int, int, list[int]]]) -> Access:
    """(unit, layer, experts in batch order) per cell; unit 0 is the prefill step."""
    unit, layer, expert = [], [], []
    for u, j, ids in cells:
        unit += [u] * len(ids)
        layer += [j] * len(ids)
        expert += ids
    n = len(expert)
    return Access(np.array(unit), np.array(layer), np.array(expert), np.array(unit) == 0,
                  np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int32))


def test_a_byte_budget_holds_what_slots_of_the_mean_size_do_not() -> None:
    # layer 0 experts are 10 B, layer 1's 30 B; budget 50 B. Bytes: 10 + 10 + 30 = 50 fit, so
    # layer 0's expert 1 is still there at the end. Slots of the mean size (20 B): the third
    # insert makes 60 > 50 and evicts the least recent, layer 0's expert 1.
    acc = _acc([(1, 0, [1]), (2, 0, [2]), (3, 1, [1]), (4, 0, [1])])
    assert engine_rule_lru(acc, [10, 30], 50, unit="bytes").tolist() == [0, 0, 0, 1]
    assert engine_rule_lru(acc, [10, 30], 50, unit="slots").tolist() == [0, 0, 0, 0]


def test_batched_prefill_promotes_by_last_use_and_never_evicts_the_batch() -> None:
    # prefill, layer 0, tokens (1, 2) and (1, 3): a repeat inside the batch is a hit, and the
    # batch may overflow the budget (30 B for three 10 B experts is fine, 20 B is not trimmed
    # below the batch). Last-use order leaves 2 as the coldest, first-use order 1. Decode: 4
    # overflows a 30 B budget by one expert; the engine's order evicts 2, moesim's 1, so the
    # next use of 1 hits only under last-use order.
    acc = _acc([(0, 0, [1, 2, 1, 3]), (1, 0, [4]), (2, 0, [1])])
    last = engine_rule_lru(acc, [10], 30, unit="bytes", order="last_use")
    first = engine_rule_lru(acc, [10], 30, unit="bytes", order="first_use")
    assert last.tolist() == [0, 0, 1, 0, 0, 1]
    assert first.tolist() == [0, 0, 1, 0, 0, 0]
    tight = engine_rule_lru(acc, [10], 20, unit="bytes", order="last_use")
    assert tight.tolist() == [0, 0, 1, 0, 0, 0]  # the batch stayed; then 2, 1 evicted for 4
