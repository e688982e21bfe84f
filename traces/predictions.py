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
width, available_at, notes{}, counts{rows}``. The predictors issue consumes it through
:func:`load_predictions`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from traces.errors import TraceError
from traces.schema import FORMAT_VERSION, dumps

PRED_META_KEY = b"moesim.predictions"
SAME_LAYER = "routed:same_layer"
PRED_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int32(), nullable=False),
        pa.field("token_idx", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("predicted", pa.list_(pa.int16()), nullable=False),
        pa.field("available_at", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    ]
)


class PredictionWriter:
    """Streaming writer; requests are added as dense ``[T, L, w]`` arrays (-1 = no row)."""

    def __init__(
        self,
        path: str | Path,
        layer_ids: tuple[int, ...],
        *,
        available_at: str = SAME_LAYER,
        row_group_rows: int = 1 << 18,
    ) -> None:
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


def load_predictions(path: str | Path, layer_ids: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Predictions per request id as ``int16 [T, L, w]`` (-1 where no prediction row).

    ``T`` is the largest predicted token index + 1; pass the trace's ``moe_layers`` as
    ``layer_ids`` so the layer axis matches the trace arrays.
    """
    read_predictions_meta(path)
    table = pq.read_table(str(path), columns=["request_id", "token_idx", "layer", "predicted"])
    if table.num_rows == 0:
        return {}
    rid = table.column("request_id").to_numpy().astype(np.int64)
    tok = table.column("token_idx").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    arr = table.column("predicted").combine_chunks()
    offs = arr.offsets.to_numpy().astype(np.int64)
    widths = np.diff(offs)
    w = int(widths[0])
    if (widths != w).any():
        raise TraceError("predicted lists differ in width", file=path, field="predicted")
    values = arr.values.to_numpy()[offs[0] : offs[-1]].reshape(-1, w)
    lut = {lid: j for j, lid in enumerate(layer_ids)}
    try:
        lidx = np.fromiter((lut[x] for x in layer.tolist()), dtype=np.int64, count=len(layer))
    except KeyError as exc:
        raise TraceError(
            f"layer {exc.args[0]} not in layer_ids", file=path, field="layer"
        ) from None
    out: dict[int, np.ndarray] = {}
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    ends = np.r_[starts[1:], len(rid)]
    for a, b in zip(starts, ends, strict=True):
        dense = np.full((int(tok[a:b].max()) + 1, len(layer_ids), w), -1, dtype=np.int16)
        dense[tok[a:b], lidx[a:b]] = values[a:b]
        out[int(rid[a])] = dense
    return out
