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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moesim.sim.cache import SimulationError
from moesim.sim.workload import Workload
from moesim.traces.trace import TraceMeta

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
        (self.table, missing, self.per_layer_total, self.per_layer_covered,
         self.first_uncovered) = _union(workload, per_request, num_e)
        self.missing_units = missing
        self.coverage, self.worst_layer, self.replayed_tokens, self.covered_tokens = (
            check_coverage(self.per_layer_total, self.per_layer_covered, self.first_uncovered,
                           available_at, float(min_coverage), self._names))

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


def check_coverage(total: np.ndarray, covered: np.ndarray, first_uncovered: np.ndarray,
                   available_at: str | None, min_coverage: float, names: tuple[str, str],
                   ) -> tuple[float, int, int, int]:
    """The run's coverage from its per-layer counts of replayed and covered (request, token)
    pairs: (coverage, worst layer, its replayed and covered pairs); below ``min_coverage``
    the error naming the table, the trace, the layer and its first replayed request without
    a prediction row there (``first_uncovered``, -1: none). One function for the in-memory
    view and the streamed run, which sums the counts chunk by chunk."""
    # Coverage is per MoE layer: a table holding one layer of 26 covered every (request,
    # token) pair. Layers a table cannot predict by construction (the first h of a table
    # made h layers ahead) are left out; the run's coverage is its worst layer's.
    skip = unpredictable_layers(available_at)
    ratios = [(c / t, j) for j, (c, t) in enumerate(zip(covered.tolist(), total.tolist(),
                                                         strict=True)) if t and j >= skip]
    coverage, worst = min(ratios, default=(float("nan"), -1))
    replayed = int(total[worst]) if ratios else 0
    got = int(covered[worst]) if ratios else 0
    if ratios and coverage < float(min_coverage):
        table_name, trace_name = names
        first = int(first_uncovered[worst])
        raise SimulationError(
            f"{table_name} covers {got:,} of the {replayed:,} (request, token) pairs replayed "
            f"from {trace_name} at MoE layer index {worst}, its worst layer ({coverage:.1%} < "
            f"predictions.min_coverage={float(min_coverage):g}; the first replayed request "
            f"without a prediction row there: {first}): it was made for other requests, "
            "another trace or only some layers (lower predictions.min_coverage to replay it "
            "anyway)"
        )
    return coverage, worst, replayed, got


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
           ) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """Per step and layer, the union of its tokens' predicted keys in first-predicted order
    (``int32 [steps, layers, width]``, -1 padded; one compiled pass, as batched workloads are
    built), the replayed units without predictions, and per MoE layer the replayed tokens
    whose step routes at that layer, how many of them have a prediction row there, and the
    first request (in step order) with a replayed token lacking one (-1: none)."""
    from moesim.sim.compiled.steps import union_steps

    num_l = workload.shape.num_layers
    if workload.num_steps == 0:  # a streamed run's facade: its chunks have their own views
        z = np.zeros(num_l, np.int64)
        return np.full((0, num_l, 1), -1, np.int32), 0, z, z.copy(), np.full(num_l, -1)
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
    first = np.full(workload.shape.num_layers, -1, np.int64)
    if (covered < total).any():  # per unit: its routed tokens less its covered ones
        per_unit = np.asarray(unit_len, dtype=np.int64)[:, None] * routed[unit_step]
        done = np.concatenate([np.zeros((1, has.shape[1]), np.int64),
                               np.cumsum(has, axis=0, dtype=np.int64)])
        ends = np.asarray(unit_end, dtype=np.int64)
        lacking = per_unit > done[ends[1:]] - done[ends[:-1]]
        for j in np.flatnonzero(lacking.any(axis=0)).tolist():
            first[j] = int(workload.req_ids[int(np.argmax(lacking[:, j]))])
    keys, _, _ = union_steps(stacked, idx, step_off, num_e)
    return keys, missing, total, covered, first


SCAN_ROWS = 1 << 16  # rows decoded at once (Arrow's buffers: a row group whole takes ~4x)


