"""Reference prediction tables that some sources ship beside the routing (MoE-Beyond).

Schema (Parquet, one row per (request, token, layer), sorted like the trace it belongs to):

=============  ==================  ============================================================
column         Arrow type          meaning
=============  ==================  ============================================================
request_id     int32               as in the trace
token_idx      int32               as in the trace
layer          int16               model layer id the prediction is *for*
predicted      list<int16>         predicted expert ids (the source's own top-n, distinct)
available_at   dictionary<string>  when the prediction could be used. ``routed:same_layer``
                                   = computed from information available only when this very
                                   layer routes (no lead time to prefetch).
=============  ==================  ============================================================

Metadata key ``moesim.predictions`` holds JSON: ``format_version, model, source, predictor,
width, available_at, layer_ids, trace{}, notes{}, counts{rows}``, where ``trace`` (from
:func:`trace_identity`) names the trace the table was made for: model, MoE layer ids, experts,
top-k and, when the writer knows it, the trace file's content digest. Simulations consume a
table through :func:`load_predictions`, which checks it against the trace it is replayed on
(identity, layers, expert ids in range, width, dtypes) so a table made for another trace is one
clear error rather than a silently wrong hit rate; ``sim.predictions`` then checks how much of
the replayed requests and tokens it covers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.traces.errors import TraceError
from moesim.traces.schema import FORMAT_VERSION, dumps
from moesim.traces.trace import TraceMeta

PRED_META_KEY = b"moesim.predictions"
SAME_LAYER = "routed:same_layer"
DEFAULT_MIN_COVERAGE = 0.99  # predictions.min_coverage: replayed tokens a table must cover
PRED_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int32(), nullable=False),
        pa.field("token_idx", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("predicted", pa.list_(pa.int16()), nullable=False),
        pa.field("available_at", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    ]
)


def content_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file (``predictors.data.file_digest`` remembers it per path, size and
    modification time); here so that writers in ``traces`` can record the trace they wrote."""
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def trace_identity(meta: TraceMeta, digest: str | None = None) -> dict[str, Any]:
    """What a prediction table records about the trace it was made for (``trace`` in its
    metadata); ``digest`` is the trace file's content hash (``predictors.data.file_digest``)."""
    out: dict[str, Any] = {
        "model": meta.model,
        "moe_layers": [int(x) for x in meta.moe_layers],
        "num_experts": int(meta.num_experts),
        "top_k": int(meta.top_k),
    }
    if digest:
        out["digest"] = str(digest)
    return out


class PredictionWriter:
    """Streaming writer; requests are added as dense ``[T, L, w]`` arrays (-1 = no row).

    ``trace`` (:func:`trace_identity`; also settable as the attribute before :meth:`close`, e.g.
    once the trace file and its digest exist) is recorded so that a replay can refuse a table
    made for another trace."""

    def __init__(
        self,
        path: str | Path,
        layer_ids: tuple[int, ...],
        *,
        available_at: str = SAME_LAYER,
        row_group_rows: int = 1 << 18,
        trace: Mapping[str, Any] | None = None,
    ) -> None:
        self.trace: dict[str, Any] | None = dict(trace) if trace is not None else None
        self._writer = pq.ParquetWriter(str(path), PRED_SCHEMA, compression="zstd")
        self._layer_ids = np.asarray(layer_ids, dtype=np.int16)
        self.available_at = available_at
        self._available = pa.DictionaryArray.from_arrays(
            pa.array([0], pa.int8()), pa.array([available_at])
        )
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._row_group_rows = row_group_rows
        self.rows = 0
        self.width = 0

    def add(self, request_id: int, predicted: np.ndarray) -> None:
        predicted = np.asarray(predicted)
        have = (predicted >= 0).all(axis=2)
        t_idx, j_idx = np.nonzero(have)
        n, w = len(t_idx), predicted.shape[2]
        self.width = w
        offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32))
        values = pa.array(predicted[t_idx, j_idx].reshape(-1).astype(np.int16))
        avail = self._available.take(pa.array(np.zeros(n, dtype=np.int32)))
        self._pending.append(
            pa.RecordBatch.from_arrays(
                [
                    pa.array(np.full(n, request_id, dtype=np.int32)),
                    pa.array(t_idx.astype(np.int32)),
                    pa.array(self._layer_ids[j_idx]),
                    pa.ListArray.from_arrays(offsets, values),
                    avail,
                ],
                schema=PRED_SCHEMA,
            )
        )
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=PRED_SCHEMA)
            self._writer.write_table(table, row_group_size=max(1, table.num_rows))
            self._pending, self._pending_rows = [], 0

    def close(self, meta: Mapping[str, Any]) -> None:
        self._flush()
        payload = {
            "format_version": FORMAT_VERSION,
            "width": self.width,
            "available_at": self.available_at,
            "layer_ids": [int(x) for x in self._layer_ids],
            **({"trace": dict(self.trace)} if self.trace is not None else {}),
            **meta,
            "counts": {"rows": self.rows},
        }
        self._writer.add_key_value_metadata({PRED_META_KEY: dumps(payload)})
        self._writer.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # already failing; the caller deletes the file
            self._writer.close()


