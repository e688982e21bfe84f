"""Read and write project trace files (format in :mod:`traces.schema`).

Both directions stream: the writer flushes a row group every ``row_group_rows`` rows and the
reader converts whole record batches with numpy over the Arrow list offsets, so a trace larger
than memory can be replayed request by request, and the 2.4 M-row DeepSeek set loads in about a
second. The writer goes through a temporary file in the target directory that is renamed into
place only on success, so a failure never leaves a half-written trace behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moesim.traces.errors import TraceError
from moesim.traces.schema import (
    FEATURE_PREFIX,
    META_KEY,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SCHEMA,
    check_meta,
    dumps,
    feature_field,
    meta_from_dict,
    meta_to_dict,
)
from moesim.traces.trace import RequestRouting, Trace, TraceMeta

DEFAULT_ROW_GROUP_ROWS = 1 << 18
DEFAULT_BATCH_ROWS = 1 << 18


@dataclass(frozen=True)
class FeatureSpec:
    """A per-row feature column ``feat.<name>``: ``dim`` values of ``dtype`` per (token, layer)."""

    dim: int
    dtype: str = "float16"
    description: str = ""

    def declaration(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": [int(self.dim)], "where": "column"}
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class TraceSummary:
    """Counts of a written or scanned trace."""

    requests: int
    tokens: int
    rows: int


# ----------------------------------------------------------------------------------------------
# atomic output


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the body succeeds.

    Same directory so that ``os.replace`` is an atomic rename on one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: that creates mode 0600; the writer creates the file with normal permissions
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# writing


class TraceWriter:
    """Validating, streaming writer of one trace file (use :func:`write_trace` normally).

    Every request is checked before it is buffered: shape ``[T, L, k]``, ids in range and
    distinct per row, rows either fully recorded or fully ``-1``, missing rows only when
    ``meta.partial``, request ids strictly increasing.
    """

    def __init__(
        self,
        path: str | Path,
        meta: TraceMeta,
        *,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        display_path: str | Path | None = None,
        features: Mapping[str, FeatureSpec] | None = None,
    ) -> None:
        self._where = str(display_path or path)
        check_meta(meta, self._where)
        self.meta = meta
        self._layer_ids = np.asarray(meta.moe_layers, dtype=np.int16)
        self._row_group_rows = max(1, int(row_group_rows))
        self.features = dict(features or {})
        fields = [feature_field(n, f.dtype, f.dim) for n, f in self.features.items()]
        self._schema = pa.schema([*SCHEMA, *fields]) if fields else SCHEMA
        self._writer = pq.ParquetWriter(str(path), self._schema, compression="zstd")
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._last_rid: int | None = None
        self.requests = 0
        self.tokens = 0
        self.rows = 0
        self.has_scores = False
        self.has_tokens = False

    def _err(self, msg: str, field: str) -> TraceError:
        return TraceError(msg, file=self._where, field=field)

    def add(self, req: RequestRouting, features: Mapping[str, np.ndarray] | None = None) -> None:
        """Validate one request and buffer its rows.

        ``features[name]`` is ``[T, L, dim]`` (values of unrecorded rows are ignored); every
        feature declared to the constructor must be given, no other.
        """
        meta = self.meta
        rid = int(req.request_id)
        tag = f"request {rid}"
        if not -(2**31) <= rid < 2**31:
            raise self._err(f"{tag}: request_id does not fit int32", "request_id")
        if self._last_rid is not None and rid <= self._last_rid:
            raise self._err(
                f"{tag}: request ids must be strictly increasing (previous {self._last_rid})",
                "request_id",
            )
        ex = np.asarray(req.experts)
        shape = (meta.num_moe_layers, meta.top_k)
        if ex.ndim != 3 or ex.shape[1:] != shape:
            raise self._err(
                f"{tag}: experts has shape {ex.shape}, expected (tokens, {shape[0]}, {shape[1]})",
                "experts",
            )
        if not np.issubdtype(ex.dtype, np.integer):
            raise self._err(f"{tag}: experts must be integers, got {ex.dtype}", "experts")
        n_tok = ex.shape[0]
        if n_tok == 0:
            raise self._err(f"{tag}: has no tokens", "token_idx")
        phase = np.asarray(req.phase)
        if phase.min() < 0 or phase.max() > 1:
            raise self._err(f"{tag}: phase values must be 0 (prefill) or 1 (decode)", "phase")

        bad = (ex < -1) | (ex >= meta.num_experts)
        if bad.any():
            t, j, r = np.argwhere(bad)[0]
            raise self._err(
                f"{tag} token {t} layer {self._layer_ids[j]}: expert id {ex[t, j, r]} out of "
                f"range [0, {meta.num_experts})",
                "experts",
            )
        recorded = ex >= 0
        full = recorded.all(axis=2)
        mixed = recorded.any(axis=2) & ~full
        if mixed.any():
            t, j = np.argwhere(mixed)[0]
            raise self._err(
                f"{tag} token {t} layer {self._layer_ids[j]}: row mixes -1 with expert ids",
                "experts",
            )
        t_idx, j_idx = np.nonzero(full)
        ids = ex[t_idx, j_idx]  # [n, k]
        if meta.top_k > 1:
            srt = np.sort(ids, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if dup.any():
                i = int(np.argmax(dup))
                raise self._err(
                    f"{tag} token {t_idx[i]} layer {self._layer_ids[j_idx[i]]}: duplicate expert "
                    f"ids {ids[i].tolist()}",
                    "experts",
                )
        if not full.all():
            has_row = full.any(axis=1)
            if not has_row.all():
                t = int(np.argmin(has_row))
                raise self._err(f"{tag} token {t}: no layer recorded", "experts")
            if not meta.partial:
                t, j = np.argwhere(~full)[0]
                raise self._err(
                    f"{tag} token {t} layer {self._layer_ids[j]}: row missing but the trace "
                    "is not marked partial",
                    "experts",
                )

        n = len(t_idx)
        k = meta.top_k
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        experts = pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1).astype(np.int16)))
        if req.scores is not None:
            sc = np.asarray(req.scores, dtype=np.float32)
            if sc.shape != ex.shape:
                raise self._err(f"{tag}: scores shape {sc.shape} != experts {ex.shape}", "scores")
            sc_rows = sc[t_idx, j_idx]
            null = np.isnan(sc_rows).all(axis=1)
            scores = pa.ListArray.from_arrays(
                offsets, pa.array(sc_rows.reshape(-1)), mask=pa.array(null)
            )
            self.has_scores = self.has_scores or not bool(null.all())
        else:
            scores = pa.nulls(n, pa.list_(pa.float32()))
        if req.tokens is not None:
            if len(req.tokens) != n_tok:
                raise self._err(f"{tag}: {len(req.tokens)} token texts for {n_tok} tokens", "token")
            tok_arr = pa.array(list(req.tokens), pa.string()).take(pa.array(t_idx))
            self.has_tokens = True
        else:
            tok_arr = pa.nulls(n, pa.string())
        if req.label is not None:
            labels = pa.array([str(req.label)], pa.string()).take(pa.array(np.zeros(n, np.int32)))
        else:
            labels = pa.nulls(n, pa.string())
        feat_cols = self._feature_columns(tag, features or {}, ex.shape[:2], t_idx, j_idx)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(np.full(n, rid, dtype=np.int32)),
                pa.array(t_idx.astype(np.int32)),
                pa.array(phase.astype(np.uint8)[t_idx]),
                pa.array(self._layer_ids[j_idx]),
                experts,
                scores,
                tok_arr,
                labels,
                *feat_cols,
            ],
            schema=self._schema,
        )
        self._pending.append(batch)
        self._pending_rows += n
        self._last_rid = rid
        self.requests += 1
        self.tokens += n_tok
        self.rows += n
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _feature_columns(
        self,
        tag: str,
        features: Mapping[str, np.ndarray],
        tl: tuple[int, ...],
        t_idx: np.ndarray,
        j_idx: np.ndarray,
    ) -> list[pa.Array]:
        extra = sorted(set(features) - set(self.features))
        if extra:
            raise self._err(f"{tag}: undeclared feature {extra[0]!r}", FEATURE_PREFIX + extra[0])
        cols = []
        for name, spec in self.features.items():
            if name not in features:
                raise self._err(f"{tag}: feature {name!r} missing", FEATURE_PREFIX + name)
            arr = np.asarray(features[name])
            if arr.shape != (*tl, spec.dim):
                raise self._err(
                    f"{tag}: feature {name!r} has shape {arr.shape}, expected {(*tl, spec.dim)}",
                    FEATURE_PREFIX + name,
                )
            rows = np.ascontiguousarray(arr[t_idx, j_idx].astype(spec.dtype)).reshape(-1)
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(rows), int(spec.dim)))
        return cols

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self._schema)
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
            self._pending = []
            self._pending_rows = 0

    def close(self, meta: TraceMeta | None = None) -> TraceSummary:
        """Flush, store the metadata (``meta`` may add notes found while streaming), close."""
        meta = meta or self.meta
        if tuple(meta.moe_layers) != tuple(self.meta.moe_layers) or meta.top_k != self.meta.top_k:
            raise self._err("final metadata changes the layer set or top_k", "moe_layers")
        self._flush()
        summary = TraceSummary(self.requests, self.tokens, self.rows)
        payload = meta_to_dict(
            meta,
            has_scores=self.has_scores,
            has_tokens=self.has_tokens,
            counts={"requests": summary.requests, "tokens": summary.tokens, "rows": summary.rows},
            features={n: f.declaration() for n, f in self.features.items()},
        )
        self._writer.add_key_value_metadata({META_KEY: dumps(payload)})
        self._writer.close()
        return summary

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # already failing; the caller deletes the file
            self._writer.close()


def write_trace(
    path: str | Path,
    meta: TraceMeta,
    requests: Iterable[RequestRouting],
    *,
    final_notes: Callable[[], Mapping[str, str]] | None = None,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
) -> TraceSummary:
    """Write ``requests`` (ascending request ids) to ``path`` atomically.

    ``final_notes`` is called after the last request; its entries are merged into
    ``meta.notes`` (importers use it for counts only known after streaming the source).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        return _write_to(tmp, meta, requests, final_notes, row_group_rows, display=path)


