"""``bmoe-route-csv``: the ``--route-trace`` CSV of BigMoeOnEdge (a llama.cpp-based engine that
streams experts from flash into an LRU cache), e.g. ``qwen.route.csv``.

SRC is one ``*.route.csv`` file. It opens with a ``#`` preamble: ``# route_trace v1``, then
``# model=<gguf> arch=<arch> n_layer=L n_expert=E n_expert_used=K``, then one
``# layer=i expert_bytes=B dense_bytes=D`` per MoE layer. Then the header
``turn,phase,step,layer,slot,expert,weight,residency,expert_bytes`` and one row per routed
expert: ``turn`` is the request, ``phase`` 0 prefill / 1 decode, ``step`` the token's absolute
context position, ``slot`` the router rank (0 = largest weight), ``weight`` the weight the
engine applied (renormalised over the K used experts), ``residency`` the engine's own cache
state when the layer was looked up (0 miss, 1 hit, 2 prefetched) and ``expert_bytes`` the bytes
the engine read for it (0 on a hit).

Why a trace keeps the engine's columns: they are what moesim's cache is checked against
(:mod:`moesim.traces.residency`). They travel as the optional feature columns
``feat.residency`` and ``feat.read_bytes`` (int32, one value per rank), which plain readers
ignore. In prefill the engine looks a whole layer up for all prompt tokens at once, so the
cache state it reports there is the one before the batch and ``expert_bytes`` is non-zero only
on the first token that needed the expert.

The card comes from ``arch`` (``card=`` overrides); the card keeps the model's native top-k and
the trace's K is its ``top_k`` (noted as ``top_k_reduced_from``). Missing (token, layer) cells
are allowed only where llama.cpp leaves them out, the last layer of non-final prefill tokens
(it computes the last layer for output tokens only); they are counted in the notes and never
invented. Any other missing cell is an error unless ``partial=True``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from moesim.traces.errors import TraceError
from moesim.traces.importers import ImportResult, register
from moesim.traces.importers._common import card_or_error, check_id_rows, meta_from_card
from moesim.traces.importers.provenance import provenance
from moesim.traces.store import FeatureSpec, TraceWriter, atomic_path
from moesim.traces.trace import DECODE, PREFILL, RequestRouting

FORMAT = "bmoe-route-csv"
COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight", "residency",
           "expert_bytes")
# GGUF architecture -> the card of the file the public traces were made with
CARDS = {"qwen3moe": "qwen3_30b_a3b_q4km", "gemma4": "gemma4_26b_a4b", "gpt-oss": "gpt_oss_120b"}
_MODEL = re.compile(r"^#\s*model=(\S+)\s+arch=(\S+)\s+n_layer=(\d+)\s+n_expert=(\d+)\s+"
                    r"n_expert_used=(\d+)\s*$")
_LAYER = re.compile(r"^#\s*layer=(\d+)\s+expert_bytes=(\d+)\s+dense_bytes=(\d+)\s*$")
FEATURES = {
    "residency": FeatureSpec(1, "int32", "engine cache state at lookup: 0 miss, 1 hit, "
                             "2 prefetched (prefill: the state before the layer's batch)"),
    "read_bytes": FeatureSpec(1, "int32", "bytes the engine read for this expert (0: served "
                              "from its cache)"),
}


def _preamble(path: Path, data: bytes) -> tuple[dict[str, str], list[tuple[int, int, int]], int]:
    """The model line, the per-layer (layer, expert_bytes, dense_bytes) and the header's byte
    offset; one clear error for anything else before the header."""
    model: dict[str, str] | None = None
    layers: list[tuple[int, int, int]] = []
    pos = 0
    for no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise TraceError(f"not UTF-8 text ({exc.reason})", file=path, line=no) from None
        if not line.startswith("#"):
            if model is None:
                raise TraceError("no '# model=... arch=... n_layer=..' preamble line", file=path,
                                 line=no, field="preamble")
            head = tuple(c.strip() for c in line.split(","))
            if head != COLUMNS:
                raise TraceError(f"header {line!r}, expected {','.join(COLUMNS)}", file=path,
                                 line=no, field="header")
            return model, layers, pos
        if no == 1 and not line.startswith("# route_trace v1"):
            raise TraceError(f"first line {line!r}, expected '# route_trace v1'", file=path,
                             line=no, field="preamble")
        if m := _MODEL.match(line):
            model = dict(zip(("gguf", "arch", "n_layer", "n_expert", "k"), m.groups(),
                             strict=True))
        elif m := _LAYER.match(line):
            layers.append((int(m[1]), int(m[2]), int(m[3])))
        elif no > 1 and line.strip() not in ("#", ""):
            raise TraceError(f"unknown preamble line {line!r}", file=path, line=no,
                             field="preamble")
        pos += len(raw) + 1
    raise TraceError("no header line after the preamble", file=path, field="header")


def _read_rows(path: Path, body: bytes, first_line: int) -> dict[str, np.ndarray]:
    types = {c: pa.int64() for c in COLUMNS} | {"weight": pa.float64()}
    try:
        table = pacsv.read_csv(
            pa.BufferReader(body),
            read_options=pacsv.ReadOptions(use_threads=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        m = re.search(r"[Rr]ow #(\d+)", str(exc))
        line = first_line + int(m[1]) - 1 if m else None
        msg = str(exc).splitlines()[0]
        raise TraceError(f"malformed row ({msg})", file=path, line=line) from None
    if table.num_rows == 0:
        raise TraceError("no data rows", file=path, line=first_line + 1)
    cols = {}
    for c in COLUMNS:
        col = table.column(c)
        if col.null_count:
            i = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise TraceError("empty value", file=path, line=first_line + 1 + i, field=c)
        cols[c] = col.to_numpy()
    return cols


def _check(ok: np.ndarray, msg: str, values: np.ndarray, lines: np.ndarray, path: Path,
           field: str) -> None:
    if not ok.all():
        i = int(np.argmin(ok))
        raise TraceError(msg.format(v=values[i]), file=path, line=int(lines[i]), field=field)


@register(FORMAT)
def import_bmoe_route_csv(
    src: Path,
    out: Path,
    *,
    card: str | None = None,
    partial: bool = False,
    source: str | None = None,
    license: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Import one BigMoeOnEdge route-trace CSV (see module docstring)."""
    del progress  # under a second; nothing worth a progress bar
    if not src.is_file():
        raise TraceError("expected one *.route.csv file", file=src)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read ({exc.strerror})", file=src) from None
    model, layer_lines, pos = _preamble(src, data)
    header_line = data[:pos].count(b"\n") + 1
    name = card or CARDS.get(model["arch"])
    if name is None:
        raise TraceError(f"arch {model['arch']!r} has no card (known: {', '.join(CARDS)}); "
                         "pass card=", file=src, line=2, field="arch")
    mc = card_or_error(name)
    n_layer, n_expert, k = int(model["n_layer"]), int(model["n_expert"]), int(model["k"])
    if (n_layer, n_expert) != (mc.num_moe_layers, mc.num_experts):
        raise TraceError(f"n_layer={n_layer} n_expert={n_expert}, but card {mc.name!r} has "
                         f"{mc.num_moe_layers} MoE layers / {mc.num_experts} experts",
                         file=src, line=2, field="n_layer")
    if not 0 < k <= mc.top_k:
        raise TraceError(f"n_expert_used={k} not in 1..{mc.top_k} (the card's top_k)",
                         file=src, line=2, field="n_expert_used")
    if [x[0] for x in layer_lines] != list(range(n_layer)):
        raise TraceError(f"expected '# layer=i' lines for i = 0..{n_layer - 1}, got "
                         f"{len(layer_lines)}", file=src, field="preamble")
    per_layer_bytes = np.asarray([x[1] for x in layer_lines], dtype=np.int64)

    cols = _read_rows(src, data[pos:], header_line)
    n = len(cols["turn"])
    lines = np.arange(header_line + 1, header_line + 1 + n)
    layer, slot, expert = cols["layer"], cols["slot"], cols["expert"]
    _check((layer >= 0) & (layer < n_layer), f"layer {{v}} not in 0..{n_layer - 1}", layer,
           lines, src, "layer")
    _check((slot >= 0) & (slot < k), f"slot {{v}} not in 0..{k - 1}", slot, lines, src, "slot")
    _check((cols["phase"] == PREFILL) | (cols["phase"] == DECODE), "phase {v} not 0 or 1",
           cols["phase"], lines, src, "phase")
    _check(cols["turn"] >= 0, "turn {v} < 0", cols["turn"], lines, src, "turn")
    _check(cols["step"] >= 0, "step {v} < 0", cols["step"], lines, src, "step")
    _check((cols["residency"] >= 0) & (cols["residency"] <= 2), "residency {v} not 0, 1 or 2",
           cols["residency"], lines, src, "residency")
    rb = cols["expert_bytes"]
    _check((rb == 0) | (rb == per_layer_bytes[np.clip(layer, 0, n_layer - 1)]),
           "expert_bytes {v}: neither 0 nor the layer's expert_bytes in the preamble", rb, lines,
           src, "expert_bytes")
    w = cols["weight"]
    _check(np.isfinite(w) & (w >= 0), "weight {v} is not a finite number >= 0", w, lines, src,
           "weight")

    # one cell per (turn, step, layer), each holding slots 0..k-1 exactly once
    order = np.lexsort((slot, layer, cols["step"], cols["turn"]))
    key = np.stack([cols["turn"], cols["step"], layer, slot], axis=1)[order]
    same = (key[1:] == key[:-1]).all(axis=1)
    if same.any():
        i = order[int(np.argmax(same)) + 1]
        raise TraceError(f"duplicate row for (turn, step, layer, slot) = {key[np.argmax(same)+1]}"
                         .replace("\n", " "), file=src, line=int(lines[i]), field="slot")
    starts = np.flatnonzero(np.r_[True, (key[1:, :3] != key[:-1, :3]).any(axis=1)])
    sizes = np.diff(np.r_[starts, n])
    if (sizes != k).any():
        c = starts[int(np.argmax(sizes != k))]
        raise TraceError(f"cell (turn {key[c, 0]}, step {key[c, 1]}, layer {key[c, 2]}) has "
                         f"{sizes[np.argmax(sizes != k)]} rows, expected k={k}", file=src,
                         line=int(lines[order[c]]), field="slot")
    ks = key.reshape(-1, k, 4)
    want = np.arange(k)
    bad = (ks[:, :, 3] != want).any(axis=1) | (ks[:, :, :3] != ks[:, :1, :3]).any(axis=(1, 2))
    if bad.any():
        c = int(np.argmax(bad))
        raise TraceError(f"cell (turn {ks[c, 0, 0]}, step {ks[c, 0, 1]}, layer {ks[c, 0, 2]}) "
                         f"does not hold slots 0..{k - 1} once each", file=src,
                         line=int(lines[order[c * k]]), field="slot")
    o = order.reshape(-1, k)
    turn_c, step_c, layer_c = ks[:, 0, 0], ks[:, 0, 1], ks[:, 0, 2]
    ids = expert[o]
    check_id_rows(ids, n_expert, file=src, lines=lines[o[:, 0]], field="expert")
    phase_c = cols["phase"][o]
    _check((phase_c == phase_c[:, :1]).all(axis=1), "phase differs inside one cell", phase_c[:, 0],
           lines[o[:, 0]], src, "phase")

    meta = meta_from_card(mc)
    notes: dict[str, str] = {}
    missing_allowed = 0
    requests: list[tuple[RequestRouting, dict[str, np.ndarray]]] = []
    for rid in np.unique(turn_c).tolist():
        sel = np.flatnonzero(turn_c == rid)
        steps = step_c[sel]
        s0 = int(steps.min())
        t_idx = steps - s0
        n_tok = int(t_idx.max()) + 1
        ex = np.full((n_tok, n_layer, k), -1, dtype=np.int16)
        sc = np.full((n_tok, n_layer, k), np.nan, dtype=np.float32)
        res = np.zeros((n_tok, n_layer, k), dtype=np.int32)
        rd = np.zeros((n_tok, n_layer, k), dtype=np.int32)
        ph = np.full(n_tok, 255, dtype=np.int64)
        lj = layer_c[sel]
        ex[t_idx, lj] = ids[sel]
        sc[t_idx, lj] = w[o[sel]]
        res[t_idx, lj] = cols["residency"][o[sel]]
        rd[t_idx, lj] = rb[o[sel]]
        pc_ = phase_c[sel, 0]
        ph[t_idx] = pc_
        if (ph[t_idx] != pc_).any():
            i = int(np.argmax(ph[t_idx] != pc_))
            raise TraceError("phase differs between layers of one step", file=src,
                             line=int(lines[o[sel[i], 0]]), field="phase")
        if (ph == 255).any():
            t = int(np.argmax(ph == 255))
            raise TraceError(f"turn {rid}: step {s0 + t} has no rows (steps must be contiguous)",
                             file=src, field="step")
        if not (np.diff(ph) >= 0).all():
            raise TraceError(f"turn {rid}: a prefill step follows a decode step", file=src,
                             field="phase")
        hole = ex[:, :, 0] < 0
        # llama.cpp computes the last layer only for the tokens whose logits it outputs: in
        # prefill, the last prompt token
        last_prefill = int(np.flatnonzero(ph == PREFILL).max()) if (ph == PREFILL).any() else -1
        expected = np.zeros_like(hole)
        if last_prefill > 0:
            expected[:last_prefill, n_layer - 1] = True
        unexplained = hole & ~expected
        if unexplained.any() and not partial:
            t, j = np.argwhere(unexplained)[0]
            raise TraceError(f"turn {rid}: no rows for step {s0 + int(t)}, layer {int(j)} "
                             "(pass partial=True to import a partial trace)", file=src,
                             field="layer")
        missing_allowed += int(hole.sum())
        req = RequestRouting(
            request_id=int(rid), experts=ex, phase=ph.astype(np.uint8), scores=sc,
            label=f"{src.name}/turn{rid}",
        )
        requests.append((req, {"residency": res, "read_bytes": rd}))
    is_partial = bool(missing_allowed) or bool(partial)
    repo, lic = provenance(src)
    notes.update({
        "importer": FORMAT,
        "engine": "BigMoeOnEdge bmoe-cli (llama.cpp-based, experts streamed from flash into an "
                  "LRU cache)",
        "gguf": model["gguf"],
        "arch": model["arch"],
        "top_k_reduced_from": str(mc.top_k),
        "top_k": f"the engine ran --n-expert-used {k} (native top-{mc.top_k}): the trace's "
                 f"top_k is {k}",
        "scores": "weights the engine applied: softmax over the router's choice, renormalised "
                  "over the used top-k (sum 1 per cell)",
        "expert_order": "router rank (slot 0 = largest weight)",
        "phase": "real prefill (one batched forward over the prompt) and decode",
        "missing_cells": (
            f"{missing_allowed} (token, layer) cells have no rows: the last layer of non-final "
            "prefill tokens, which llama.cpp does not compute (only output tokens need it); "
            "left out, not invented" if missing_allowed else "none"),
        "expert_bytes_per_layer": ",".join(str(int(b)) for b in per_layer_bytes),
        "dense_bytes_per_layer": ",".join(str(x[2]) for x in layer_lines),
        "features": "feat.residency and feat.read_bytes: the engine's own cache state and bytes "
                    "read per routed expert (see traces.residency)",
    })
    meta = replace(meta, top_k=k, partial=is_partial, notes=notes,
                   source=source or f"{repo or 'BigMoeOnEdge'} [{src.name}]",
                   license=license or lic or "unknown")
    feats = {name: FeatureSpec(k, spec.dtype, spec.description)
             for name, spec in FEATURES.items()}
    with atomic_path(out) as tmp:
        writer = TraceWriter(tmp, meta, display_path=out, features=feats)
        try:
            for req, f in requests:
                writer.add(req, f)
            summary = writer.close(meta)
        except BaseException:
            writer.abort()
            raise
    return ImportResult(out, meta, summary.requests, summary.tokens, summary.rows)
