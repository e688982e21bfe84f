"""Expert-prediction accuracy metrics (numpy only, so baselines and reports need no torch).

Every metric compares, for each (token, layer) row, the router's true top-k set ``T`` (``k``
ids) with a predictor's *ranking* ``P`` (ids in descending confidence; ``P_n`` = its first n
entries, ``-1`` = no entry). Definitions (means over rows, per layer and overall):

- ``exact_match``: ``set(P_k) == T``; the set accuracy the pre-attention paper reports.
- ``overprov_acc@n``: ``T ⊆ P_n`` (all true experts inside an over-provisioned top-n, n >= k).
- ``recall@n`` = ``|T ∩ P_n| / k``; ``precision@n`` = ``|T ∩ P_n| / n``.
- ``top{n}_acc`` (the inter-layer speculation paper's top-1/3/5/10 accuracy):
  ``|T ∩ P_n| / min(n, k)``, the fraction of the true experts that *could* be in the predicted
  top-n which are; top-1 = "the predictor's first choice is one of the true experts", and for
  n >= k it equals ``recall@n``. n is clamped to the number of experts E.
- ``bit_acc`` and ``macro_f1`` (MoE-Beyond's "accuracy" and F1): the predicted top-k and the
  true top-k as E-bit multi-hot vectors, flattened over all rows; ``bit_acc`` = fraction of
  equal bits (sklearn ``accuracy_score`` on the flattened bits) and ``macro_f1`` = mean of the
  F1 of the 1-bits and of the 0-bits (sklearn ``f1_score(average="macro")``, 0 when a class
  has no true and no predicted member). Most bits are 0, so these are always reported beside
  ``zero_bit_acc`` / ``zero_macro_f1``: the score of a predictor that predicts *nothing*
  (``1 - k/E`` bit accuracy). They are not set accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOP_N = (1, 3, 5, 10)


@dataclass(frozen=True)
class MetricSpec:
    """Which cut-offs to report: ``overprov`` widths n for over-provisioning/recall/precision."""

    num_experts: int
    top_k: int
    overprov: tuple[int, ...] = ()
    top_n: tuple[int, ...] = TOP_N

    def widths(self) -> tuple[int, ...]:
        """Over-provisioning widths actually used: k, 2k and the requested ones, within E."""
        ws = {self.top_k, min(2 * self.top_k, self.num_experts), *self.overprov}
        return tuple(sorted(w for w in ws if self.top_k <= w <= self.num_experts))


def multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[N, w]`` ids (-1 = none) -> ``bool [N, E]``."""
    ids = np.asarray(ids)
    out = np.zeros((ids.shape[0], num_experts + 1), dtype=bool)
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    cols = np.where(ids >= 0, ids, num_experts).reshape(-1)
    out[rows, cols] = True
    return out[:, :num_experts]


def hits_at(ranked: np.ndarray, true_hot: np.ndarray, n: int) -> np.ndarray:
    """``|T ∩ P_n|`` per row."""
    top = ranked[:, :n]
    valid = top >= 0
    picked = np.take_along_axis(true_hot, np.where(valid, top, 0).astype(np.int64), axis=1)
    return (picked & valid).sum(axis=1)


def top1_correct(ranked: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per row: the predictor's first choice is one of the true top-k experts. This is the one
    ``top1`` of every predictor report (``top1_acc`` here, ``top1`` of ``predictors.fate``)."""
    ranked, true = np.asarray(ranked), np.asarray(true)
    first = ranked[:, :1]
    return (first >= 0).ravel() & (first == true).any(axis=1)


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def bit_scores(pred_hot: np.ndarray, true_hot: np.ndarray) -> tuple[float, float]:
    """(bit accuracy, macro-F1 over the {0, 1} bit classes) of flattened multi-hot vectors."""
    if pred_hot.size == 0:
        return float("nan"), float("nan")
    tp = float(np.count_nonzero(pred_hot & true_hot))
    tn = float(np.count_nonzero(~pred_hot & ~true_hot))
    fp = float(np.count_nonzero(pred_hot & ~true_hot))
    fn = float(np.count_nonzero(~pred_hot & true_hot))
    acc = (tp + tn) / pred_hot.size
    return acc, (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2


def _row_metrics(ranked: np.ndarray, true: np.ndarray, spec: MetricSpec) -> dict[str, float]:
    e, k = spec.num_experts, spec.top_k
    n_rows = len(true)
    out: dict[str, float] = {"rows": float(n_rows)}
    if n_rows == 0:
        return out
    true_hot = multi_hot(true, e)
    pred_k = ranked[:, :k]
    pred_hot = multi_hot(pred_k, e)
    out["exact_match"] = float(np.mean((pred_hot == true_hot).all(axis=1)))
    for w in spec.widths():
        h = hits_at(ranked, true_hot, w)
        out[f"overprov_acc@{w}"] = float(np.mean(h == k))
        out[f"recall@{w}"] = float(np.mean(h / k))
        out[f"precision@{w}"] = float(np.mean(h / w))
    for n in spec.top_n:
        nn = min(n, e)
        if nn == 1:
            out["top1_acc"] = float(np.mean(top1_correct(ranked, true)))
            continue
        out[f"top{n}_acc"] = float(np.mean(hits_at(ranked, true_hot, nn) / min(nn, k)))
    out["bit_acc"], out["macro_f1"] = bit_scores(pred_hot, true_hot)
    zero = np.zeros_like(true_hot)
    out["zero_bit_acc"], out["zero_macro_f1"] = bit_scores(zero, true_hot)
    return out


def evaluate(
    ranked: np.ndarray,
    true: np.ndarray,
    layer: np.ndarray,
    spec: MetricSpec,
    layer_ids: Sequence[int] | None = None,
) -> list[dict[str, float | int | str]]:
    """Metric rows: one per layer (``layer`` = model layer id) and one ``"all"`` row.

    ``ranked`` is ``[N, W]`` predicted ids in rank order (``W >= k``; -1 = none), ``true`` is
    ``[N, k]`` true ids, ``layer`` the dense layer index of each row.
    """
    ranked = np.asarray(ranked)
    true = np.asarray(true)
    layer = np.asarray(layer)
    if ranked.ndim != 2 or true.ndim != 2 or not len(ranked) == len(true) == len(layer):
        raise ValueError("evaluate: ranked [N, W], true [N, k] and layer [N] must align")
    if true.shape[1] != spec.top_k or ranked.shape[1] < spec.top_k:
        raise ValueError(
            f"evaluate: true has width {true.shape[1]}, ranked {ranked.shape[1]}; "
            f"need true width = top_k = {spec.top_k} <= ranked width"
        )
    rows: list[dict[str, float | int | str]] = []
    for j in np.unique(layer):
        m = layer == j
        name = str(layer_ids[int(j)]) if layer_ids is not None else str(int(j))
        rows.append({"layer": name, **_row_metrics(ranked[m], true[m], spec)})
    rows.append({"layer": "all", **_row_metrics(ranked, true, spec)})
    return rows


def format_table(rows: list[dict], keys: Sequence[str] | None = None) -> str:
    """Plain-text table of metric rows (the all-zero bit scores stay beside the real ones)."""
    if not rows:
        return "(no rows)"
    keys = list(keys or [k for k in rows[0] if k != "layer"])
    head = ["layer", *keys]
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for r in rows:
        cells = [f"{r['layer']!s:>14}"]
        for k in keys:
            v = r.get(k, float("nan"))
            cells.append(f"{v:>14.0f}" if k == "rows" else f"{v:>14.4f}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
