"""``vllm-routes-jsonl``: per-layer route logs written by vLLM ``FusedMoE`` logging patches.

SRC is one ``.jsonl`` log or a folder of them (one MoE layer per file, e.g. Qwen1.5-MoE
``moe_layer{0,8,12,18,23}.jsonl``). Line 1 is ``{"type": "meta", "model_id", "top_k",
"layers_logged", ...}``; every other line is ``{"type": "route", "req_id", "token_idx",
"layer", "topk_ids", "topk_weights"}``.

What the logs do not record, and how this importer decides it (every decision and every count
is written into the trace's ``notes``):

* Warm-up rows. vLLM first runs memory-profiling / warm-up dummy passes whose expert ids are
  constant (the same expert *set* on every row). If ``token_idx`` restarts at 0 per forward
  pass, leading passes whose rows all share one expert set (and have >= ``min_dummy_rows``
  rows) are dropped. If ``token_idx`` is one global counter (OLMoE log), the leading run of
  rows with the first row's expert set is dropped. ``dummy_rows=N`` overrides detection.
* Layers. Each file is a separate run of one layer; files are joined by row index (row i of
  every file = the same token). The importer checks that the ``token_idx`` sequences after
  dropping warm-up rows are identical, but cross-run alignment remains an assumption. Only the
  logged layers are in the trace (``moe_layers``) and ``partial`` is set.
* Requests. There are no request ids (``req_id`` is constant), and decode passes mix up to
  one token of every running request. ``segment="pass"`` (default) makes each engine forward
  pass one request (``request_id`` = pass number, label ``pass/i``), which keeps the batch
  structure an expert cache sees; ``segment="stream"`` makes the whole workload one request.
  A global-counter log has no pass boundaries, so it is always one request.
* Phase. With pass boundaries: the passes up to the last one with more tokens than there are
  prompts (``num_prompts``; read from the folder's prompts file if present; otherwise the
  largest pass) are prefill, the rest decode. Without boundaries: the first ``prefill_rows``
  rows are prefill; by default estimated from ``timing.json`` as rows - generated tokens +
  prompts (each request's first token comes from its prefill pass), else all decode.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from moesim.traces.model_card import ModelCard, list_cards, load_card
from moesim.traces.store import write_trace
from moesim.traces.trace import DECODE, PREFILL, RequestRouting

FORMAT = "vllm-routes-jsonl"
PROMPT_SEPARATOR = "\n\n---\n\n"


@dataclass
class _Log:
    """One layer's route log after parsing."""

    path: Path
    header: dict[str, Any]
    layer: int
    token_idx: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [n, k]
    weights: np.ndarray  # float32 [n, k]
    lines: np.ndarray  # int64 [n]
    dropped: int = 0
    dropped_desc: str = ""


