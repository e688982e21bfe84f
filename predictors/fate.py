"""Fate's cross-layer next-gate predictor (arXiv 2502.12224), no training.

For each token and MoE layer l, layer l+1's router is applied to layer l's router input
(``feat.router_in``): softmax over the gate logits, the ``width`` most probable experts are the
prediction *for* layer l+1. It exists once layer l has routed, so the table is tagged
``available_at = "routed:prev_layer"`` and is consumed by
``policy=prediction_prefetch policy.point=demand_issued policy.ahead=1``.

Against Fate's code (``mindspore-lab/models`` ``research/SYSU/Fate``, ``Qwen2MoeDecoderLayer``):

- Fate takes a hard-coded top-5 with k = 4 (top-k+1 over-provisioning); here ``width`` defaults
  to the model's top_k and ``--width K+1`` reproduces Fate's choice.
- Fate merges the batch's per-token top-5 into one frequency-ordered list (Counter); the table is
  per token and the simulator's batch union does the merge (frequency order is not kept).
- Fate's INT2/INT4 precision split of the predicted experts is not modelled.
- The first MoE layer gets no prediction (Fate: "layer 0 has no prefetch, uses its own
  routing"); the anchors notes give Fate no embedding-based signal for it.
- "Next layer" is the next *MoE* layer of the trace; with interleaved dense layers that differs
  from Fate's l+1 (the output notes say so when it happens).
- Scoring is softmax(W x) and top-``width``; router extras in the side file (biases, score
  corrections) are not applied. Exact ties go to the lower expert id (numpy stable sort).

Accuracy against the true routing of layer l+1 (rows where both layers were recorded):
``exact`` = the first k predicted equal the true top-k set; ``recall`` = |pred ∩ true| / k over
the ``width`` predicted (recall@width); ``top1`` = the first predicted expert is one of the true
top-k (``predictors.metrics.top1_correct``, the same top-1 as ``predictors.evaluate``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.predictors.data import file_digest
from moesim.predictors.metrics import top1_correct
from moesim.traces.collect.collector import load_routers, routers_path
from moesim.traces.errors import TraceError
from moesim.traces.predictions import PredictionWriter, trace_identity
from moesim.traces.store import atomic_path, feature_specs, iter_features, iter_requests, read_meta

AVAILABLE_AT = "routed:prev_layer"
FEATURE = "router_in"
PREDICTOR = "fate_next_gate"


# ----------------------------------------------------------------------------------------------
# core maths (pure numpy, testable on hand-built inputs)


def gate_topk(x: np.ndarray, weight: np.ndarray, width: int) -> np.ndarray:
    """Top-``width`` experts of ``softmax(x @ weight.T)`` per row, most probable first.

    ``x`` is ``[n, d]``, ``weight`` the router's ``[E, d]``. Softmax is monotone, so the ranking
    is that of the logits; exact ties go to the lower expert id.
    """
    logits = np.asarray(x, dtype=np.float32) @ np.asarray(weight, dtype=np.float32).T
    order = np.argsort(-logits, axis=1, kind="stable")
    return order[:, :width].astype(np.int16)


def next_gate_predict(
    router_in: np.ndarray, weights: Sequence[np.ndarray], width: int, recorded: np.ndarray
) -> np.ndarray:
    """Fate predictions of one request: ``int16 [T, L, width]``, -1 where there is none.

    ``router_in`` is ``[T, L, d]``, ``weights[j]`` the router of MoE layer j, ``recorded``
    ``bool [T, L]``. Row ``[t, j]`` (j >= 1) is layer j's gate on layer j-1's router input.
    """
    t_n, l_n = recorded.shape
    pred = np.full((t_n, l_n, width), -1, dtype=np.int16)
    for j in range(1, l_n):
        rows = recorded[:, j - 1]
        if rows.any():
            pred[rows, j] = gate_topk(router_in[rows, j - 1], weights[j], width)
    return pred


@dataclass
class Accuracy:
    """Running per-layer counts of exact-match, recall@width and top-1 coverage."""

    num_layers: int
    top_k: int
    width: int
    rows: np.ndarray = field(init=False)
    exact: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)
    top1: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        z = np.zeros(self.num_layers, dtype=np.int64)
        self.rows, self.exact, self.hits, self.top1 = z.copy(), z.copy(), z.copy(), z.copy()

    def add(self, pred: np.ndarray, true: np.ndarray) -> None:
        """Score ``pred [T, L, w]`` against ``true [T, L, k]`` (-1 rows are skipped)."""
        k = self.top_k
        ok = (pred[:, :, 0] >= 0) & (true[:, :, 0] >= 0)
        p, t = pred[ok].astype(np.int64), true[ok].astype(np.int64)
        layer = np.nonzero(ok)[1]
        inter = (p[:, :, None] == t[:, None, :]).any(axis=1)  # [n, k]: true expert predicted
        exact = np.sort(p[:, :k], axis=1) == np.sort(t, axis=1)

        def per_layer(x: np.ndarray) -> np.ndarray:
            return np.bincount(layer, weights=x, minlength=self.num_layers).astype(np.int64)

        self.rows += np.bincount(layer, minlength=self.num_layers)
        self.hits += per_layer(inter.sum(axis=1))
        self.exact += per_layer(exact.all(axis=1))
        self.top1 += per_layer(top1_correct(p, t))

    def _ratios(self, rows: int, exact: int, hits: int, top1: int) -> dict[str, float]:
        d = max(rows, 1)
        return {
            "rows": int(rows),
            "exact": float(exact / d),
            "recall": float(hits / (d * self.top_k)),
            "top1": float(top1 / d),
        }

    def per_layer(self) -> list[dict[str, float]]:
        """One dict per layer index (``rows`` 0 where nothing was predicted)."""
        return [
            self._ratios(self.rows[j], self.exact[j], self.hits[j], self.top1[j])
            for j in range(self.num_layers)
        ]

    def overall(self) -> dict[str, float]:
        """Pooled over every predicted row (row-weighted)."""
        return self._ratios(self.rows.sum(), self.exact.sum(), self.hits.sum(), self.top1.sum())


@dataclass
class OwnGateCheck:
    """Does layer l's own router on layer l's router input give the recorded top-k?

    Validates features, router weights and their alignment. ``near_tie`` counts mismatches
    where the recorded experts are within ``tol`` logits of our k-th best (fp16 storage of the
    router input can flip such ties).
    """

    num_layers: int
    tol: float = 1e-2
    rows: np.ndarray = field(init=False)
    mismatch: np.ndarray = field(init=False)
    near_tie: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        z = np.zeros(self.num_layers, dtype=np.int64)
        self.rows, self.mismatch, self.near_tie = z.copy(), z.copy(), z.copy()

    def add(self, router_in: np.ndarray, weights: Sequence[np.ndarray], true: np.ndarray) -> None:
        k = true.shape[2]
        for j in range(self.num_layers):
            rows = true[:, j, 0] >= 0
            if not rows.any():
                continue
            logits = router_in[rows, j].astype(np.float32) @ weights[j].astype(np.float32).T
            got = np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)
            want = np.sort(true[rows, j].astype(np.int64), axis=1)
            bad = (got != want).any(axis=1)
            self.rows[j] += int(rows.sum())
            self.mismatch[j] += int(bad.sum())
            if bad.any():
                lb = logits[bad]
                kth = np.sort(lb, axis=1)[:, -k]
                recorded_min = np.take_along_axis(lb, want[bad], axis=1).min(axis=1)
                self.near_tie[j] += int((kth - recorded_min <= self.tol).sum())


# ----------------------------------------------------------------------------------------------
# trace I/O


class _RowFeed:
    """Hands out consecutive feature rows from :func:`iter_features` blocks."""

    def __init__(self, blocks: Iterator[np.ndarray]) -> None:
        self._blocks = blocks
        self._buf: list[np.ndarray] = []
        self._have = 0

    def take(self, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0, 0), dtype=np.float16)
        while self._have < n:
            block = next(self._blocks, None)
            if block is None:
                raise TraceError(f"feat.{FEATURE} has fewer rows than the routing")
            self._buf.append(block)
            self._have += len(block)
        cat = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        out, rest = cat[:n], cat[n:]
        self._buf, self._have = ([rest] if len(rest) else []), len(rest)
        return out

    def exhausted(self) -> bool:
        """True when no rows are left (reads ahead at most one block)."""
        if self._have:
            return False
        block = next(self._blocks, None)
        if block is None:
            return True
        self._buf, self._have = [block], len(block)
        return len(block) == 0 and self.exhausted()


def _load_weights(trace_path: Path, layer_ids: tuple[int, ...], e: int, d: int) -> list:
    rpath = routers_path(trace_path)
    if not rpath.is_file():
        raise TraceError(
            f"no router weights side file {rpath.name} beside the trace (moesim-collect writes it)",
            file=trace_path,
        )
    try:
        routers = load_routers(rpath)
    except (OSError, ValueError) as exc:
        raise TraceError(f"unreadable router weights ({exc})", file=rpath) from None
    out = []
    for lid in layer_ids:
        w = routers.get(lid)
        if w is None:
            raise TraceError(f"no router weights for MoE layer {lid}", file=rpath)
        if w.shape != (e, d):
            raise TraceError(
                f"router of layer {lid} is {tuple(w.shape)}, expected ({e}, {d})", file=rpath
            )
        out.append(w.astype(np.float32))
    return out


@dataclass
class FateResult:
    """What :func:`run_fate` produced (the table path and its accuracy)."""

    path: Path
    width: int
    rows: int
    accuracy: Accuracy
    own_gate: OwnGateCheck
    layer_ids: tuple[int, ...]
    num_experts: int


def run_fate(trace_path: str | Path, out_path: str | Path, width: int | None = None) -> FateResult:
    """Write the Fate prediction table for ``trace_path`` to ``out_path`` (atomically).

    Streams the trace request by request, so only one request's router inputs are in memory.
    Raises :class:`TraceError` on bad input and ``ValueError`` on a bad ``width``.
    """
    trace_path, out_path = Path(trace_path), Path(out_path)
    if not trace_path.is_file():
        raise TraceError("trace file does not exist", file=trace_path)
    if out_path.resolve() == trace_path.resolve():
        raise ValueError("output path is the trace itself")
    meta = read_meta(trace_path)
    specs = feature_specs(trace_path)
    if FEATURE not in specs:
        raise TraceError(
            f"trace has no feat.{FEATURE} (declared: {sorted(specs) or 'none'}); "
            "collect it with hidden states",
            file=trace_path,
        )
    e, k, l_n, d = meta.num_experts, meta.top_k, meta.num_moe_layers, specs[FEATURE].dim
    w = k if width is None else int(width)
    if not 1 <= w <= e:
        raise ValueError(f"width must be in 1..{e} (num_experts), got {w}")
    if l_n < 2:
        raise TraceError("Fate needs at least two MoE layers", file=trace_path)
    weights = _load_weights(trace_path, meta.moe_layers, e, d)
    acc, own = Accuracy(l_n, k, w), OwnGateCheck(l_n)
    feed = _RowFeed(iter_features(trace_path, FEATURE))
    with atomic_path(out_path) as tmp:
        writer = PredictionWriter(tmp, meta.moe_layers, available_at=AVAILABLE_AT,
                                  trace=trace_identity(meta, file_digest(trace_path)))
        try:
            for req in iter_requests(trace_path):
                recorded = req.experts[:, :, 0] >= 0
                x = np.zeros((*recorded.shape, d), dtype=np.float32)
                x[recorded] = feed.take(int(recorded.sum()))  # C order = file row order
                pred = next_gate_predict(x, weights, w, recorded)
                acc.add(pred, req.experts)
                own.add(x, weights, req.experts)
                writer.add(req.request_id, pred)
            if not feed.exhausted():
                raise TraceError(f"feat.{FEATURE} has more rows than the routing")
            writer.close(_table_meta(meta, trace_path, w, acc, own))
        except BaseException:
            writer.abort()
            raise
    return FateResult(out_path, w, writer.rows, acc, own, meta.moe_layers, e)


def _table_meta(meta: Any, trace_path: Path, w: int, acc: Accuracy, own: OwnGateCheck) -> dict:
    ids = meta.moe_layers
    gaps = [b for a, b in itertools.pairwise(ids) if b != a + 1]
    notes = {
        "method": "softmax(router[l+1] @ feat.router_in[l]), top-width, per token",
        "first_layer": f"MoE layer {ids[0]} has no prediction (Fate: no prefetch for layer 0)",
        "consume_with": "policy=prediction_prefetch policy.point=demand_issued policy.ahead=1",
        "routers_file": routers_path(trace_path).name,
        "deviation": "per-token rows, no batch Counter ordering, no INT2/INT4 split; "
        "width defaults to top_k (Fate's code uses top_k+1)",
    }
    if gaps:
        notes["next_layer"] = (
            f"MoE layers {gaps} do not follow their predecessor directly; 'next' is the next "
            "MoE layer"
        )
    return {
        "model": meta.model,
        "source": trace_path.name,
        "predictor": PREDICTOR,
        "width": w,
        "available_at": AVAILABLE_AT,
        "notes": notes,
        "accuracy": {
            "overall": acc.overall(),
            "per_layer": {str(lid): r for lid, r in zip(ids, acc.per_layer(), strict=True)},
            "own_gate_mismatch_rows": int(own.mismatch.sum()),
        },
    }


def fate_predictions(
    trace_path: str | Path, out_path: str | Path, width: int | None = None
) -> Path:
    """Write Fate's next-gate prediction table; returns ``out_path``. See :func:`run_fate`."""
    return run_fate(trace_path, out_path, width).path


