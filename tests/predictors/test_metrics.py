"""Expert-prediction metrics: hand-checked cases and properties (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.predictors.metrics import MetricSpec, bit_scores, evaluate, format_table, multi_hot

SPEC = MetricSpec(num_experts=8, top_k=2, overprov=(3,))


def _all(rows):
    return next(r for r in rows if r["layer"] == "all")


def test_hand_checked_rows():
    true = np.array([[0, 1], [2, 3]])
    ranked = np.array([[1, 0, 5, 6], [2, 4, 3, 7]])  # row 0 exact; row 1 has 2 in top-2, 3 at #3
    out = _all(evaluate(ranked, true, np.zeros(2, dtype=int), SPEC))
    assert out["exact_match"] == 0.5
    assert out["recall@2"] == pytest.approx(0.75)
    assert out["precision@2"] == pytest.approx(0.75)
    assert out["overprov_acc@3"] == 1.0
    assert out["recall@3"] == 1.0
    assert out["precision@3"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert out["top1_acc"] == 1.0  # both first choices are true experts
    assert out["top3_acc"] == 1.0
    # bits: row 0 all right; row 1 predicts {2, 4} vs {2, 3}: 2 wrong bits of 16
    assert out["bit_acc"] == pytest.approx(14 / 16)
    assert out["zero_bit_acc"] == pytest.approx(1 - 2 / 8)
    # macro-F1 by hand: ones tp=3 fp=1 fn=1 -> 6/8; zeros tp=11 fp=1 fn=1 -> 22/24
    assert out["macro_f1"] == pytest.approx((6 / 8 + 22 / 24) / 2)
    # all-zero predictor: F1(ones) = 0, F1(zeros) = 2*12/(2*12+4)
    assert out["zero_macro_f1"] == pytest.approx((0 + 24 / 28) / 2)


def test_per_layer_rows_and_names():
    true = np.array([[0, 1], [2, 3], [4, 5]])
    ranked = np.array([[0, 1], [3, 2], [6, 7]])
    rows = evaluate(ranked, true, np.array([0, 0, 1]), SPEC, layer_ids=(3, 7))
    assert [r["layer"] for r in rows] == ["3", "7", "all"]
    assert rows[0]["exact_match"] == 1.0 and rows[1]["exact_match"] == 0.0
    assert "exact_match" in format_table(rows)


def test_missing_predictions_count_as_misses():
    true = np.array([[0, 1]])
    out = _all(evaluate(np.array([[0, -1, -1]]), true, np.zeros(1, dtype=int), SPEC))
    assert out["recall@2"] == 0.5 and out["exact_match"] == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="align"):
        evaluate(np.zeros((2, 2)), np.zeros((3, 2)), np.zeros(2), SPEC)
    with pytest.raises(ValueError, match="top_k"):
        evaluate(np.zeros((2, 1)), np.zeros((2, 2)), np.zeros(2), SPEC)


@st.composite
def _cases(draw):
    e = draw(st.integers(2, 12))
    k = draw(st.integers(1, e))
    n = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    true = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    ranked = np.stack([rng.permutation(e) for _ in range(n)])
    return e, k, true, ranked


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_properties(case):
    e, k, true, ranked = case
    spec = MetricSpec(e, k, overprov=(3, 5, 10, e))
    out = _all(evaluate(ranked, true, np.zeros(len(true), dtype=int), spec))
    assert out["exact_match"] <= out[f"recall@{k}"] + 1e-12
    assert out[f"overprov_acc@{e}"] == 1.0  # the full ranking holds every true expert
    for n in (3, 5, 10):
        if min(n, e) >= k:  # top-n accuracy is recall@n once n >= k
            assert out[f"top{n}_acc"] == pytest.approx(out[f"recall@{min(n, e)}"])
    perfect = _all(evaluate(np.concatenate([true, ranked], axis=1), true,
                            np.zeros(len(true), dtype=int), spec))
    assert perfect["exact_match"] == 1.0 and perfect["bit_acc"] == 1.0
    assert perfect["top1_acc"] == 1.0 and perfect["macro_f1"] == pytest.approx(
        1.0 if k < e else 0.5)
    assert out["zero_bit_acc"] == pytest.approx(1 - k / e)


def test_bit_scores_degenerate():
    hot = multi_hot(np.array([[0, 1]]), 4)
    assert bit_scores(hot, hot) == (1.0, 1.0)
    assert np.isnan(bit_scores(hot[:0], hot[:0])[0])
