"""Routing traces: the on-disk format, model cards, importers and statistics.

Public API (see experiments/docs/pages/traces.md)::

    from moesim.traces import load_trace, iter_requests, read_meta, write_trace, import_trace

The names load on first use (PEP 562): a module that needs only ``TraceError`` or the trace
classes does not import every importer (and their parsers), the prediction tables or the
Parquet store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moesim._lazy import lazy_names

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from moesim.traces.errors import TraceError
    from moesim.traces.importers import IMPORTERS, ImportResult, import_trace, register
    from moesim.traces.model_card import ModelCard, ModelCardError, list_cards, load_card
    from moesim.traces.predictions import load_predictions
    from moesim.traces.schema import FORMAT_VERSION, META_KEY
    from moesim.traces.store import (
        TraceSummary,
        iter_requests,
        load_features,
        load_trace,
        read_header,
        read_meta,
        scan_counts,
        validate_trace,
        write_trace,
    )
    from moesim.traces.trace import DECODE, PHASES, PREFILL, RequestRouting, Trace, TraceMeta

_WHERE = {  # public name -> module that defines it
    "TraceError": "errors",
    "IMPORTERS": "importers", "ImportResult": "importers", "import_trace": "importers",
    "register": "importers",
    "ModelCard": "model_card", "ModelCardError": "model_card", "list_cards": "model_card",
    "load_card": "model_card",
    "load_predictions": "predictions",
    "FORMAT_VERSION": "schema", "META_KEY": "schema",
    "TraceSummary": "store", "iter_requests": "store", "load_features": "store",
    "load_trace": "store", "read_header": "store", "read_meta": "store",
    "scan_counts": "store", "validate_trace": "store", "write_trace": "store",
    "DECODE": "trace", "PHASES": "trace", "PREFILL": "trace", "RequestRouting": "trace",
    "Trace": "trace", "TraceMeta": "trace",
}

__all__ = [
    "DECODE",
    "FORMAT_VERSION",
    "IMPORTERS",
    "META_KEY",
    "PHASES",
    "PREFILL",
    "ImportResult",
    "ModelCard",
    "ModelCardError",
    "RequestRouting",
    "Trace",
    "TraceError",
    "TraceMeta",
    "TraceSummary",
    "import_trace",
    "iter_requests",
    "list_cards",
    "load_card",
    "load_features",
    "load_predictions",
    "load_trace",
    "read_header",
    "read_meta",
    "register",
    "scan_counts",
    "validate_trace",
    "write_trace",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