# ----------------------------------------------------------------------------------------------
# CLI


def report(res: FateResult) -> str:
    """Human-readable accuracy table (per layer, overall, random baseline, own-gate check)."""
    acc, own = res.accuracy, res.own_gate
    lines = [
        f"wrote {res.path} ({res.rows} rows, width {res.width}, available_at {AVAILABLE_AT})",
        f"{'layer':>6} {'rows':>8} {'exact':>7} {'recall@' + str(res.width):>9} {'top1':>7}"
        f" {'own-gate mismatch':>18}",
    ]
    for j, (lid, r) in enumerate(zip(res.layer_ids, acc.per_layer(), strict=True)):
        pred = (
            "   (no prediction)"
            if r["rows"] == 0
            else (f" {r['exact']:7.4f} {r['recall']:9.4f} {r['top1']:7.4f}")
        )
        lines.append(
            f"{lid:>6} {r['rows']:>8}{pred} {own.mismatch[j]:>8}/{own.rows[j]}"
            f" ({own.near_tie[j]} near-tie)"
        )
    o = acc.overall()
    lines.append(
        f"{'all':>6} {o['rows']:>8} {o['exact']:7.4f} {o['recall']:9.4f} {o['top1']:7.4f}"
        f" {own.mismatch.sum():>8}/{own.rows.sum()}"
    )
    lines.append(
        f"random predictor: recall@{res.width} = {res.width / res.num_experts:.4f}"
        f" (width / num_experts)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moesim.predictors.fate TRACE OUT [--width N]``; bad input: one error line,
    exit 2."""
    ap = argparse.ArgumentParser(
        prog="python -m moesim.predictors.fate",
        description="Fate next-gate predictions (layer l+1's router on layer l's router input).",
    )
    ap.add_argument("trace", help="trace parquet with feat.router_in and its .routers.npz")
    ap.add_argument("out", help="prediction table to write (parquet)")
    ap.add_argument(
        "--width", type=int, default=None, help="experts per prediction (default: top_k; Fate: k+1)"
    )
    args = ap.parse_args(argv)
    try:
        res = run_fate(args.trace, args.out, args.width)
    except (TraceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
