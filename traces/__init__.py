"""Routing traces: the on-disk format, model cards, importers and statistics.

Public API (see ``traces/README_section.md``)::

    from traces import load_trace, iter_requests, read_meta, write_trace, import_trace
"""

from traces.errors import TraceError
from traces.importers import IMPORTERS, ImportResult, import_trace, register
from traces.model_card import ModelCard, ModelCardError, list_cards, load_card
from traces.predictions import load_predictions
from traces.schema import FORMAT_VERSION, META_KEY
from traces.store import (
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
from traces.trace import DECODE, PHASES, PREFILL, RequestRouting, Trace, TraceMeta

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
