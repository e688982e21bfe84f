"""On-disk trace format (version 1): one Parquet file, one row per (request, token, MoE layer).

Columns (in this order; readers select columns by name and ignore unknown ones):

==============  =====================  ==========================================================
column          Arrow type             meaning
==============  =====================  ==========================================================
request_id      int32                  request number; strictly increasing through the file
token_idx       int32                  0-based position of the token among the request's
                                       recorded tokens; contiguous 0..T-1 inside a request
phase           uint8                  0 = prefill, 1 = decode (``traces.trace.PHASES``); the
                                       same for every row of a token
layer           int16                  the model's own layer id (one of ``moe_layers``)
experts         list<int16>            exactly ``top_k`` distinct ids in [0, num_experts),
                                       router rank order when the source records it
scores          list<float32>, null    router weights in the same order, or null
token           string, null           token text (BPE piece) when recorded, else null
request_label   string, null           free label of the request ("gsm8k/0", "prompt_17")
==============  =====================  ==========================================================

Rows are sorted by (request_id, token_idx, layer), so a request is contiguous and a reader can
stream row groups. A (token, layer) pair that the source did not record has no row; that is
only allowed when the metadata says ``partial: true`` (and every token keeps at least one row).

Model metadata is JSON (UTF-8) in the file's key-value metadata under ``META_KEY``:
``format_version, model, moe_layers, num_experts, top_k, num_shared_experts, dense_layers,
expert_bytes, source, license, partial, notes{str: str}, phase_codes, has_scores, has_tokens,
counts{requests, tokens, rows}, features{}``. It is written when the file is closed, so an
importer can record what it found while streaming (dropped rows, counts).

Feature columns (written by ``traces.collect``; read with ``traces.store.load_features``). A
per-row feature such as the hidden state entering the layer is an extra column named
``feat.<name>`` of type ``fixed_size_list<float16, D>`` (nullable), declared in ``features`` as
``{"<name>": {"dtype": "float16", "shape": [D], "where": "column"}}`` (``float32`` and ``int32``
are accepted too, e.g. ``feat.token_id`` with shape ``[1]``). Large features may go
to a side file ``<trace>.features.parquet`` instead (``"where": "side"``) with the key columns
``request_id, token_idx, layer`` in the same order and the same row count, so it can be zipped
row group by row group with the trace without a join. Version-1 readers ignore both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from moesim.traces.errors import TraceError
from moesim.traces.trace import PHASES, TraceMeta

FORMAT_VERSION = 1
META_KEY = b"moesim.trace"

KEY_COLUMNS = ("request_id", "token_idx", "layer")
FEATURE_PREFIX = "feat."
FEATURE_DTYPES: dict[str, pa.DataType] = {
    "float16": pa.float16(),
    "float32": pa.float32(),
    "int32": pa.int32(),
}

SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int32(), nullable=False),
        pa.field("token_idx", pa.int32(), nullable=False),
        pa.field("phase", pa.uint8(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("experts", pa.list_(pa.int16()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=True),
        pa.field("token", pa.string(), nullable=True),
        pa.field("request_label", pa.string(), nullable=True),
    ]
)
REQUIRED_COLUMNS = ("request_id", "token_idx", "phase", "layer", "experts")
OPTIONAL_COLUMNS = ("scores", "token", "request_label")


def meta_to_dict(
    meta: TraceMeta,
    *,
    has_scores: bool,
    has_tokens: bool,
    counts: Mapping[str, int] | None = None,
    features: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON object stored under ``META_KEY``."""
    return {
        "format_version": FORMAT_VERSION,
        "model": meta.model,
        "moe_layers": [int(x) for x in meta.moe_layers],
        "num_experts": int(meta.num_experts),
        "top_k": int(meta.top_k),
        "num_shared_experts": int(meta.num_shared_experts),
        "dense_layers": [int(x) for x in meta.dense_layers],
        "expert_bytes": int(meta.expert_bytes),
        "source": meta.source,
        "license": meta.license,
        "partial": bool(meta.partial),
        "notes": {str(k): str(v) for k, v in meta.notes.items()},
        "phase_codes": {str(i): name for i, name in enumerate(PHASES)},
        "has_scores": bool(has_scores),
        "has_tokens": bool(has_tokens),
        "counts": dict(counts or {}),
        "features": {str(k): dict(v) for k, v in (features or {}).items()},
    }


def feature_field(name: str, dtype: str, dim: int) -> pa.Field:
    """Arrow field of the ``feat.<name>`` column (one clear error for a bad declaration)."""
    if dtype not in FEATURE_DTYPES:
        raise TraceError(
            f"feature {name!r}: dtype {dtype!r} not one of {sorted(FEATURE_DTYPES)}",
            field=FEATURE_PREFIX + name,
        )
    if not name or int(dim) <= 0:
        raise TraceError(f"feature {name!r}: needs a name and dim > 0", field=FEATURE_PREFIX + name)
    return pa.field(FEATURE_PREFIX + name, pa.list_(FEATURE_DTYPES[dtype], int(dim)), nullable=True)


def meta_from_dict(data: Mapping[str, Any], where: str = "<metadata>") -> TraceMeta:
    """Parse the stored JSON object back into a :class:`TraceMeta` (one clear error if bad)."""
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise TraceError("missing or invalid format_version", file=where, field="format_version")
    if version > FORMAT_VERSION:
        raise TraceError(
            f"format_version {version} is newer than this reader ({FORMAT_VERSION})",
            file=where,
            field="format_version",
        )
    try:
        meta = TraceMeta(
            model=str(data["model"]),
            moe_layers=tuple(int(x) for x in data["moe_layers"]),
            num_experts=int(data["num_experts"]),
            top_k=int(data["top_k"]),
            num_shared_experts=int(data.get("num_shared_experts", 0)),
            dense_layers=tuple(int(x) for x in data.get("dense_layers", ())),
            expert_bytes=int(data.get("expert_bytes", 0)),
            source=str(data.get("source", "")),
            license=str(data.get("license", "")),
            partial=bool(data.get("partial", False)),
            notes={str(k): str(v) for k, v in dict(data.get("notes") or {}).items()},
        )
    except KeyError as exc:
        raise TraceError("required key missing", file=where, field=str(exc.args[0])) from None
    except (TypeError, ValueError) as exc:
        raise TraceError(f"malformed metadata: {exc}", file=where, field=str(META_KEY)) from None
    check_meta(meta, where)
    return meta


def check_meta(meta: TraceMeta, where: str = "<metadata>") -> None:
    """Reject metadata the reader/writer cannot work with."""
    if not meta.moe_layers:
        raise TraceError("moe_layers is empty", file=where, field="moe_layers")
    if list(meta.moe_layers) != sorted(set(meta.moe_layers)) or min(meta.moe_layers) < 0:
        raise TraceError(
            "moe_layers must be ascending, unique, >= 0", file=where, field="moe_layers"
        )
    if max(meta.moe_layers) > 32767:
        raise TraceError("layer ids must fit int16", file=where, field="moe_layers")
    if not 0 < meta.num_experts <= 32767:
        raise TraceError("num_experts must be in 1..32767", file=where, field="num_experts")
    if not 0 < meta.top_k <= meta.num_experts:
        raise TraceError("top_k must be in 1..num_experts", file=where, field="top_k")


def dumps(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
