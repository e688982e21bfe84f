"""Prediction tables as policies see them: predicted expert keys per (step, layer).

Predictors (and importers of published predictions) write tables keyed by (request, token,
layer); the workload decides which tokens run in which step, so the view is built per run.
With batching, a step's prediction for a layer is the union over its tokens.

The view is also where a table meets the requests actually replayed: expert ids must be in
range for their own layer (an id >= E would otherwise alias expert id-E of the next layer), and
per MoE layer the share of replayed (request, token) pairs with a prediction row at that layer
is counted; the worst layer's share is the run's ``prediction_coverage``. A table that covers
less than ``min_coverage`` of them at some layer (a table made for other requests, another
trace, or only some layers) is an error naming both files and the layer, not a run that
silently prefetches nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from moesim.sim.cache import SimulationError
from moesim.sim.workload import Workload

DEFAULT_MIN_COVERAGE = 0.99


class PredictionView:
    """``keys_at(step, layer)``: predicted expert keys, first-predicted first, no duplicates."""

    def __init__(
        self,
        workload: Workload,
        per_request: Mapping[int, np.ndarray],
        available_at: str | None = None,
        min_coverage: float | None = None,
    ) -> None:
        self.available_at = available_at  # e.g. "pre_attention:same_layer" (table metadata)
        if min_coverage is None:
            min_coverage = getattr(per_request, "min_coverage", DEFAULT_MIN_COVERAGE)
        table = getattr(per_request, "path", None)
        trace = getattr(per_request, "trace_path", None)
        self._names = (
            f"prediction table {table}" if table is not None else "the prediction table",
            f"trace {trace}" if trace is not None else "the trace",
        )
        shape = workload.shape
        num_l, num_e = shape.num_layers, shape.num_experts
        for rid, pred in per_request.items():
            self._check(int(rid), pred, num_l, num_e)
        self.num_steps = workload.num_steps
        self.table, missing, per_layer_total, per_layer_covered = _union(
            workload, per_request, num_e)
        self.missing_units = missing
        # Coverage is per MoE layer: a table holding one layer of 26 covered every (request,
        # token) pair. Layers a table cannot predict by construction (the first h of a table
        # made h layers ahead) are left out; the run's coverage is its worst layer's.
        skip = unpredictable_layers(available_at)
        ratios = [(c / t, j) for j, (c, t) in enumerate(zip(per_layer_covered.tolist(),
                                                             per_layer_total.tolist(),
                                                             strict=True)) if t and j >= skip]
        self.coverage, self.worst_layer = min(ratios, default=(float("nan"), -1))
        self.replayed_tokens = int(per_layer_total[self.worst_layer]) if ratios else 0
        self.covered_tokens = int(per_layer_covered[self.worst_layer]) if ratios else 0
        if ratios and self.coverage < float(min_coverage):
            table_name, trace_name = self._names
            raise SimulationError(
                f"{table_name} covers {self.covered_tokens:,} of the {self.replayed_tokens:,} "
                f"(request, token) pairs replayed from {trace_name} at MoE layer index "
                f"{self.worst_layer}, its worst layer ({self.coverage:.1%} < "
                f"predictions.min_coverage={float(min_coverage):g}): it was made for other "
                "requests, another trace or only some layers (lower predictions.min_coverage "
                "to replay it anyway)"
            )

    def _check(self, rid: int, pred: np.ndarray, num_l: int, num_e: int) -> None:
        """Shape [T, L, w] with ids in [-1, E) per layer."""
        table_name, trace_name = self._names
        if pred.ndim != 3 or pred.shape[1] != num_l:
            raise SimulationError(
                f"{table_name}: request {rid} has predictions shaped {tuple(pred.shape)}, "
                f"expected [tokens, {num_l} MoE layers, width] as in {trace_name}"
            )
        if not np.issubdtype(pred.dtype, np.integer):
            raise SimulationError(f"{table_name}: expert ids must be integers, got {pred.dtype}")
        bad = (pred < -1) | (pred >= num_e)
        if bad.any():
            t, j, r = (int(x[0]) for x in np.nonzero(bad))
            raise SimulationError(
                f"{table_name}: request {rid}, token {t}, MoE layer index {j} predicts expert "
                f"{int(pred[t, j, r])}, outside [0, {num_e}) of {trace_name}"
            )

    def keys_at(self, step: int, layer: int) -> list[int]:
        if step >= self.num_steps:
            return []
        row = self.table[step, layer]
        return row[row >= 0].tolist()


def unpredictable_layers(available_at: str | None) -> int:
    """Leading MoE layers a table cannot predict by construction: a prediction made ``h``
    layers ahead (``routed:prev_layer``: 1, ``routed:minus{h}_layer``: h) has nothing to be
    made from for the first ``h`` layers (Fate's and the speculation predictor's tables)."""
    tag = str(available_at or "")
    if tag == "routed:prev_layer":
        return 1
    m = re.fullmatch(r"routed:minus(\d+)_layer", tag)
    return int(m.group(1)) if m else 0


def _union(workload: Workload, per_request: Mapping[int, np.ndarray], num_e: int
           ) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """Per step and layer, the union of its tokens' predicted keys in first-predicted order
    (``int32 [steps, layers, width]``, -1 padded; one compiled pass, as batched workloads are
    built), the replayed units without predictions, and per MoE layer the replayed tokens
    whose step routes at that layer and how many of them have a prediction row there."""
    from moesim.sim.compiled.steps import union_steps

    first: dict[int, tuple[int, int]] = {}  # request -> (its first row when stacked, rows)
    arrays: list[np.ndarray] = []
    rows = missing = 0
    tok_idx: list[int] = []
    unit_end = [0]
    unit_len: list[int] = []
    for rid, t0, t1 in zip(workload.req_ids.tolist(), workload.token_start.tolist(),
                           workload.token_end.tolist(), strict=True):
        unit_len.append(t1 - t0)
        if rid not in first:
            pred = per_request.get(rid)
            first[rid] = (-1, 0) if pred is None else (rows, len(pred))
            if pred is not None:
                arrays.append(pred)
                rows += len(pred)
        off, size = first[rid]
        if off < 0 or t0 >= size:
            missing += 1
        else:
            tok_idx.extend(range(off + t0, off + min(t1, size)))
        unit_end.append(len(tok_idx))
    width = max((a.shape[2] for a in arrays), default=1)
    stacked = np.full((max(rows, 1), workload.shape.num_layers, width), -1, dtype=np.int32)
    at = 0
    for a in arrays:
        stacked[at:at + len(a), :, :a.shape[2]] = a
        at += len(a)
    idx = np.asarray(tok_idx, dtype=np.int64)
    step_off = np.asarray(unit_end, dtype=np.int64)[workload.req_offsets]
    # A token counts at a layer where its step routes (traces may lack some layers' rows).
    routed = workload.pairs > 0  # [steps, layers]
    unit_step = np.repeat(np.arange(workload.num_steps), np.diff(workload.req_offsets))
    total = (np.asarray(unit_len, dtype=np.int64)[:, None] * routed[unit_step]).sum(axis=0)
    tok_step = np.repeat(np.arange(workload.num_steps), np.diff(step_off))
    has = (stacked[idx] >= 0).any(axis=2) & routed[tok_step]
    covered = has.sum(axis=0).astype(np.int64)
    keys, _, _ = union_steps(stacked, idx, step_off, num_e)
    return keys, missing, total, covered
