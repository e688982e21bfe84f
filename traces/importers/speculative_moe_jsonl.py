"""``speculative-moe-jsonl``: Mixtral-8x7B routing logs of the speculative-moe project (vLLM).

Two file kinds, told apart by their rows:

* decode logs (``gsm8k_2_routing.jsonl``, ``humaneval_2_routing.jsonl``): one row per
  (problem, generated token, layer) with ``token_idx``, sorted by (problem, layer, token) -
  layer-major. Rows are re-sorted per token here. Only generated tokens are logged.
* raw profiler output (``routing_raw.jsonl``): rows in execution order with ``token_pos``.
  A new forward pass starts when the layer goes down (or repeats without the position going
  up). The first pass is the prefill (one row per prompt position and layer), then one pass per
  decode step (``token_pos`` always 0). Decode steps become tokens P, P+1, ... after the P
  prompt positions.

One request per (dataset, problem_id) of each file, in file order; labels ``gsm8k/0``, and
``humaneval/0@routing_raw`` for the raw run (a separate, earlier run of the same prompt).

Missing (token, layer) rows: the last tokens of each problem are often incomplete. With
``incomplete="drop"`` (default) trailing tokens that miss any layer are dropped;
``incomplete="keep"`` keeps them. Rows still missing after that (the raw run has gaps inside,
likely the profiler's exact-0.5/0.5 dummy filter) make the trace ``partial``; with
``strict=True`` they are an error instead. All counts go into the trace notes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.traces.errors import TraceError
from moesim.traces.importers import ImportResult, register
from moesim.traces.importers._common import (
    card_or_error,
    check_id_rows,
    get_ids_and_weights,
    get_int,
    iter_jsonl,
    meta_from_card,
    to_matrix,
)
from moesim.traces.importers.provenance import provenance
from moesim.traces.store import write_trace
from moesim.traces.trace import DECODE, PREFILL, RequestRouting

FORMAT = "speculative-moe-jsonl"


@dataclass
class _Rows:
    """Rows of one file, as arrays in file order."""

    path: Path
    raw: bool
    keys: list[tuple[str, int]]  # (dataset, problem_id) per row
    pos: np.ndarray  # token_idx (decode logs) or token_pos (raw)
    layer: np.ndarray
    ids: np.ndarray  # [n, k]
    probs: np.ndarray  # [n, k] float32
    lines: np.ndarray


@dataclass
class _Request:
    label: str
    experts: np.ndarray
    scores: np.ndarray
    phase: np.ndarray
    first_line: np.ndarray  # [T, L] line of each row (0 = missing) for messages
    path: Path
    dropped_tail: int = 0
    gap_rows: int = 0
    info: list[str] = field(default_factory=list)


def find_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(p for p in src.glob("*.jsonl") if "routing" in p.name)
    if not files:
        raise TraceError("no *routing*.jsonl files here", file=src)
    return files


def read_rows(path: Path, layer_ids: tuple[int, ...], k: int) -> _Rows:
    keys, pos, layer, ids, probs, lines = [], [], [], [], [], []
    raw: bool | None = None
    for no, obj in iter_jsonl(path):
        is_raw = "token_pos" in obj and "token_idx" not in obj
        if raw is None:
            raw = is_raw
        elif raw != is_raw:
            raise TraceError(
                "mixes token_idx rows and token_pos rows", file=path, line=no, field="token_idx"
            )
        dataset = obj.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise TraceError(
                f"expected a dataset name, got {dataset!r}", file=path, line=no, field="dataset"
            )
        keys.append((dataset, get_int(obj, "problem_id", path, no)))
        pos.append(get_int(obj, "token_pos" if is_raw else "token_idx", path, no))
        layer.append(get_int(obj, "layer", path, no))
        row_ids, row_p = get_ids_and_weights(
            obj, "experts", "gating_probs", path, no, nouns=("probabilities", "experts")
        )
        ids.append(row_ids)
        probs.append(row_p)
        lines.append(no)
    if raw is None:
        raise TraceError("no rows", file=path)
    line_arr = np.asarray(lines, dtype=np.int64)
    layer_arr = np.asarray(layer, dtype=np.int64)
    known = np.isin(layer_arr, np.asarray(layer_ids))
    if not known.all():
        i = int(np.argmin(known))
        raise TraceError(
            f"layer {layer_arr[i]} is not an MoE layer of the model",
            file=path,
            line=int(line_arr[i]),
            field="layer",
        )
    mat = to_matrix(ids, k, path, line_arr, "experts")
    pmat = np.asarray(probs, dtype=np.float32).reshape(len(probs), k)
    return _Rows(path, raw, keys, np.asarray(pos, np.int64), layer_arr, mat, pmat, line_arr)


def _groups(rows: _Rows) -> list[tuple[tuple[str, int], np.ndarray]]:
    """Row indices per (dataset, problem), in order of first appearance; raw groups contiguous."""
    order: dict[tuple[str, int], list[int]] = {}
    last = None
    for i, key in enumerate(rows.keys):
        if rows.raw and key != last and key in order:
            raise TraceError(
                f"rows of {key[0]}/{key[1]} are not contiguous (execution order expected)",
                file=rows.path,
                line=int(rows.lines[i]),
                field="problem_id",
            )
        order.setdefault(key, []).append(i)
        last = key
    return [(key, np.asarray(idx, dtype=np.int64)) for key, idx in order.items()]


def _raw_positions(rows: _Rows, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Token index and phase per row of one raw group (passes split as in the docstring)."""
    pos, layer = rows.pos[idx], rows.layer[idx]
    new = np.ones(len(idx), dtype=bool)
    new[1:] = (layer[1:] < layer[:-1]) | ((layer[1:] == layer[:-1]) & (pos[1:] <= pos[:-1]))
    pass_no = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    n_pass = len(starts)
    bounds = np.r_[starts, len(idx)]
    decode_like = np.array([(pos[a:b] == 0).all() for a, b in itertools.pairwise(bounds)])
    prefill_passes = np.flatnonzero(~decode_like)
    if len(prefill_passes) > 1 or (len(prefill_passes) == 1 and prefill_passes[0] != 0):
        p = int(prefill_passes[1] if len(prefill_passes) > 1 else prefill_passes[0])
        raise TraceError(
            "a multi-position (prefill) pass after the first pass is not supported",
            file=rows.path,
            line=int(rows.lines[idx[starts[p]]]),
            field="token_pos",
        )
    if len(prefill_passes):
        n_prompt = int(pos[: bounds[1]].max()) + 1
        tok = np.where(pass_no == 0, pos, n_prompt + pass_no - 1)
        phase = np.where(pass_no == 0, PREFILL, DECODE)
        desc = f"prefill pass of {n_prompt} positions + {n_pass - 1} decode steps"
    else:
        n_prompt = 0
        tok = pass_no
        phase = np.full(len(idx), DECODE)
        desc = f"{n_pass} decode steps, no prefill pass"
    return tok, phase.astype(np.uint8), desc


