"""Collect routing traces (with hidden states) from Hugging Face transformers MoE models.

``moesim-collect`` (:mod:`traces.collect.app`) is the command line; :func:`collect` the API;
:func:`traces.collect.embedded.ensure_embedded_trace` regenerates the trace of the small MoE
model trained here and committed under ``traces/collect/assets``. transformers and torch are
imported lazily, so importing this package needs neither.
"""

from moesim.traces.collect.collector import (
    CollectResult,
    CollectSettings,
    collect,
    load_routers,
    routers_path,
)
from moesim.traces.collect.errors import CollectError

__all__ = [
    "CollectError",
    "CollectResult",
    "CollectSettings",
    "collect",
    "load_routers",
    "routers_path",
]
