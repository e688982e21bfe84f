"""Training methods of ``moesim-train``: one registry, so a plugin adds a method the way it adds
a policy (``@register_method``), and the pipeline knows no method by name.

A method turns the trace's rows into a ranking of every expert per row (best first), fitted
on the train split only (the validation split may steer early stopping). What it returns is a
:class:`Ranking`; ``available_at`` is the prediction table's honesty tag (when, in a forward
pass, the prediction could exist: ``routed:same_layer``, ``pre_attention:same_layer``,
``static:any_layer``, ...), which the simulator checks against a policy's prediction point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.predictors.data import PredictorError

if TYPE_CHECKING:
    from moesim.predictors.data import TraceData


@dataclass(frozen=True)
class Ranking:
    """One method's output over all rows of the trace."""

    ranked: np.ndarray  # int16 [rows, experts]: expert ids, best first (-1: no prediction)
    available_at: str
    seconds: float = 0.0  # fitting time (0 for a cached model)
    cached: bool = False  # a stored model was reused
    model_path: Path | None = None
    scored: np.ndarray | None = None  # bool [rows]: rows with a prediction; None = all


# (cfg, data, train mask, val mask, log) -> Ranking; cfg is a pipeline.RunConfig.
MethodFn = Callable[[Any, "TraceData", np.ndarray, np.ndarray, Callable[[str], None]], Ranking]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    takes_params: bool = False  # accepts predictor.model / predictor.train settings
    reads_trace_file: bool = False  # needs cfg.trace to be a file (not only its rows)
    feature: Callable[[Any], str | None] | None = None  # cfg -> per-row feature to load


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, takes_params: bool = False, reads_trace_file: bool = False,
                    feature: Callable[[Any], str | None] | None = None,
                    ) -> Callable[[MethodFn], MethodFn]:
    """Decorator: make ``fn`` the training method ``name`` (``predictor.method=<name>``).
    ``feature(cfg)`` names the per-row feature the method reads (hidden states at a point of
    the forward pass, ``predictors.data.load_data``); None: routing only."""
    def add(fn: MethodFn) -> MethodFn:
        old = _METHODS.get(name)
        if old is not None and old.fn is not fn:
            raise PredictorError(f"predictor method {name!r} is registered twice")
        _METHODS[name] = Method(name, fn, takes_params, reads_trace_file, feature)
        return fn
    return add


def methods() -> list[str]:
    """Registered method names: the built-ins, then any a plugin added."""
    _builtins()
    return list(_METHODS)


def get_method(name: str) -> Method:
    """The method ``name``, loading installed plugins first; unknown is one clear error."""
    _builtins()
    if name not in _METHODS:
        from moesim.plugins import load_entry_points

        load_entry_points()
    if name not in _METHODS:
        raise PredictorError(f"unknown predictor {name!r} (known: {', '.join(_METHODS)})")
    return _METHODS[name]


def _builtins() -> None:
    import moesim.predictors.pipeline  # noqa: F401  (registers the shipped methods)