def build_request(
    rows: _Rows, key: tuple[str, int], idx: np.ndarray, layer_ids: tuple[int, ...], k: int
) -> _Request:
    if rows.raw:
        tok, row_phase, desc = _raw_positions(rows, idx)
    else:
        tok = rows.pos[idx]
        row_phase = np.full(len(idx), DECODE, dtype=np.uint8)
        desc = f"{int(tok.max()) + 1} generated tokens"
    n_layers = len(layer_ids)
    lut = np.full(int(max(layer_ids)) + 1, -1, dtype=np.int64)
    lut[np.asarray(layer_ids)] = np.arange(n_layers)
    lidx = lut[rows.layer[idx]]
    lines = rows.lines[idx]
    flat = tok * n_layers + lidx
    order = np.argsort(flat, kind="stable")
    dup = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        raise TraceError(
            f"duplicate row for {key[0]}/{key[1]} token {tok[b]} layer {rows.layer[idx[b]]} "
            f"(first at line {lines[a]})",
            file=rows.path,
            line=int(lines[b]),
            field="token_pos" if rows.raw else "token_idx",
        )
    n_tok = int(tok.max()) + 1
    experts = np.full((n_tok, n_layers, k), -1, dtype=np.int16)
    scores = np.full((n_tok, n_layers, k), np.nan, dtype=np.float32)
    line_grid = np.zeros((n_tok, n_layers), dtype=np.int64)
    experts[tok, lidx] = rows.ids[idx]
    scores[tok, lidx] = rows.probs[idx]
    line_grid[tok, lidx] = lines
    phase = np.full(n_tok, DECODE, dtype=np.uint8)
    phase[tok] = row_phase
    has_row = (line_grid > 0).any(axis=1)
    if not has_row.all():
        t = int(np.argmin(has_row))
        raise TraceError(
            f"{key[0]}/{key[1]}: token {t} has no rows at any layer (tokens up to {n_tok - 1} "
            "are present)",
            file=rows.path,
            field="token_pos" if rows.raw else "token_idx",
        )
    label = f"{key[0]}/{key[1]}" + (f"@{rows.path.stem}" if rows.raw else "")
    return _Request(label, experts, scores, phase, line_grid, rows.path, info=[desc])