def _is_log(path: Path) -> bool:
    try:
        with path.open("r", encoding="utf-8") as fh:
            for text in fh:
                if text.strip():
                    obj = json.loads(text)
                    return isinstance(obj, dict) and obj.get("type") == "meta"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def find_logs(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise TraceError("no such file or folder", file=src)
    logs = [p for p in sorted(src.glob("*.jsonl")) if _is_log(p)]
    if not logs:
        raise TraceError(
            'no vLLM route logs here (a .jsonl whose first line is {"type": "meta", ...})',
            file=src,
        )
    return logs


def card_for_model(model_id: str) -> ModelCard | None:
    """The card whose ``hf_id`` is the longest prefix of ``model_id`` (case-insensitive)."""
    best: ModelCard | None = None
    for name in list_cards():
        card = load_card(name)
        matches = bool(card.hf_id) and model_id.lower().startswith(card.hf_id.lower())
        if matches and (best is None or len(card.hf_id) > len(best.hf_id)):
            best = card
    return best


def _check_header(path: Path, no: int, header: dict[str, Any]) -> None:
    if header.get("type") != "meta":
        raise TraceError(
            f'first line must be the {{"type": "meta"}} header, got type {header.get("type")!r}',
            file=path,
            line=no,
            field="type",
        )


def read_header(path: Path) -> dict[str, Any]:
    """The meta line alone (to pick the model card before parsing rows)."""
    first = next(iter_jsonl(path), None)
    if first is None:
        raise TraceError("empty file", file=path, line=1)
    _check_header(path, *first)
    return first[1]


def read_log(path: Path, model: ModelCard) -> _Log:
    """Parse one log; the header must come first and every route row must be well-formed."""
    rows = iter_jsonl(path)
    first = next(rows, None)
    if first is None:
        raise TraceError("empty file", file=path, line=1)
    no, header = first
    _check_header(path, no, header)
    for key, want in (("top_k", model.top_k), ("num_experts", model.num_experts)):
        if key in header and header[key] != want:
            raise TraceError(
                f"{key} {header[key]} but model card {model.name} has {want}",
                file=path,
                line=no,
                field=key,
            )
    k = model.top_k
    tok, layers, ids, weights, lines = [], [], [], [], []
    for no, obj in rows:
        if obj.get("type") != "route":
            raise TraceError(
                f"expected a route row, got type {obj.get('type')!r}",
                file=path,
                line=no,
                field="type",
            )
        tok.append(get_int(obj, "token_idx", path, no))
        layers.append(get_int(obj, "layer", path, no))
        row_ids, row_w = get_ids_and_weights(
            obj, "topk_ids", "topk_weights", path, no, nouns=("weights", "ids")
        )
        ids.append(row_ids)
        weights.append(row_w)
        lines.append(no)
    if not tok:
        raise TraceError("no route rows", file=path)
    line_arr = np.asarray(lines, dtype=np.int64)
    layer_arr = np.asarray(layers, dtype=np.int64)
    if (layer_arr != layer_arr[0]).any():
        i = int(np.argmax(layer_arr != layer_arr[0]))
        raise TraceError(
            f"layer {layer_arr[i]} in a log of layer {layer_arr[0]}: one layer per file "
            "expected (rows of different layers cannot be aligned to tokens)",
            file=path,
            line=int(line_arr[i]),
            field="layer",
        )
    logged = header.get("layers_logged")
    if isinstance(logged, list) and logged and int(layer_arr[0]) not in logged:
        raise TraceError(
            f"layer {layer_arr[0]} not in the header's layers_logged {logged}",
            file=path,
            line=int(line_arr[0]),
            field="layer",
        )
    mat = to_matrix(ids, k, path, line_arr, "topk_ids")
    wmat = np.asarray(weights, dtype=np.float32).reshape(len(weights), k)
    return _Log(path, header, int(layer_arr[0]), np.asarray(tok, np.int64), mat, wmat, line_arr)


def pass_starts(token_idx: np.ndarray) -> np.ndarray:
    """Row indices where a forward pass starts (``token_idx`` is not previous + 1)."""
    brk = np.ones(len(token_idx), dtype=bool)
    brk[1:] = token_idx[1:] != token_idx[:-1] + 1
    return np.flatnonzero(brk)


def detect_dummy(log: _Log, min_rows: int) -> tuple[int, str]:
    """Number of leading warm-up rows and a description (see module docstring)."""
    sets = np.sort(log.ids, axis=1)
    starts = pass_starts(log.token_idx)
    bounds = np.r_[starts, len(sets)]
    if len(starts) > 1:
        drop, sizes = 0, []
        for a, b in itertools.pairwise(bounds):
            if b - a >= min_rows and (sets[a:b] == sets[a]).all():
                drop, sizes = int(b), [*sizes, int(b - a)]
            else:
                break
        if not sizes:
            return 0, "none detected"
        kinds = sorted({tuple(sets[a].tolist()) for a in bounds[: len(sizes)]})
        return drop, (
            f"{drop} rows = {len(sizes)} leading forward passes of "
            f"{'+'.join(map(str, sizes))} rows, each with one constant expert set "
            f"{', '.join(str(list(s)) for s in kinds)}"
        )
    same = (sets == sets[0]).all(axis=1)
    run = int(np.argmin(same)) if not same.all() else len(same)
    if run < min_rows:
        return 0, "none detected"
    return run, (
        f"{run} leading rows (token_idx {log.token_idx[0]}..{log.token_idx[run - 1]} of a "
        f"global counter) with constant expert set {sets[0].tolist()}"
    )


def _count_prompts(folder: Path, explicit: int | None) -> tuple[int | None, str]:
    if explicit is not None:
        return int(explicit), "num_prompts option"
    for p in sorted(folder.glob("*.txt")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if PROMPT_SEPARATOR in text:
            return len([c for c in text.split(PROMPT_SEPARATOR) if c.strip()]), p.name
    return None, "unknown"


def _generated_tokens(folder: Path) -> int | None:
    p = folder / "timing.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return int(data["log"]["tokens_generated"])
    except (ValueError, KeyError, TypeError):
        return None


@register(FORMAT)
def import_vllm_routes(
    src: Path,
    out: Path,
    *,
    card: str | None = None,
    segment: str = "pass",
    num_prompts: int | None = None,
    prefill_rows: int | None = None,
    dummy_rows: int | None = None,
    min_dummy_rows: int = 16,
    source: str | None = None,
    license: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Import vLLM route logs (see module docstring for every assumption)."""
    del progress  # small inputs; nothing worth a progress bar
    if segment not in ("pass", "stream"):
        raise TraceError(f"segment must be 'pass' or 'stream', got {segment!r}", field="segment")
    paths = find_logs(src)
    folder = src if src.is_dir() else src.parent
    model: ModelCard | None
    if card is not None:
        model = card_or_error(card)
    else:
        model_id = str(read_header(paths[0]).get("model_id", ""))
        model = card_for_model(model_id)
        if model is None:
            raise TraceError(
                f"no model card matches model_id {model_id!r}; pass card=<name>",
                file=paths[0],
                line=1,
                field="model_id",
            )
    logs: list[_Log] = []
    for path in paths:
        log = read_log(path, model)
        if log.layer not in model.moe_layers:
            raise TraceError(
                f"layer {log.layer} is not an MoE layer of {model.name}",
                file=path,
                line=int(log.lines[0]),
                field="layer",
            )
        if any(o.layer == log.layer for o in logs):
            raise TraceError(f"layer {log.layer} logged by two files", file=path, field="layer")
        check_id_rows(log.ids, model.num_experts, file=path, lines=log.lines, field="topk_ids")
        if dummy_rows is not None:
            log.dropped = int(dummy_rows)
            log.dropped_desc = f"{log.dropped} leading rows (dummy_rows option)"
        else:
            log.dropped, log.dropped_desc = detect_dummy(log, int(min_dummy_rows))
        if log.dropped >= len(log.ids):
            raise TraceError(
                "every row looks like a warm-up row; nothing left", file=path, field="topk_ids"
            )
        logs.append(log)
    logs.sort(key=lambda o: o.layer)
    ref = logs[0]
    ref_tok = ref.token_idx[ref.dropped :]
    for log in logs[1:]:
        tok = log.token_idx[log.dropped :]
        m = min(len(tok), len(ref_tok))
        diff = np.flatnonzero(tok[:m] != ref_tok[:m])
        if len(diff) or len(tok) != len(ref_tok):
            i = int(diff[0]) if len(diff) else m  # first differing (or first extra) real row
            line = int(log.lines[log.dropped + min(i, len(tok) - 1)])
            raise TraceError(
                f"after dropping warm-up rows this log has {len(tok)} rows and differs from "
                f"{ref.path.name} ({len(ref_tok)} rows) at real row {i}: the files cannot be "
                "joined by row index",
                file=log.path,
                line=line,
                field="token_idx",
            )

    n = len(ref_tok)
    starts = pass_starts(ref_tok)
    sizes = np.diff(np.r_[starts, n])
    n_prompts, prompts_from = _count_prompts(folder, num_prompts)
    phase = np.full(n, DECODE, dtype=np.uint8)
    if len(starts) > 1:
        big = np.flatnonzero(sizes > n_prompts) if n_prompts is not None else np.array([])
        last_prefill = int(big[-1]) if len(big) else int(np.argmax(sizes))
        phase[: int(starts[last_prefill] + sizes[last_prefill])] = PREFILL
        phase_note = (
            f"passes 0..{last_prefill} prefill ({int(sizes[: last_prefill + 1].sum())} "
            f"tokens), later passes decode: "
            + (
                f"the last pass with more tokens than the {n_prompts} prompts "
                f"({prompts_from}) is the last prefill pass"
                if len(big)
                else "the largest pass is taken as the last prefill pass"
            )
            + "; a prefill pass may also carry a decode token of an earlier request"
        )
    else:
        generated = _generated_tokens(folder)
        if prefill_rows is not None:
            n_pre = int(prefill_rows)
            phase_note = f"first {n_pre} rows prefill (prefill_rows option), rest decode"
        elif generated is not None and n_prompts is not None and 0 < n - generated + n_prompts < n:
            n_pre = n - generated + n_prompts
            phase_note = (
                f"no pass boundaries recorded; first {n_pre} rows marked prefill, an ESTIMATE: "
                f"{n} rows - {generated} generated tokens (timing.json log run) + {n_prompts} "
                f"prompts ({prompts_from}), since each request's first token comes from its "
                "prefill pass; exact only if timing.json describes this very run"
            )
        else:
            n_pre = 0
            phase_note = "no pass boundaries and no prefill estimate: all rows marked decode"
        phase[: max(0, min(n, n_pre))] = PREFILL

    layer_ids = tuple(o.layer for o in logs)
    k = model.top_k
    experts = np.stack([o.ids[o.dropped :] for o in logs], axis=1).astype(np.int16)  # [n, L, k]
    scores = np.stack([o.weights[o.dropped :] for o in logs], axis=1)
    if segment == "pass" and len(starts) > 1:
        bounds = np.r_[starts, n]
        segments = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        seg_note = (
            f"one request per engine forward pass ({len(segments)} passes; request_id = pass "
            "number, label pass/i); token_idx = row inside the pass; the logs carry no request "
            "identity and a decode pass holds one token of each running request"
        )
    else:
        segments = [(0, n)]
        seg_note = "the whole workload is one request (token order = log order)"
        if len(starts) <= 1:
            seg_note += "; the log has no pass boundaries (global token counter)"
    wsum = float(scores.sum(axis=2).mean())
    notes = {
        "importer": FORMAT,
        "model_id": str(ref.header.get("model_id", "")),
        "engine": ", ".join(
            f"{key}={ref.header[key]}"
            for key in ("vllm_version", "torch_version", "device", "seed")
            if key in ref.header
        ),
        "files": ", ".join(f"{o.path.name}=layer {o.layer}" for o in logs),
        "dropped_warmup_rows": "; ".join(f"{o.path.name}: {o.dropped_desc}" for o in logs),
        "dropped_warmup_rows_total": str(sum(o.dropped for o in logs)),
        "segmentation": seg_note,
        "pass_sizes": " ".join(map(str, sizes.tolist())),
        "phase": phase_note,
        "scores": (
            f"top-{k} router probabilities renormalised to sum 1"
            if abs(wsum - 1.0) < 1e-3
            else f"top-{k} softmax probabilities over all {model.num_experts} experts, not "
            f"renormalised (mean row sum {wsum:.3f})"
        ),
        "layers": (
            f"only layers {list(layer_ids)} of {model.name}'s {model.num_moe_layers} MoE layers "
            "were logged"
        ),
        "shared_experts": f"{model.num_shared_experts} shared experts always active, not listed",
    }
    if len(logs) > 1:
        notes["row_join"] = (
            "ASSUMPTION: each layer file comes from a separate greedy run; row i of every file "
            "is taken to be the same token (checked: identical token_idx sequences after "
            "dropping warm-up rows; runs are not guaranteed bit-identical)"
        )
    if any(q in notes["model_id"].upper() for q in ("GPTQ", "AWQ", "INT4", "INT8", "FP8")):
        notes["weights"] = (
            f"the source ran quantized weights ({notes['model_id']}); routing may differ from "
            f"the {model.dtype} model and expert_bytes is the card's {model.dtype} size"
        )
    repo, lic = provenance(src)
    meta = meta_from_card(
        model,
        moe_layers=layer_ids,
        source=source or f"{repo or 'vLLM route log'} [{', '.join(p.name for p in paths)}]",
        license=license or lic or "unknown",
        partial=layer_ids != model.moe_layers,
        notes=notes,
    )
    requests = (
        RequestRouting(
            request_id=i,
            experts=experts[a:b],
            phase=phase[a:b],
            scores=scores[a:b],
            tokens=None,
            label=f"pass/{i}" if len(segments) > 1 else "stream",
        )
        for i, (a, b) in enumerate(segments)
    )
    summary = write_trace(out, meta, requests)
    return ImportResult(out, meta, summary.requests, summary.tokens, summary.rows)