def read_predictions_meta(path: str | Path) -> dict[str, Any]:
    try:
        kv = pq.read_metadata(str(path)).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"not a readable parquet file ({exc})", file=path) from None
    if PRED_META_KEY not in kv:
        raise TraceError("not a moesim prediction table", file=path, field="metadata")
    return json.loads(kv[PRED_META_KEY].decode("utf-8"))


class PredictionTable(dict):
    """Per-request predictions (``int16 [T, L, w]``, -1 = no row) plus where they came from:
    the table's ``path``, its metadata, ``available_at``, the ``trace_path`` it is replayed on
    and the ``min_coverage`` the replay requires (read by ``sim.predictions``)."""

    path: Path | None = None
    meta: dict[str, Any] | None = None
    available_at: str | None = None
    trace_path: Path | None = None
    min_coverage: float = DEFAULT_MIN_COVERAGE


_COLUMN_TYPES = {
    "request_id": pa.int32(),
    "token_idx": pa.int32(),
    "layer": pa.int16(),
    "predicted": pa.list_(pa.int16()),
}


def _check_schema(path: str | Path) -> None:
    schema = pq.read_schema(str(path))
    for name, typ in _COLUMN_TYPES.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise TraceError("column missing", file=path, field=name)
        got = schema.field(idx).type
        if got != typ:
            raise TraceError(f"column has type {got}, expected {typ}", file=path, field=name)


def check_identity(
    table_meta: Mapping[str, Any],
    trace_meta: TraceMeta,
    *,
    path: str | Path,
    trace_path: str | Path | None = None,
    trace_digest: str | None = None,
) -> None:
    """Refuse a table whose recorded trace (model, MoE layers, experts, top-k, content digest)
    differs from the trace it is about to be replayed on; fields a table does not record
    (older tables) are not checked."""
    where = f"the trace {trace_path}" if trace_path is not None else "the trace"
    mine = trace_identity(trace_meta, trace_digest)
    recorded = dict(table_meta.get("trace") or {})
    if "model" not in recorded and table_meta.get("model"):
        recorded["model"] = table_meta["model"]
    if "moe_layers" not in recorded and table_meta.get("layer_ids") is not None:
        recorded["moe_layers"] = table_meta["layer_ids"]
    for key in ("model", "moe_layers", "num_experts", "top_k", "digest"):
        if key not in recorded or key not in mine:
            continue
        have, want = recorded[key], mine[key]
        if key == "moe_layers":
            have, want = [int(x) for x in have], [int(x) for x in want]
        if have != want:
            what = "content digest" if key == "digest" else key
            raise TraceError(
                f"prediction table was made for a trace with {what} {have!r}, but {where} has "
                f"{want!r}: it is another trace's table",
                file=path, field=f"trace.{key}",
            )


