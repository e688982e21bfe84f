"""``moe-beyond-csv``: DeepSeek-V2-Lite routing CSVs from the MoE-Beyond repository.

SRC is a folder of ``prompt_N_data.csv`` (training), ``prompt_N_data_formatted.csv`` (test) or
``prompt_N_data_predicted.csv`` (test + MoE-Beyond's predictions) files, one prompt per file.
Rows are grouped by layer (all tokens of layer 1, then layer 2, ...); a token's position is its
order inside the layer block, so rows are regrouped per token here and the token texts are
checked to agree across layer blocks. ``request_id = N`` (requests ordered by N).

The recording is ONE prefill forward pass per prompt, so every token is marked prefill. For a
causal model a token's routing in a prefill pass equals its routing when decoded one token at a
time with the same prefix, so the simulator may replay these rows as a teacher-forced decode.

The ``predicted`` variant also writes a prediction table (:mod:`traces.predictions`) beside the
trace (``OUT.with_suffix('.predictions.parquet')`` unless ``predictions=`` is given).

Speed: each CSV is read by the Arrow CSV reader (all columns as strings) and the JSON-like id
lists are parsed with Arrow compute (strip brackets, split on commas, cast), never per row in
Python; ``workers=N`` parses files on N threads (default 1: faster on 2 cores).
"""

from __future__ import annotations

import csv
import io
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from moesim.traces.errors import TraceError
from moesim.traces.importers import ImportResult, register
from moesim.traces.importers._common import (
    card_or_error,
    check_id_rows,
    check_widths,
    meta_from_card,
)
from moesim.traces.importers.provenance import provenance
from moesim.traces.predictions import (
    SAME_LAYER,
    PredictionWriter,
    content_digest,
    trace_identity,
)
from moesim.traces.store import _write_to, atomic_path
from moesim.traces.trace import PREFILL, RequestRouting

FORMAT = "moe-beyond-csv"
_NAME = re.compile(r"^prompt_(\d+)_data(|_formatted|_predicted)\.csv$")
VARIANTS = {"": "training", "_formatted": "formatted", "_predicted": "predicted"}
LAYER, BATCH, TOKEN, ACTIVE, PREDICTED = (
    "Layer ID",
    "Batch Number",
    "Token",
    "Activated Expert IDs",
    "Predicted Expert IDs",
)
COLUMNS = {
    "training": (LAYER, BATCH, TOKEN, ACTIVE),
    "formatted": (LAYER, BATCH, TOKEN, ACTIVE),
    "predicted": (LAYER, TOKEN, ACTIVE, PREDICTED),
}


@dataclass
class _Parsed:
    """One prompt file, regrouped per token."""

    request_id: int
    experts: np.ndarray  # int16 [T, L, k]
    tokens: list[str] | None
    predicted: np.ndarray | None  # int16 [T, L, w]
    rows: int


def find_files(src: Path) -> tuple[str, list[tuple[int, Path]]]:
    """The variant and the ``(N, path)`` list sorted by N; one clear error if ambiguous."""
    if not src.is_dir():
        raise TraceError("expected a folder of prompt_N_data*.csv files", file=src)
    found: dict[str, list[tuple[int, Path]]] = {}
    for p in src.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.setdefault(VARIANTS[m.group(2)], []).append((int(m.group(1)), p))
    if not found:
        subs = sorted(
            d.name for d in src.iterdir() if d.is_dir() and any(d.glob("prompt_*_data*.csv"))
        )
        hint = f" (sub-folders with prompt files: {', '.join(subs)})" if subs else ""
        raise TraceError(f"no prompt_N_data*.csv files{hint}", file=src)
    if len(found) > 1:
        raise TraceError(
            f"mixed file variants {sorted(found)}; import one variant per folder", file=src
        )
    variant, files = next(iter(found.items()))
    return variant, sorted(files)


def _lines_of(data: bytes, n_rows: int) -> np.ndarray:
    """Line number where each data row starts (exact even with newlines inside quoted values)."""
    expected = n_rows + 1 if data.endswith(b"\n") else n_rows
    if data.count(b"\n") == expected:
        return np.arange(2, n_rows + 2)
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""))
    next(reader, None)
    starts, line = [], reader.line_num + 1
    for row in reader:
        if row:  # Arrow skips blank lines too
            starts.append(line)
        line = reader.line_num + 1
    return np.asarray(starts[:n_rows], dtype=np.int64)


