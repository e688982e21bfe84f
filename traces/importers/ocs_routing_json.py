"""``ocs-routing-json``: routing captures of the moe_ocs_learning repository (MLX and vLLM-Metal on
Apple Silicon), e.g. ``routing_pretrained.json`` or ``<group>/routing.json``.

SRC is one capture file or a folder of them (``*.json`` files holding a ``routes`` key; others,
such as ``manifest.json``, are skipped). Each file is one prompt and becomes one request
(folder files in name order, ``request_id`` 0, 1, ...; label = file name). A file is one JSON
object: ``meta`` (``num_moe_layers``, ``num_experts``, ``top_k``, ``backend``, ...),
``prompt_tokens``, ``generated_tokens`` and ``routes``, one entry per token fed to the model,
in order: ``{"token_pos", "token_id", "token_str", "phase": "prefill"|"decode",
"layers": {"0": {"experts": [...], "weights": [...]}, ...}}``.

Why experts are sorted here: the vLLM-Metal capture lists each cell's experts in ascending
weight, the MLX one in descending; moesim's rank order is descending weight, so every cell is
sorted by weight (stable) and the notes say how many cells were reversed. Weights are stored as
logged; the notes give the range of their per-cell sums, which tells raw softmax mass (Qwen1.5,
``norm_topk_prob=False``, sums well below 1) from renormalised weights (sums about 1). Token
ids travel as the feature column ``feat.token_id`` (int32), token texts in ``token``.

The card comes from ``meta`` (256 experts / top-8 / 40 layers: ``qwen36_35b_a3b``; 60 / 4 / 24:
``qwen15_moe_a27b``); ``card=`` overrides.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim.traces.errors import TraceError
from moesim.traces.importers import ImportResult, register
from moesim.traces.importers._common import card_or_error, check_id_rows, meta_from_card
from moesim.traces.importers.provenance import provenance
from moesim.traces.store import FeatureSpec, TraceWriter, atomic_path
from moesim.traces.trace import DECODE, PREFILL, RequestRouting

FORMAT = "ocs-routing-json"
# (num_experts, top_k, num_moe_layers) of meta -> card
CARDS = {(256, 8, 40): "qwen36_35b_a3b", (60, 4, 24): "qwen15_moe_a27b"}
PHASE_CODES = {"prefill": PREFILL, "decode": DECODE}


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise TraceError("expected a capture .json file or a folder of them", file=src)
    files = []
    for p in sorted(src.glob("*.json")):
        try:
            with p.open("rb") as fh:
                if b'"routes"' in fh.read():
                    files.append(p)
        except OSError as exc:
            raise TraceError(f"cannot read ({exc.strerror})", file=p) from None
    if not files:
        raise TraceError("no *.json capture with a 'routes' key", file=src)
    return files


def _load(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except OSError as exc:
        raise TraceError(f"cannot read ({exc.strerror})", file=path) from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"not UTF-8 text ({exc.reason})", file=path) from None
    except json.JSONDecodeError as exc:
        raise TraceError(f"malformed JSON ({exc.msg})", file=path, line=exc.lineno) from None
    if not isinstance(obj, dict):
        raise TraceError("top level is not a JSON object", file=path)
    for key in ("meta", "routes"):
        if key not in obj:
            raise TraceError("required key missing", file=path, field=key)
    if not isinstance(obj["meta"], dict):
        raise TraceError("not an object", file=path, field="meta")
    if not isinstance(obj["routes"], list) or not obj["routes"]:
        raise TraceError("not a non-empty list", file=path, field="routes")
    return obj


def _int(obj: dict[str, Any], key: str, path: Path, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TraceError(f"{where}: expected an integer, got {v!r}", file=path, field=key)
    return v


def _parse(path: Path, obj: dict[str, Any], n_layers: int, k: int, n_experts: int):
    """``experts [T, L, k]``, ``scores``, ``phase [T]``, token ids, texts, reversed-cell count."""
    routes = obj["routes"]
    T = len(routes)
    ex = np.empty((T, n_layers, k), dtype=np.int64)
    sc = np.empty((T, n_layers, k), dtype=np.float64)
    phase = np.empty(T, dtype=np.uint8)
    tok_id = np.empty((T, 1), dtype=np.int32)
    texts: list[str] = []
    keys = [str(j) for j in range(n_layers)]
    for t, r in enumerate(routes):
        where = f"routes[{t}]"
        if not isinstance(r, dict):
            raise TraceError(f"{where}: not an object", file=path, field="routes")
        pos = _int(r, "token_pos", path, where)
        if pos != t:
            raise TraceError(f"{where}: token_pos {pos}, expected {t} (positions must run "
                             "0..T-1)", file=path, field="token_pos")
        if r.get("phase") not in PHASE_CODES:
            raise TraceError(f"{where}: phase {r.get('phase')!r} not prefill or decode",
                             file=path, field="phase")
        phase[t] = PHASE_CODES[r["phase"]]
        tid = _int(r, "token_id", path, where)
        if not 0 <= tid < 2**31:
            raise TraceError(f"{where}: token_id {tid} out of range", file=path,
                             field="token_id")
        tok_id[t, 0] = tid
        s = r.get("token_str")
        texts.append(s if isinstance(s, str) else "")
        layers = r.get("layers")
        if not isinstance(layers, dict) or sorted(layers, key=str) != sorted(keys):
            got = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise TraceError(f"{where}: layers {str(got)[:80]}, expected '0'..'{n_layers - 1}'",
                             file=path, field="layers")
        for j, key in enumerate(keys):
            cell = layers[key]
            e = cell.get("experts") if isinstance(cell, dict) else None
            w = cell.get("weights") if isinstance(cell, dict) else None
            ok_e = isinstance(e, list) and len(e) == k and all(
                isinstance(x, int) and not isinstance(x, bool) for x in e)
            ok_w = isinstance(w, list) and len(w) == k and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
            if not (ok_e and ok_w):
                raise TraceError(f"{where}, layer {key}: expected {k} integer experts and {k} "
                                 "numeric weights", file=path, field="experts")
            ex[t, j] = e
            sc[t, j] = w
    if not np.isfinite(sc).all() or (sc < 0).any():
        t = int(np.argwhere(~np.isfinite(sc) | (sc < 0))[0][0])
        raise TraceError(f"routes[{t}]: a weight is not a finite number >= 0", file=path,
                         field="weights")
    if (np.diff(phase.astype(np.int64)) < 0).any():
        raise TraceError("a prefill token follows a decode token", file=path, field="phase")
    check_id_rows(ex.reshape(-1, k), n_experts, file=path,
                  lines=np.repeat(np.arange(T), n_layers), field="experts")
    order = np.argsort(-sc, axis=2, kind="stable")
    reversed_cells = int((order[..., 0] == k - 1).sum()) if k > 1 else 0
    ex = np.take_along_axis(ex, order, axis=2)
    sc = np.take_along_axis(sc, order, axis=2)
    return ex.astype(np.int16), sc.astype(np.float32), phase, tok_id, texts, reversed_cells


@register(FORMAT)
def import_ocs_routing_json(
    src: Path,
    out: Path,
    *,
    card: str | None = None,
    source: str | None = None,
    license: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Import moe_ocs_learning routing captures (see module docstring)."""
    del progress  # a few files; nothing worth a progress bar
    files = _files(src)
    loaded = [(p, _load(p)) for p in files]
    meta0 = loaded[0][1]["meta"]
    shape = tuple(_int(meta0, key, loaded[0][0], "meta")
                  for key in ("num_experts", "top_k", "num_moe_layers"))
    for p, obj in loaded[1:]:
        other = tuple(_int(obj["meta"], key, p, "meta")
                      for key in ("num_experts", "top_k", "num_moe_layers"))
        if other != shape:
            raise TraceError(f"meta (experts, top_k, layers) {other} differs from "
                             f"{loaded[0][0].name}'s {shape}", file=p, field="meta")
    name = card or CARDS.get(shape)  # type: ignore[arg-type]
    if name is None:
        raise TraceError(f"no card for (experts, top_k, layers) = {shape}; pass card=",
                         file=loaded[0][0], field="meta")
    mc = card_or_error(name)
    n_experts, k, n_layers = shape
    if (n_experts, k, n_layers) != (mc.num_experts, mc.top_k, mc.num_moe_layers):
        raise TraceError(f"meta (experts, top_k, layers) {shape} does not match card "
                         f"{mc.name!r} ({mc.num_experts}, {mc.top_k}, {mc.num_moe_layers})",
                         file=loaded[0][0], field="meta")
    sums: list[float] = []
    reversed_total = cells = 0
    backends = []
    parsed = []
    for rid, (p, obj) in enumerate(loaded):
        ex, sc, ph, tid, texts, rev = _parse(p, obj, n_layers, k, n_experts)
        s = sc.astype(np.float64).sum(axis=2)
        sums += [float(s.min()), float(s.max())]
        reversed_total += rev
        cells += ex.shape[0] * n_layers
        backends.append(str(obj["meta"].get("backend", "?")))
        parsed.append((RequestRouting(rid, ex, ph, sc, texts, p.name), {"token_id": tid}))
    renorm = min(sums) > 0.95 and max(sums) < 1.05
    repo, lic = provenance(src)
    notes = {
        "importer": FORMAT,
        "backends": ",".join(sorted(set(backends))),
        "files": ",".join(p.name for p, _ in loaded),
        "scores": (f"router weights as logged; per-cell sums {min(sums):.3f}..{max(sums):.3f}: "
                   + ("approximately renormalised over the top-k" if renorm else
                      "raw softmax mass of the top-k, not renormalised")),
        "expert_order": (f"sorted by weight, descending ({reversed_total} of {cells} cells were "
                         "listed in ascending order by the source)"),
        "phase": "real prefill and greedy decode (each decode token fed once)",
        "shared_experts": f"{mc.num_shared_experts} shared experts always active, not logged",
        "prompts": f"{len(loaded)} prompt(s)",
    }
    meta = replace(meta_from_card(mc), notes=notes,
                   source=source or f"{repo or 'moe_ocs_learning'} [{src.name}]",
                   license=license or lic or "unknown")
    feats = {"token_id": FeatureSpec(1, "int32", "the token id fed to the model")}
    with atomic_path(out) as tmp:
        writer = TraceWriter(tmp, meta, display_path=out, features=feats)
        try:
            for req, f in parsed:
                writer.add(req, {"token_id": np.repeat(f["token_id"][:, None, :], n_layers,
                                                       axis=1)})
            summary = writer.close(meta)
        except BaseException:
            writer.abort()
            raise
    return ImportResult(out, meta, summary.requests, summary.tokens, summary.rows)