class PredictionFile:
    """A prediction table file read request by request, for a streamed run (``sim.stream``),
    in memory bounded by the requests asked for (and the row groups holding them), never the
    whole table: :meth:`rows` gives a chunk's requests as ``traces.load_predictions`` gives
    them, the same arrays.

    Opening it checks what ``load_predictions`` checks before a run: the recorded trace
    identity, the column types, and in one pass over the file (``SCAN_ROWS`` rows at a time)
    the width (one, in 1..E), request ids and token indices >= 0, expert ids in [0, E) and
    distinct within a row, and layers among the trace's MoE layers, naming the same file row;
    that pass also indexes the row groups holding each request's rows (16 B per request and
    row group it is in). A (request, token, layer) given twice is found when its request is
    read (``load_predictions`` finds it at load, in any request)."""

    def __init__(
        self,
        path: str | Path,
        layer_ids: Sequence[int],
        *,
        trace_meta: TraceMeta | None = None,
        num_experts: int | None = None,
        trace_path: str | Path | None = None,
        trace_digest: str | None = None,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> None:
        import pyarrow.parquet as pq

        from moesim.traces.predictions import (
            COLUMNS,
            check_rows,
            decode_rows,
            layer_index,
            open_checked,
        )

        meta, num_experts = open_checked(path, num_experts=num_experts, trace_meta=trace_meta,
                                         trace_path=trace_path, trace_digest=trace_digest,
                                         min_coverage=min_coverage)
        self.path = Path(path)
        self.meta = meta
        self.available_at: str | None = meta.get("available_at")
        self.trace_path = None if trace_path is None else Path(trace_path)
        self.min_coverage = float(min_coverage)
        self._layer_ids = [int(x) for x in layer_ids]
        self._num_e = num_experts
        self._file = pq.ParquetFile(str(path))
        self._starts = [0]  # each row group's first row in the file
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}
        self.width = 0
        pairs: list[np.ndarray] = []  # (request id, row group) of every request in a group
        at = 0  # the scan reads a row group in slices of SCAN_ROWS rows (less decoded at once)
        for g in range(self._file.num_row_groups):
            ids = []
            for part in self._file.iter_batches(batch_size=SCAN_ROWS, row_groups=[g],
                                                columns=COLUMNS, use_threads=False):
                rid, tok, layer, values = decode_rows(part, self.path, self.width)
                self.width = self.width or values.shape[1]
                check_rows(rid, tok, layer, values, self._num_e, self.path, at)
                layer_index(layer, self._layer_ids, self.path)
                at += len(rid)
                ids.append(np.unique(rid))
            self._starts.append(at)
            if ids:
                got = np.unique(np.concatenate(ids))
                pairs.append(np.stack([got, np.full(len(got), g, np.int64)], axis=1))
        # the index, 16 B per (request, row group) pair: sorted by request, then group
        both = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
        order = np.lexsort((both[:, 1], both[:, 0]))
        self._index_ids, self._index_groups = both[order, 0], both[order, 1]

    def _read(self, g: int) -> tuple[np.ndarray, ...]:
        """Row group ``g`` (checked by the scan)."""
        from moesim.traces.predictions import COLUMNS, decode_rows

        parts = [decode_rows(part, self.path, self.width) for part in self._file.iter_batches(
            batch_size=SCAN_ROWS, row_groups=[g], columns=COLUMNS, use_threads=False)]
        if not parts:
            z = np.zeros(0, np.int64)
            return z, z, z, np.zeros((0, max(self.width, 1)), np.int16)
        return tuple(np.concatenate(x) for x in zip(*parts, strict=True))

    def rows(self, request_ids: Iterable[int]) -> Any:
        """The predictions of ``request_ids`` (those the table has) as a ``PredictionTable``
        (``int16 [T, L, w]`` per request, -1 = no row) with this file's attributes; the row
        groups read stay cached until a call needs none of them."""
        from moesim.traces.predictions import (
            PredictionTable,
            fill_dense,
            layer_index,
            sorted_unique,
        )

        want = np.unique(np.fromiter((int(r) for r in request_ids), np.int64))
        lo = np.searchsorted(self._index_ids, want, "left")
        hi = np.searchsorted(self._index_ids, want, "right")
        need = sorted({int(g) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)
                       for g in self._index_groups[a:b]})
        self._cache = {g: self._cache[g] if g in self._cache else self._read(g) for g in need}
        out = PredictionTable()
        out.path, out.meta, out.available_at = self.path, self.meta, self.available_at
        out.trace_path, out.min_coverage = self.trace_path, self.min_coverage
        if not need:
            return out
        parts, at = [], []
        for g in need:
            rid, tok, layer, values = self._cache[g]
            keep = np.isin(rid, want)
            parts.append((rid[keep], tok[keep], layer[keep], values[keep]))
            at.append(self._starts[g] + np.flatnonzero(keep))
        rid, tok, layer, values = (np.concatenate(x) for x in zip(*parts, strict=True))
        rid, tok, layer, values = sorted_unique(rid, tok, layer, values, self.path,
                                                rows=np.concatenate(at))
        fill_dense(out, rid, tok, layer_index(layer, self._layer_ids, self.path), values,
                   len(self._layer_ids))
        return out