def _write_to(
    tmp: Path,
    meta: TraceMeta,
    requests: Iterable[RequestRouting],
    final_notes: Callable[[], Mapping[str, str]] | None,
    row_group_rows: int,
    display: Path,
) -> TraceSummary:
    writer = TraceWriter(tmp, meta, row_group_rows=row_group_rows, display_path=display)
    try:
        for req in requests:
            writer.add(req)
        if writer.requests == 0:
            raise TraceError("no requests to write", file=display)
        if final_notes is not None:
            meta = replace(meta, notes={**meta.notes, **final_notes()})
        return writer.close(meta)
    except BaseException:
        writer.abort()
        close = getattr(requests, "close", None)
        if close is not None:  # stop a generator (and any pool behind it) now, not at GC time
            close()
        raise


# ----------------------------------------------------------------------------------------------
# reading


def _open(path: str | Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.is_file():
        raise TraceError("no such trace file", file=path)
    try:
        return pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"not a readable parquet file ({exc})", file=path) from None


def read_header(path: str | Path) -> dict[str, Any]:
    """The raw JSON metadata object (includes ``counts``, ``has_scores``, ``has_tokens``)."""
    pf = _open(path)
    kv = pf.metadata.metadata or {}
    if META_KEY not in kv:
        raise TraceError(
            f"no {META_KEY.decode()} metadata: not a moesim trace", file=path, field="metadata"
        )
    try:
        data = json.loads(kv[META_KEY].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"metadata is not JSON ({exc})", file=path, field="metadata") from None
    if not isinstance(data, dict):
        raise TraceError("metadata must be a JSON object", file=path, field="metadata")
    return data