def open_checked(path: str | Path, *, num_experts: int | None, trace_meta: TraceMeta | None,
                 trace_path: str | Path | None, trace_digest: str | None,
                 min_coverage: float) -> tuple[dict[str, Any], int | None]:
    """What every reader of a prediction table checks before reading its rows (the whole table
    here, a streamed run's chunks in ``sim.predictions.PredictionFile``): the coverage
    threshold, the recorded trace identity and the column types. Returns the file's metadata
    and the number of experts to check expert ids against (the trace's, unless given)."""
    if not 0.0 <= float(min_coverage) <= 1.0:
        raise TraceError(f"predictions.min_coverage must be in [0, 1], got {min_coverage}")
    meta = read_predictions_meta(path)
    if trace_meta is not None:
        check_identity(meta, trace_meta, path=path, trace_path=trace_path,
                       trace_digest=trace_digest)
        num_experts = trace_meta.num_experts if num_experts is None else num_experts
    _check_schema(path)
    return meta, num_experts


def load_predictions(
    path: str | Path,
    layer_ids: tuple[int, ...],
    *,
    num_experts: int | None = None,
    trace_meta: TraceMeta | None = None,
    trace_path: str | Path | None = None,
    trace_digest: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> PredictionTable:
    """Predictions per request id as ``int16 [T, L, w]`` (-1 where no prediction row).

    ``T`` is the largest predicted token index + 1; pass the trace's ``moe_layers`` as
    ``layer_ids`` so the layer axis matches the trace arrays. With ``trace_meta`` (or
    ``num_experts``) the table is checked against the trace: recorded identity
    (:func:`check_identity`), column types, one width in 1..E, expert ids in [0, E) and distinct
    within a row. Every violation is a :class:`TraceError` naming the file.
    """
    meta, num_experts = open_checked(path, num_experts=num_experts, trace_meta=trace_meta,
                                     trace_path=trace_path, trace_digest=trace_digest,
                                     min_coverage=min_coverage)
    out = PredictionTable()
    out.path = Path(path)
    out.meta = meta
    out.available_at = meta.get("available_at")
    out.trace_path = None if trace_path is None else Path(trace_path)
    out.min_coverage = float(min_coverage)
    table = pq.read_table(str(path), columns=COLUMNS)
    if table.num_rows == 0:
        return out
    rid, tok, layer, values = decode_rows(table, path)
    check_rows(rid, tok, layer, values, num_experts, path)
    rid, tok, layer, values = sorted_unique(rid, tok, layer, values, path)
    fill_dense(out, rid, tok, layer_index(layer, layer_ids, path), values, len(layer_ids))
    return out


COLUMNS = ["request_id", "token_idx", "layer", "predicted"]


def decode_rows(part: Any, path: str | Path, width: int = 0) -> tuple[np.ndarray, ...]:
    """Rows of a table (the whole table, a row group or a slice of one) as request ids, token
    indices, layer ids and the predicted lists ``[n, w]``; every list must have ``width``
    entries (0: the first row's). One decoder for ``load_predictions`` and a streamed run's
    ``sim.predictions.PredictionFile``."""
    rid = np.asarray(part.column("request_id")).astype(np.int64)
    tok = np.asarray(part.column("token_idx")).astype(np.int64)
    layer = np.asarray(part.column("layer")).astype(np.int64)
    if not len(rid):
        return rid, tok, layer, np.zeros((0, max(width, 1)), np.int16)
    arr = part.column("predicted")
    if hasattr(arr, "combine_chunks"):  # a table's column is chunked, a batch's is not
        arr = arr.combine_chunks()
    offs = arr.offsets.to_numpy().astype(np.int64)
    widths = np.diff(offs)
    w = width or int(widths[0])
    if (widths != w).any():
        raise TraceError("predicted lists differ in width", file=path, field="predicted")
    if w < 1:
        raise TraceError("predicted lists are empty", file=path, field="predicted")
    values = arr.values.to_numpy(zero_copy_only=False)[offs[0] : offs[-1]].reshape(-1, w)
    return rid, tok, layer, values


def check_rows(rid: np.ndarray, tok: np.ndarray, layer: np.ndarray, values: np.ndarray,
               num_experts: int | None, path: str | Path, at: int = 0) -> None:
    """Request ids and token indices >= 0, and (with ``num_experts``) :func:`_check_ids`;
    the first bad row is named as row ``at`` + its index (rows read from ``at`` on)."""
    if (tok < 0).any() or (rid < 0).any():
        bad = int(np.flatnonzero((tok < 0) | (rid < 0))[0])
        raise TraceError("negative request_id or token_idx", file=path, row=at + bad)
    if num_experts is not None:
        _check_ids(values, layer, int(num_experts), path, at)


def layer_index(layer: np.ndarray, layer_ids: Sequence[int], path: str | Path) -> np.ndarray:
    """Each row's layer id as its index among the trace's MoE layers ``layer_ids``; a layer
    that is not one of them is an error naming the first such row's."""
    ids = [int(x) for x in layer_ids]
    lut = np.full(max(ids, default=0) + 1, -1, np.int64)
    lut[ids] = np.arange(len(ids))
    known = (layer >= 0) & (layer < len(lut))
    known[known] = lut[layer[known]] >= 0
    if not known.all():
        raise TraceError(f"layer {int(layer[~known][0])} not in the trace's MoE layers {ids}",
                         file=path, field="layer")
    return lut[layer]


def fill_dense(out: dict[int, np.ndarray], rid: np.ndarray, tok: np.ndarray, lidx: np.ndarray,
               values: np.ndarray, num_layers: int) -> None:
    """Rows sorted by request (:func:`sorted_unique`) into ``out``: per request ``int16 [T, L,
    w]``, T its largest token index + 1, -1 where it has no row."""
    if not len(rid):
        return
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    ends = np.r_[starts[1:], len(rid)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        dense = np.full((int(tok[a:b].max()) + 1, num_layers, values.shape[1]), -1,
                        dtype=np.int16)
        dense[tok[a:b], lidx[a:b]] = values[a:b]
        out[int(rid[a])] = dense


def sorted_unique(rid: np.ndarray, tok: np.ndarray, layer: np.ndarray, values: np.ndarray,
                  path: str | Path, rows: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Rows in the trace's order (request, token, layer), each (request, token, layer) once.

    The table is read request by request, so rows written in another order (layer first, or
    one request's row moved to the end) used to split a request into pieces that overwrote
    each other, and a repeated row silently replaced the first: both ran with a wrong hit
    rate and 100 % coverage. Rows are sorted here (a stable sort: the file's order is kept
    where it is already right) and a repeated key is an error naming both rows (``rows``:
    each row's place in the file, where these are some of its rows; else their order)."""
    same_rid, same_tok = rid[1:] == rid[:-1], tok[1:] == tok[:-1]
    ordered = bool(np.all((rid[1:] > rid[:-1]) | (same_rid & (
        (tok[1:] > tok[:-1]) | (same_tok & (layer[1:] >= layer[:-1]))))))
    order = np.arange(len(rid)) if ordered else np.lexsort((layer, tok, rid))
    rid, tok, layer, values = rid[order], tok[order], layer[order], values[order]
    same = (rid[1:] == rid[:-1]) & (tok[1:] == tok[:-1]) & (layer[1:] == layer[:-1])
    if same.any():
        i = int(np.flatnonzero(same)[0])
        at = order if rows is None else rows[order]
        first, second = sorted((int(at[i]), int(at[i + 1])))
        raise TraceError(
            f"(request_id, token_idx, layer) = ({int(rid[i])}, {int(tok[i])}, {int(layer[i])}) "
            f"appears twice (rows {first} and {second}); each may have one row",
            file=path, row=second, field="layer",
        )
    return rid, tok, layer, values


def _check_ids(values: np.ndarray, layer: np.ndarray, num_experts: int, path: str | Path,
               at: int = 0) -> None:
    """Expert ids in [0, E) and distinct within each row; the first bad row is named (as row
    ``at`` + its index: rows read from ``at`` on)."""
    w = values.shape[1]
    if w > num_experts:
        raise TraceError(f"width {w} exceeds the trace's {num_experts} experts per layer",
                         file=path, field="predicted")
    bad = (values < 0) | (values >= num_experts)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        val = int(values[row][bad[row]][0])
        raise TraceError(
            f"expert id {val} at layer {int(layer[row])} is outside [0, {num_experts}) "
            "(the trace's experts per layer)", file=path, row=at + row, field="predicted",
        )
    if w > 1:
        srt = np.sort(values, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise TraceError(f"predicted ids repeat within a row: {values[row].tolist()}",
                             file=path, row=at + row, field="predicted")