def _trim_tail(req: _Request, keep: bool) -> None:
    complete = (req.first_line > 0).all(axis=1)
    n_tail = 0
    while n_tail < len(complete) and not complete[len(complete) - 1 - n_tail]:
        n_tail += 1
    if n_tail and not keep:
        if n_tail == len(complete):
            raise TraceError(
                f"{req.label}: no token has every layer; use incomplete='keep'",
                file=req.path,
                field="layer",
            )
        t = len(complete) - n_tail
        req.experts, req.scores = req.experts[:t], req.scores[:t]
        req.phase, req.first_line = req.phase[:t], req.first_line[:t]
        req.dropped_tail = n_tail
    req.gap_rows = int((req.first_line == 0).sum())


@register(FORMAT)
def import_speculative_moe(
    src: Path,
    out: Path,
    *,
    card: str = "mixtral_8x7b",
    incomplete: str = "drop",
    strict: bool = False,
    source: str | None = None,
    license: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Import speculative-moe routing JSONL files (see module docstring)."""
    del progress  # small inputs
    if incomplete not in ("drop", "keep"):
        raise TraceError(
            f"incomplete must be 'drop' or 'keep', got {incomplete!r}", field="incomplete"
        )
    model = card_or_error(card)
    layer_ids, k = model.moe_layers, model.top_k
    parsed = [read_rows(p, layer_ids, k) for p in find_files(src)]
    parsed.sort(key=lambda r: (r.raw, r.path.name))
    requests: list[_Request] = []
    for rows in parsed:
        check_id_rows(
            rows.ids, model.num_experts, file=rows.path, lines=rows.lines, field="experts"
        )
        for key, idx in _groups(rows):
            req = build_request(rows, key, idx, layer_ids, k)
            _trim_tail(req, keep=incomplete == "keep")
            requests.append(req)
    labels = [r.label for r in requests]
    for i, r in enumerate(requests):
        if labels.count(r.label) > 1:
            r.label = f"{r.label}@{r.path.stem}#{i}"
    gaps = [r for r in requests if r.gap_rows]
    if gaps and strict:
        r = gaps[0]
        t, j = np.argwhere(r.first_line == 0)[0]
        seen = r.first_line[t][r.first_line[t] > 0]
        raise TraceError(
            f"{r.label} token {t} misses layer {layer_ids[j]} ({int((r.first_line[t] > 0).sum())}"
            f" of {len(layer_ids)} layers; strict=True forbids a partial trace)",
            file=r.path,
            line=int(seen.min()) if len(seen) else None,
            field="layer",
        )
    total_tail = sum(r.dropped_tail for r in requests)
    notes = {
        "importer": FORMAT,
        "files": ", ".join(
            f"{r.path.name} ({'raw execution order' if r.raw else 'decode, layer-major'})"
            for r in parsed
        ),
        "requests": "; ".join(
            f"{i}={r.label}: {', '.join(r.info)}" for i, r in enumerate(requests)
        ),
        "phase": (
            "decode logs hold generated tokens only (prefill excluded by the collector); the "
            "raw run's first pass is its prefill"
        ),
        "incomplete_tail_tokens": (
            f"{total_tail} trailing tokens missing some layer were "
            + ("dropped" if incomplete == "drop" else "kept")
            + " ("
            + ", ".join(f"{r.label}: {r.dropped_tail}" for r in requests if r.dropped_tail)
            + ")"
            if total_tail or incomplete == "drop"
            else "kept"
        ),
        "missing_rows": (
            f"{sum(r.gap_rows for r in requests)} (token, layer) rows missing after tail "
            "handling ("
            + ", ".join(f"{r.label}: {r.gap_rows}" for r in gaps)
            + "); likely the profiler's exact 0.5/0.5 dummy-row filter"
            if gaps
            else "none"
        ),
        "scores": "top-2 gate probabilities renormalised to sum 1 (descending)",
        "weights": (
            "source ran Mixtral-8x7B-Instruct-v0.1-FP8 (router unquantised); expert_bytes is "
            f"the card's {model.dtype} size"
        ),
    }
    repo, lic = provenance(src)
    meta = meta_from_card(
        model,
        source=source or f"{repo or 'speculative-moe'} [{', '.join(r.path.name for r in parsed)}]",
        license=license or lic or "unknown",
        partial=bool(gaps),
        notes=notes,
    )
    stream = (
        RequestRouting(i, r.experts, r.phase, r.scores, None, r.label)
        for i, r in enumerate(requests)
    )
    summary = write_trace(out, meta, stream)
    return ImportResult(out, meta, summary.requests, summary.tokens, summary.rows)
