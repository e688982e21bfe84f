"""Importer registry: one module per source format, registered by name with :func:`register`.

An importer is ``fn(src: Path, out: Path, **opts) -> ImportResult``; it validates the source,
writes ``out`` atomically (and any side table) and says what it did. ``import_trace`` looks the
format up by name so the CLI and experiments never import importer modules directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moesim.traces.errors import TraceError
from moesim.traces.trace import TraceMeta


@dataclass(frozen=True)
class ImportResult:
    """What an importer wrote."""

    out: Path
    meta: TraceMeta
    requests: int
    tokens: int
    rows: int
    side_files: dict[str, Path] = field(default_factory=dict)


class Importer(Protocol):
    def __call__(self, src: Path, out: Path, **opts: Any) -> ImportResult: ...


IMPORTERS: dict[str, Importer] = {}


def register(name: str) -> Callable[[Importer], Importer]:
    """Class the decorated function as the importer of format ``name``."""

    def deco(fn: Importer) -> Importer:
        if name in IMPORTERS:
            raise ValueError(f"importer {name!r} registered twice")
        IMPORTERS[name] = fn
        return fn

    return deco


def import_trace(fmt: str, src: str | Path, out: str | Path, **opts: Any) -> ImportResult:
    """Convert source ``src`` of format ``fmt`` into the project trace ``out`` (the formats of
    installed plugins, ``moesim.importers`` entry points, included)."""
    if fmt not in IMPORTERS:
        from moesim.plugins import load_entry_points

        load_entry_points()
    try:
        fn = IMPORTERS[fmt]
    except KeyError:
        raise TraceError(
            f"unknown format {fmt!r}; known: {', '.join(sorted(IMPORTERS))}", field="format"
        ) from None
    src = Path(src)
    if not src.exists():
        raise TraceError("source does not exist", file=src)
    try:
        inspect.signature(fn).bind(src, Path(out), **opts)
    except TypeError as exc:  # unknown option names
        raise TraceError(f"format {fmt!r}: {exc}", field="options") from None
    return fn(src, Path(out), **opts)


# Importing the modules fills the registry.
from moesim.traces.importers import (  # noqa: E402
    bmoe_route_csv,  # noqa: F401
    moe_beyond_csv,  # noqa: F401
    ocs_routing_json,  # noqa: F401
    speculative_moe_jsonl,  # noqa: F401
    vllm_routes_jsonl,  # noqa: F401
)

__all__ = ["IMPORTERS", "ImportResult", "Importer", "import_trace", "register"]