def read_meta(path: str | Path) -> TraceMeta:
    """Model and provenance metadata of a trace file, without reading any rows."""
    return meta_from_dict(read_header(path), where=str(path))


class _Decoder:
    """Turns sorted record batches into :class:`RequestRouting` objects, checking the order."""

    def __init__(self, path: str | Path, header: Mapping[str, Any], validate: bool) -> None:
        self.path = str(path)
        self.meta = meta_from_dict(header, where=self.path)
        self.has_scores = bool(header.get("has_scores", True))
        self.has_tokens = bool(header.get("has_tokens", True))
        self.validate = validate
        ids = np.asarray(self.meta.moe_layers, dtype=np.int64)
        self.lut = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        self.lut[ids] = np.arange(len(ids))
        self.last_rid: int | None = None
        self.row0 = 0  # file row number of the next table's first row

    def _err(self, msg: str, row: int | None, field: str) -> TraceError:
        return TraceError(msg, file=self.path, row=row, field=field)

    @staticmethod
    def _list(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        offs = arr.offsets.to_numpy().astype(np.int64)
        values = arr.values.to_numpy(zero_copy_only=False)[offs[0] : offs[-1]]
        return arr, offs - offs[0], values

    def decode(self, table: pa.Table) -> list[RequestRouting]:
        n = table.num_rows
        if n == 0:
            return []
        meta, k, n_layers = self.meta, self.meta.top_k, self.meta.num_moe_layers
        row0 = self.row0
        self.row0 += n
        rid = table.column("request_id").to_numpy().astype(np.int64)
        tok = table.column("token_idx").to_numpy().astype(np.int64)
        phase = table.column("phase").to_numpy().astype(np.int64)
        layer = table.column("layer").to_numpy().astype(np.int64)

        # layer ids -> dense index
        known = (layer >= 0) & (layer < len(self.lut))
        lidx = np.where(known, self.lut[np.clip(layer, 0, len(self.lut) - 1)], -1)
        if (lidx < 0).any():
            i = int(np.argmax(lidx < 0))
            raise self._err(f"layer {layer[i]} is not in moe_layers", row0 + i, "layer")

        new_req = np.ones(n, dtype=bool)
        new_req[1:] = rid[1:] != rid[:-1]
        new_tok = new_req.copy()
        new_tok[1:] |= tok[1:] != tok[:-1]
        # ordering: request ids strictly increase, tokens contiguous from 0, layers increase
        prev_rid = np.empty(n, dtype=np.int64)
        prev_rid[1:] = rid[:-1]
        prev_rid[0] = -(2**40) if self.last_rid is None else self.last_rid
        bad = new_req & (rid <= prev_rid)
        if bad.any():
            i = int(np.argmax(bad))
            raise self._err(
                f"request_id {rid[i]} after {prev_rid[i]}: rows not sorted by request or "
                "request not contiguous",
                row0 + i,
                "request_id",
            )
        prev_tok = np.empty(n, dtype=np.int64)
        prev_tok[1:] = tok[:-1]
        prev_tok[0] = -1
        want = np.where(new_req, 0, prev_tok + 1)
        bad = new_tok & (tok != want)
        if bad.any():
            i = int(np.argmax(bad))
            raise self._err(
                f"token_idx {tok[i]} where {want[i]} expected (tokens must be sorted and "
                "contiguous from 0 within a request)",
                row0 + i,
                "token_idx",
            )
        bad = ~new_tok
        bad[1:] &= lidx[1:] <= lidx[:-1]
        if bad.any():
            i = int(np.argmax(bad))
            raise self._err(
                f"layer {layer[i]} after layer {layer[i - 1]} in the same token: duplicate row "
                "or rows not sorted by layer",
                row0 + i,
                "layer",
            )
        bad = ~new_tok
        bad[1:] &= phase[1:] != phase[:-1]
        if bad.any():
            i = int(np.argmax(bad))
            raise self._err("phase differs between rows of one token", row0 + i, "phase")
        if phase.min() < 0 or phase.max() > 1:
            i = int(np.argmax((phase < 0) | (phase > 1)))
            raise self._err(f"phase {phase[i]} is not 0 or 1", row0 + i, "phase")

        # experts
        arr, offs, values = self._list(table.column("experts"))
        if arr.null_count:
            i = int(np.argmax(~arr.is_valid().to_numpy(zero_copy_only=False)))
            raise self._err("experts is null", row0 + i, "experts")
        widths = np.diff(offs)
        if (widths != k).any():
            i = int(np.argmax(widths != k))
            raise self._err(f"{widths[i]} experts, expected top_k={k}", row0 + i, "experts")
        ids = values.reshape(n, k)
        if self.validate:
            self._check_ids(ids, row0)

        tg = np.cumsum(new_tok) - 1
        n_tok = int(tg[-1]) + 1
        if not meta.partial:
            per_tok = np.bincount(tg, minlength=n_tok)
            if (per_tok != n_layers).any():
                t = int(np.argmax(per_tok != n_layers))
                i = int(np.flatnonzero(new_tok)[t])
                raise self._err(
                    f"token has {per_tok[t]} of {n_layers} layers but the trace is not marked "
                    "partial",
                    row0 + i,
                    "layer",
                )
        experts = np.full((n_tok, n_layers, k), -1, dtype=np.int16)
        experts[tg, lidx] = ids
        tok_rows = np.flatnonzero(new_tok)
        phases = phase[tok_rows].astype(np.uint8)

        scores = None
        if self.has_scores and "scores" in table.column_names:
            sarr, soffs, svalues = self._list(table.column("scores"))
            valid = sarr.is_valid().to_numpy(zero_copy_only=False)
            if valid.any():
                swidths = np.diff(soffs)
                bad = valid & (swidths != k)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise self._err(f"{swidths[i]} scores, expected {k}", row0 + i, "scores")
                starts = soffs[:-1][valid]
                sv = svalues.astype(np.float32)[starts[:, None] + np.arange(k)]
                scores = np.full((n_tok, n_layers, k), np.nan, dtype=np.float32)
                scores[tg[valid], lidx[valid]] = sv
        tokens = None
        if self.has_tokens and "token" in table.column_names:
            tokens = table.column("token").take(pa.array(tok_rows)).to_pylist()
        labels = None
        req_rows = np.flatnonzero(new_req)
        if "request_label" in table.column_names:
            labels = table.column("request_label").take(pa.array(req_rows)).to_pylist()

        bounds = np.append(tg[req_rows], n_tok)
        # a request whose rows all lack scores / token texts gets None, as it was written
        req_has_scores = np.zeros(len(req_rows), dtype=bool)
        if scores is not None:
            tok_has = ~np.isnan(scores[:, :, 0]).all(axis=1)
            req_has_scores = np.add.reduceat(tok_has, bounds[:-1]) > 0
        out = []
        for q in range(len(req_rows)):
            a, b = int(bounds[q]), int(bounds[q + 1])
            texts = None if tokens is None else tokens[a:b]
            if texts is not None and all(x is None for x in texts):
                texts = None
            out.append(
                RequestRouting(
                    request_id=int(rid[req_rows[q]]),
                    experts=experts[a:b],
                    phase=phases[a:b],
                    scores=scores[a:b] if req_has_scores[q] else None,
                    tokens=texts,
                    label=None if labels is None else labels[q],
                )
            )
        self.last_rid = int(rid[-1])
        return out

    def _check_ids(self, ids: np.ndarray, row0: int) -> None:
        e = self.meta.num_experts
        bad = (ids < 0) | (ids >= e)
        if bad.any():
            i, r = np.argwhere(bad)[0]
            raise self._err(
                f"expert id {ids[i, r]} out of range [0, {e})", row0 + int(i), "experts"
            )
        if ids.shape[1] > 1:
            srt = np.sort(ids, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if dup.any():
                i = int(np.argmax(dup))
                raise self._err(f"duplicate expert ids {ids[i].tolist()}", row0 + i, "experts")


def _columns(pf: pq.ParquetFile, path: str | Path) -> list[str]:
    names = set(pf.schema_arrow.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise TraceError("required column missing", file=path, field=missing[0])
    return [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]


def _batches(pf: pq.ParquetFile, batch_rows: int, columns: list[str]
             ) -> Iterator[pa.RecordBatch]:
    """The file's record batches in order, one batch reader per row group: pyarrow's (26)
    reader over the whole file keeps Arrow buffers of the row groups it has passed alive (its
    live memory grew by ~1.5 MB per 2.6 M rows of the DeepSeek trace, so a streamed replay of a
    long file grew with it); one reader per row group stays flat."""
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=max(1, int(batch_rows)), row_groups=[group],
                                   columns=columns)


def iter_requests(
    path: str | Path, *, batch_rows: int = DEFAULT_BATCH_ROWS, validate: bool = True,
    requests: Iterable[int] | None = None, routing_only: bool = False,
) -> Iterator[RequestRouting]:
    """Stream the requests of a trace, one row batch in memory at a time.

    A request that spans batches is carried over until its last row has been read, so only the
    largest request (not the file) has to fit in memory. ``requests``: only these request ids
    (rows of others are dropped before decoding; reading stops after the last one).
    ``routing_only``: leave scores, token texts and labels unread (a replay needs none).
    """
    pf = _open(path)
    header = read_header(path)
    decoder = _Decoder(path, header, validate)
    columns = _columns(pf, path)
    if routing_only:
        columns = [c for c in columns if c in REQUIRED_COLUMNS]
    pending: list[pa.RecordBatch] = []
    wanted = last_wanted = None
    if requests is not None:
        ids = sorted({int(r) for r in requests})
        wanted = pa.array(ids, type=pf.schema_arrow.field(columns[0]).type)
        last_wanted = ids[-1] if ids else None
    try:
        for batch in _batches(pf, batch_rows, columns):
            if wanted is not None:
                if last_wanted is None:
                    break
                past = batch.num_rows and batch.column(0)[-1].as_py() > last_wanted
                batch = batch.filter(pc.is_in(batch.column(0), value_set=wanted))
                if past and batch.num_rows == 0:
                    break
            if batch.num_rows == 0:
                continue
            rid = batch.column(0).to_numpy()
            other = np.flatnonzero(rid != rid[-1])
            cut = int(other[-1]) + 1 if len(other) else 0
            if cut == 0:
                pending.append(batch)
                continue
            table = pa.Table.from_batches([*pending, batch.slice(0, cut)])
            pending = [batch.slice(cut)]
            yield from decoder.decode(table)
        if pending:
            yield from decoder.decode(pa.Table.from_batches(pending))
    except pa.ArrowException as exc:
        raise TraceError(f"cannot read rows ({exc})", file=path) from None


def iter_request_chunks(
    path: str | Path, requests_per_chunk: int, *, batch_rows: int = DEFAULT_BATCH_ROWS,
    max_requests: int | None = None,
) -> Iterator[list[RequestRouting]]:
    """The trace's requests in file order, ``requests_per_chunk`` at a time (the last chunk
    may be shorter), so that a streamed replay (``sim.stream``) holds one chunk, never the
    file; ``max_requests``: stop after that many."""
    if requests_per_chunk < 1:
        raise TraceError(f"requests per chunk must be >= 1, got {requests_per_chunk}",
                         file=path)
    reqs: Iterator[RequestRouting] = iter_requests(path, batch_rows=batch_rows,
                                                   routing_only=True)
    if max_requests is not None:
        reqs = islice(reqs, max(0, int(max_requests)))
    while chunk := list(islice(reqs, int(requests_per_chunk))):
        yield chunk


def load_trace(path: str | Path, max_requests: int | None = None,
               requests: Iterable[int] | None = None) -> Trace:
    """Load a whole trace (or its first ``max_requests`` requests, of ``requests`` if given)
    into memory; other requests are never decoded.

    Decodes row batches of ``DEFAULT_BATCH_ROWS`` (faster and ~3x less peak memory than one
    whole-table read: the DeepSeek training set loads in ~0.6 s, +0.2 GB).
    """
    reqs = iter_requests(path, requests=requests)
    if max_requests is not None:
        reqs = islice(reqs, max(0, int(max_requests)))
    requests = list(reqs)
    return Trace(read_meta(path), requests)


def read_request_ids(path: str | Path) -> list[int]:
    """The trace's request ids in file order, reading only that column (to choose requests,
    e.g. a held-out split, before loading them)."""
    pf = _open(path)
    col = pf.read(columns=[_columns(pf, path)[0]]).column(0).to_numpy()
    if not len(col):
        return []
    starts = np.concatenate([[True], col[1:] != col[:-1]])
    return [int(x) for x in col[starts]]


def feature_specs(path: str | Path) -> dict[str, FeatureSpec]:
    """Feature columns declared in a trace's metadata (empty for plain traces)."""
    out = {}
    for name, decl in dict(read_header(path).get("features") or {}).items():
        try:
            out[str(name)] = FeatureSpec(
                dim=int(decl["shape"][0]),
                dtype=str(decl.get("dtype", "float16")),
                description=str(decl.get("description", "")),
            )
        except (KeyError, IndexError, TypeError, ValueError):
            raise TraceError("malformed feature declaration", file=path, field=name) from None
    return out


def iter_features(
    path: str | Path, name: str, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[np.ndarray]:
    """Stream ``feat.<name>`` as ``[rows, dim]`` blocks in file row order."""
    specs = feature_specs(path)
    if name not in specs:
        raise TraceError(
            f"no feature {name!r} (declared: {sorted(specs) or 'none'})", file=path, field=name
        )
    pf = _open(path)
    col = FEATURE_PREFIX + name
    if col not in pf.schema_arrow.names:
        raise TraceError("declared feature column missing", file=path, field=col)
    dim = specs[name].dim
    try:
        for batch in pf.iter_batches(batch_size=max(1, int(batch_rows)), columns=[col]):
            arr = batch.column(0)
            if arr.null_count:
                raise TraceError("feature value is null", file=path, field=col)
            values = arr.flatten().to_numpy(zero_copy_only=False)
            yield values.reshape(len(arr), dim)
    except pa.ArrowException as exc:
        raise TraceError(f"cannot read rows ({exc})", file=path, field=col) from None


def load_features(path: str | Path, name: str) -> np.ndarray:
    """Whole ``feat.<name>`` column as ``[rows, dim]``, aligned with the file's row order.

    Row ``i`` belongs to the i-th (request, token, layer) row, i.e. the order in which
    :func:`iter_requests` visits recorded ``(token, layer)`` pairs (token-major, then layer).
    """
    blocks = list(iter_features(path, name))
    if not blocks:
        dim = feature_specs(path)[name].dim
        return np.zeros((0, dim), dtype=np.float16)
    return np.concatenate(blocks, axis=0)


def scan_counts(path: str | Path) -> tuple[TraceSummary, dict[str, int]]:
    """Count requests, tokens, rows and tokens per phase from the key columns only."""
    pf = _open(path)
    requests = tokens = rows = 0
    phases = np.zeros(2, dtype=np.int64)
    last = (None, None)
    for batch in pf.iter_batches(columns=["request_id", "token_idx", "phase"]):
        rid = batch.column(0).to_numpy().astype(np.int64)
        tok = batch.column(1).to_numpy().astype(np.int64)
        ph = batch.column(2).to_numpy().astype(np.int64)
        if not len(rid):
            continue
        new_req, new_tok = _starts(rid, tok, last)
        requests += int(new_req.sum())
        tokens += int(new_tok.sum())
        rows += len(rid)
        phases += np.bincount(np.clip(ph[new_tok], 0, 1), minlength=2)
        last = (int(rid[-1]), int(tok[-1]))
    by_phase = {"prefill": int(phases[0]), "decode": int(phases[1])}
    return TraceSummary(requests, tokens, rows), by_phase


def _starts(rid: np.ndarray, tok: np.ndarray, last: tuple[int | None, int | None]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a batch of (request, token) keys that start a new request / a new token, given
    the key the previous batch ended with (a request or token may span batches)."""
    new_req = np.ones(len(rid), dtype=bool)
    new_req[1:] = rid[1:] != rid[:-1]
    new_req[0] = rid[0] != last[0]
    new_tok = new_req.copy()
    new_tok[1:] |= tok[1:] != tok[:-1]
    new_tok[0] |= tok[0] != last[1]
    return new_req, new_tok


def request_lengths(path: str | Path, *, batch_rows: int = DEFAULT_BATCH_ROWS) -> np.ndarray:
    """Tokens of every request in file order (int64), from the key columns only: what a
    streamed run needs to know of a trace before it replays it (8 B per request)."""
    pf = _open(path)
    lengths: list[np.ndarray] = []
    last = (None, None)
    carry = 0  # tokens of the request the previous batch ended in
    for batch in _batches(pf, batch_rows, ["request_id", "token_idx"]):
        rid = batch.column(0).to_numpy().astype(np.int64)
        tok = batch.column(1).to_numpy().astype(np.int64)
        if not len(rid):
            continue
        new_req, new_tok = _starts(rid, tok, last)
        per_req = np.add.reduceat(new_tok.astype(np.int64), np.flatnonzero(new_req)) if (
            new_req.any()) else np.zeros(0, np.int64)
        if not new_req[0]:  # the batch continues the previous batch's last request
            head = int(new_tok[:np.argmax(new_req) if new_req.any() else len(rid)].sum())
            carry += head
        if new_req.any():
            if last[0] is not None:
                lengths.append(np.array([carry], np.int64))
            lengths.append(per_req[:-1])
            carry = int(per_req[-1])
        last = (int(rid[-1]), int(tok[-1]))
    if last[0] is not None:
        lengths.append(np.array([carry], np.int64))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def validate_trace(path: str | Path) -> TraceSummary:
    """Re-check every rule of the format; raise :class:`TraceError` on the first violation."""
    header = read_header(path)
    pf = _open(path)
    for name in SCHEMA.names:
        if name in pf.schema_arrow.names:
            have = pf.schema_arrow.field(name).type
            want = SCHEMA.field(name).type
            if have != want:
                raise TraceError(f"type {have}, expected {want}", file=path, field=name)
    requests = tokens = rows = 0
    for req in iter_requests(path, validate=True):
        requests += 1
        tokens += req.num_tokens
        rows += int(np.count_nonzero(req.experts[:, :, 0] >= 0))
    summary = TraceSummary(requests, tokens, rows)
    counts = header.get("counts") or {}
    for key, value in (("requests", requests), ("tokens", tokens), ("rows", rows)):
        if key in counts and int(counts[key]) != value:
            raise TraceError(
                f"metadata says {counts[key]} {key}, file has {value}", file=path, field="counts"
            )
    if requests == 0:
        raise TraceError("trace has no rows", file=path)
    return summary
