"""Routing traces: the on-disk format, model cards, importers and statistics.

Public API (see experiments/docs/pages/traces.md)::

    from moesim.traces import load_trace, iter_requests, read_meta, write_trace, import_trace
"""

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