def _diagnose(path: Path, data: bytes, columns: tuple[str, ...], arrow_msg: str) -> TraceError:
    """Slow path after Arrow refused the file: find the first bad line with the csv module."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return TraceError(f"not UTF-8 text ({exc.reason})", file=path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    for row in reader:
        if row and len(row) != len(columns):
            return TraceError(
                f"expected {len(columns)} columns, got {len(row)}",
                file=path,
                line=reader.line_num,
                field=columns[min(len(row), len(columns) - 1)],
            )
    return TraceError(f"malformed CSV ({arrow_msg}); header {header}", file=path)


def _parse_ids(
    col: pa.ChunkedArray, path: Path, lines: np.ndarray, field: str
) -> tuple[np.ndarray, np.ndarray]:
    """``"[8, 26, 56]"`` strings -> flat int values and per-row widths, vectorised."""
    arr = col.combine_chunks()
    ok = pc.and_(pc.starts_with(arr, "["), pc.ends_with(arr, "]"))
    ok = ok.to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.argmin(ok))
        raise TraceError(
            f"expected a [..] list of ids, got {arr[i].as_py()!r}",
            file=path,
            line=int(lines[i]),
            field=field,
        )
    parts = pc.split_pattern(pc.utf8_slice_codeunits(arr, 1, -1), ",")
    widths = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    try:
        values = pc.cast(flat, pa.int32()).to_numpy().astype(np.int64)
    except pa.ArrowInvalid:
        # find the row with the unparseable element
        bad = ~pc.match_substring_regex(flat, r"^-?[0-9]+$").to_numpy(zero_copy_only=False)
        elem = int(np.argmax(bad))
        i = int(np.searchsorted(np.cumsum(widths), elem, side="right"))
        raise TraceError(
            f"not a list of integer ids: {arr[i].as_py()!r}",
            file=path,
            line=int(lines[i]),
            field=field,
        ) from None
    return values, widths


def parse_file(
    path: Path,
    request_id: int,
    variant: str,
    layer_ids: tuple[int, ...],
    top_k: int,
    num_experts: int,
    partial: bool,
) -> _Parsed:
    """Read, validate and regroup one prompt file."""
    columns = COLUMNS[variant]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read ({exc.strerror})", file=path) from None
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise _diagnose(path, data, columns, str(exc)) from None
    for c in columns:
        if c not in table.column_names:
            raise TraceError(
                f"missing column (header is {table.column_names})", file=path, line=1, field=c
            )
    n = table.num_rows
    if n == 0:
        raise TraceError("no data rows", file=path, line=2)
    lines = _lines_of(data, n)

    def ints(name: str) -> np.ndarray:
        col = table.column(name)
        try:
            return pc.cast(col, pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            ok = pc.match_substring_regex(col, r"^\s*-?[0-9]+\s*$").to_numpy(zero_copy_only=False)
            i = int(np.argmin(ok))
            raise TraceError(
                f"not an integer: {col[i].as_py()!r}", file=path, line=int(lines[i]), field=name
            ) from None

    layer = ints(LAYER)
    if BATCH in columns:
        batch = ints(BATCH)
        if (batch != 0).any():
            i = int(np.argmax(batch != 0))
            raise TraceError(
                f"batch number {batch[i]}: only single-sequence (batch 0) files are supported",
                file=path,
                line=int(lines[i]),
                field=BATCH,
            )
    # layer blocks: each layer appears once, as one contiguous block, all blocks equal length
    starts = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])
    block_layers = layer[starts]
    sizes = np.diff(np.r_[starts, n])
    order = np.argsort(block_layers, kind="stable")
    repeated = np.flatnonzero(block_layers[order][1:] == block_layers[order][:-1])
    if len(repeated):
        b = int(max(order[repeated[0]], order[repeated[0] + 1]))
        raise TraceError(
            f"layer {block_layers[b]} appears in two separate blocks (duplicate rows or rows "
            "not grouped by layer)",
            file=path,
            line=int(lines[starts[b]]),
            field=LAYER,
        )
    known = {lid: j for j, lid in enumerate(layer_ids)}
    for b, lid in enumerate(block_layers.tolist()):
        if lid not in known:
            raise TraceError(
                f"layer {lid} is not an MoE layer of the model (MoE layers "
                f"{layer_ids[0]}..{layer_ids[-1]})",
                file=path,
                line=int(lines[starts[b]]),
                field=LAYER,
            )
    n_tok = int(sizes[0])
    if (sizes != n_tok).any():
        b = int(np.argmax(sizes != n_tok))
        raise TraceError(
            f"layer {block_layers[b]} has {sizes[b]} rows but layer {block_layers[0]} has "
            f"{n_tok}: tokens cannot be aligned across layers",
            file=path,
            line=int(lines[starts[b]]),
            field=LAYER,
        )
    if len(block_layers) != len(layer_ids) and not partial:
        missing = sorted(set(layer_ids) - set(block_layers.tolist()))
        raise TraceError(
            f"layers {missing} missing (pass partial=True to import a partial trace)",
            file=path,
            field=LAYER,
        )

    values, widths = _parse_ids(table.column(ACTIVE), path, lines, ACTIVE)
    check_widths(widths, top_k, file=path, lines=lines, field=ACTIVE)
    ids = values.reshape(n, top_k)
    check_id_rows(ids, num_experts, file=path, lines=lines, field=ACTIVE)

    tok_col = table.column(TOKEN).combine_chunks()
    tokens: list[str] | None
    if variant == "predicted":
        pos = ints(TOKEN)
        want = np.tile(np.arange(n_tok), len(block_layers))
        if (pos != want).any():
            i = int(np.argmax(pos != want))
            raise TraceError(
                f"token position {pos[i]}, expected {want[i]} (positions must run 0..T-1 in "
                "every layer block)",
                file=path,
                line=int(lines[i]),
                field=TOKEN,
            )
        tokens = None
    else:
        first = tok_col.slice(0, n_tok)
        tiled = first.take(pa.array(np.tile(np.arange(n_tok), len(block_layers))))
        same = pc.equal(tok_col, tiled).to_numpy(zero_copy_only=False)
        if not same.all():
            i = int(np.argmin(same))
            raise TraceError(
                f"token text {tok_col[i].as_py()!r} differs from {tiled[i].as_py()!r} at "
                f"position {i % n_tok} of layer {block_layers[0]}: rows cannot be regrouped "
                "per token",
                file=path,
                line=int(lines[i]),
                field=TOKEN,
            )
        tokens = first.to_pylist()

    jj = np.asarray([known[lid] for lid in block_layers.tolist()], dtype=np.int64)
    experts = np.full((n_tok, len(layer_ids), top_k), -1, dtype=np.int16)
    experts[:, jj] = ids.reshape(len(block_layers), n_tok, top_k).transpose(1, 0, 2)

    predicted = None
    if variant == "predicted":
        pvalues, pwidths = _parse_ids(table.column(PREDICTED), path, lines, PREDICTED)
        width = int(pwidths[0])
        check_widths(pwidths, width, file=path, lines=lines, field=PREDICTED)
        pids = pvalues.reshape(n, width)
        check_id_rows(pids, num_experts, file=path, lines=lines, field=PREDICTED)
        predicted = np.full((n_tok, len(layer_ids), width), -1, dtype=np.int16)
        predicted[:, jj] = pids.reshape(len(block_layers), n_tok, width).transpose(1, 0, 2)
    return _Parsed(request_id, experts, tokens, predicted, n)


def _parsed_in_order(files: list[tuple[int, Path]], workers: int, **kw: Any) -> Iterator[_Parsed]:
    """Parse files on a thread pool, yielding in file order with a bounded look-ahead."""
    if workers <= 1:
        for rid, path in files:
            yield parse_file(path, rid, **kw)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque[Future[_Parsed]] = deque()
        todo = iter(files)
        try:
            for rid, path in todo:
                window.append(pool.submit(parse_file, path, rid, **kw))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for fut in window:
                fut.cancel()


@register(FORMAT)
def import_moe_beyond_csv(
    src: Path,
    out: Path,
    *,
    card: str = "deepseek_v2_lite",
    predictions: str | Path | None = None,
    partial: bool = False,
    limit: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    source: str | None = None,
    license: str | None = None,
) -> ImportResult:
    """Import a folder of MoE-Beyond prompt CSVs (see module docstring)."""
    model = card_or_error(card)
    variant, files = find_files(src)
    if limit is not None:
        files = files[: int(limit)]
    repo, lic = provenance(src)
    notes = {
        "importer": FORMAT,
        "variant": variant,
        "phase": (
            "all tokens prefill: the source recorded one forward pass over each prompt (no "
            "generation); for a causal model a token's routing in prefill equals its routing "
            "when decoded one token at a time with the same prefix, so the simulator may "
            "replay the rows as a teacher-forced decode"
        ),
        "token_order": (
            "CSV rows are grouped by layer; a token's position is its order inside the layer "
            "block"
            + ("" if variant == "predicted" else "; token texts checked equal across blocks")
        ),
        "request_ids": "request_id = N of prompt_N_*.csv, ascending; label prompt_N"
        + (
            "; CAUTION: in the MoE-Beyond repository prompt_N of predicted_csvs is NOT "
            "prompt_N of formatted_csvs (the same 100 prompts in another order; they match "
            "one-to-one by content)"
            if variant == "predicted"
            else ""
        ),
        "expert_order": (
            "sorted ascending by the source (not router rank)"
            if variant == "predicted"
            else "as logged by the source; not guaranteed router rank order"
        ),
        "shared_experts": f"{model.num_shared_experts} shared experts always active, not listed",
        "scores": "none recorded",
    }
    meta = meta_from_card(
        model,
        source=source or f"{repo or 'MoE-Beyond'} [{src.name}, {variant} CSVs]",
        license=license or lic or "unknown",
        partial=bool(partial),
        notes=notes,
    )
    kw = dict(
        variant=variant,
        layer_ids=meta.moe_layers,
        top_k=meta.top_k,
        num_experts=meta.num_experts,
        partial=bool(partial),
    )
    # One parser thread is fastest on the 2-core box we measured (GIL-bound numpy parts); more
    # threads only pay off with many cores.
    n_workers = int(workers) if workers is not None else 1
    pred_path = None
    if variant == "predicted":
        pred_path = Path(predictions) if predictions else out.with_suffix(".predictions.parquet")
    elif predictions:
        raise TraceError(f"the {variant} variant has no predictions", file=src, field="predictions")

    def requests(pw: PredictionWriter | None) -> Iterator[RequestRouting]:
        source_iter = _parsed_in_order(files, n_workers, **kw)
        parsed: Iterator[_Parsed] = source_iter
        if progress:
            from tqdm import tqdm

            parsed = tqdm(source_iter, total=len(files), unit="file", desc=f"import {src.name}")
        try:
            for p in parsed:
                if pw is not None and p.predicted is not None:
                    pw.add(p.request_id, p.predicted)
                yield RequestRouting(
                    request_id=p.request_id,
                    experts=p.experts,
                    phase=np.full(p.experts.shape[0], PREFILL, dtype=np.uint8),
                    scores=None,
                    tokens=p.tokens,
                    label=f"prompt_{p.request_id}",
                )
        finally:
            source_iter.close()  # stop the thread pool at once if the writer failed

    with atomic_path(out) as tmp:
        if pred_path is None:
            summary = _write_to(tmp, meta, requests(None), None, 1 << 18, display=out)
        else:
            with atomic_path(pred_path) as ptmp:
                pw = PredictionWriter(ptmp, meta.moe_layers, available_at=SAME_LAYER)
                try:
                    summary = _write_to(tmp, meta, requests(pw), None, 1 << 18, display=out)
                    pw.trace = trace_identity(meta, content_digest(tmp))  # the trace as written
                    pw.close(
                        {
                            "model": meta.model,
                            "source": meta.source,
                            "predictor": "MoE-Beyond 4-layer transformer (authors' checkpoint)",
                            "notes": {
                                "available_at": (
                                    f"{SAME_LAYER}: the source gives no lead time; the "
                                    "prediction is for the layer it is keyed by"
                                ),
                                "order": "ids sorted ascending by the source",
                            },
                        }
                    )
                except BaseException:
                    pw.abort()
                    raise
    side = {"predictions": pred_path} if pred_path is not None else {}
    return ImportResult(out, meta, summary.requests, summary.tokens, summary.rows, side)
