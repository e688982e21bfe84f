"""Helpers shared by the importers: card -> metadata, vectorised row checks, JSONL reading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moesim.traces.errors import TraceError
from moesim.traces.model_card import ModelCard, ModelCardError, load_card
from moesim.traces.trace import TraceMeta


def card_or_error(name: str) -> ModelCard:
    try:
        return load_card(name)
    except ModelCardError as exc:
        raise TraceError(str(exc), field="card") from None


def meta_from_card(
    card: ModelCard,
    *,
    moe_layers: tuple[int, ...] | None = None,
    source: str = "",
    license: str = "",
    partial: bool = False,
    notes: dict[str, str] | None = None,
) -> TraceMeta:
    """Trace metadata whose shapes come from the model card (never typed in by an importer)."""
    return TraceMeta(
        model=card.name,
        moe_layers=tuple(moe_layers if moe_layers is not None else card.moe_layers),
        num_experts=card.num_experts,
        top_k=card.top_k,
        num_shared_experts=card.num_shared_experts,
        dense_layers=card.dense_layers,
        expert_bytes=card.expert_bytes,
        source=source,
        license=license,
        partial=partial,
        notes=dict(notes or {}),
    )


def check_id_rows(
    ids: np.ndarray,
    num_experts: int,
    *,
    file: str | Path,
    lines: np.ndarray,
    field: str,
) -> None:
    """Reject out-of-range or repeated ids in ``ids [n, k]``; ``lines[i]`` locates row i."""
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        i, r = np.argwhere(bad)[0]
        raise TraceError(
            f"expert id {int(ids[i, r])} out of range [0, {num_experts})",
            file=file,
            line=int(lines[i]),
            field=field,
        )
    if ids.shape[1] > 1:
        srt = np.sort(ids, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if dup.any():
            i = int(np.argmax(dup))
            raise TraceError(
                f"duplicate expert ids {ids[i].tolist()}",
                file=file,
                line=int(lines[i]),
                field=field,
            )


def check_widths(widths: np.ndarray, k: int, *, file: str | Path, lines: np.ndarray, field: str):
    bad = widths != k
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(
            f"{int(widths[i])} ids, expected top_k={k}", file=file, line=int(lines[i]), field=field
        )


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-empty line; malformed lines raise TraceError."""
    try:
        fh = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot open ({exc.strerror})", file=path) from None
    with fh:
        try:
            for no, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"malformed JSON ({exc.msg})", file=path, line=no) from None
                if not isinstance(obj, dict):
                    raise TraceError("line is not a JSON object", file=path, line=no)
                yield no, obj
        except UnicodeDecodeError as exc:
            raise TraceError(f"not UTF-8 text ({exc.reason})", file=path) from None


def get_int(obj: dict[str, Any], key: str, path: Path, line: int, *, min_value: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"expected an integer, got {value!r}", file=path, line=line, field=key)
    if value < min_value:
        raise TraceError(f"must be >= {min_value}, got {value}", file=path, line=line, field=key)
    return value


def get_int_list(obj: dict[str, Any], key: str, path: Path, line: int) -> list[int]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TraceError(
            f"expected a list of integers, got {value!r}", file=path, line=line, field=key
        )
    return value


def get_float_list(obj: dict[str, Any], key: str, path: Path, line: int) -> list[float]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise TraceError(
            f"expected a list of numbers, got {value!r}", file=path, line=line, field=key
        )
    return value


def to_matrix(rows: list[list[int]], k: int, path: Path, lines: np.ndarray, field: str):
    """Rows of Python ints -> ``int64 [n, k]`` after checking every width is ``k``."""
    widths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    check_widths(widths, k, file=path, lines=lines, field=field)
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), k)


def get_ids_and_weights(
    obj: dict[str, Any], ids_key: str, weights_key: str, path: Path, line: int,
    nouns: tuple[str, str] = ("weights", "experts"),
) -> tuple[list[int], list[float]]:
    """A row's expert ids and their router weights, which must pair up one to one.
    ``nouns`` name the two lists in the error message, in the source's own words."""
    ids = get_int_list(obj, ids_key, path, line)
    weights = get_float_list(obj, weights_key, path, line)
    if len(weights) != len(ids):
        raise TraceError(
            f"{len(weights)} {nouns[0]} for {len(ids)} {nouns[1]}", file=path, line=line,
            field=weights_key,
        )
    return ids, weights
