"""Provenance-carrying numbers and the validation helpers every profile field goes through.

Every number in a profile YAML is a small mapping ``{value, unit, kind, source}`` so that a reader
can tell a datasheet figure from a measurement from our own arithmetic without leaving the file.
The field name carries the base unit (``_Bps``, ``_s``, ``_bytes``, ``_flops``); ``unit`` is an
optional, human-friendly scale (``GB/s``, ``ms``, ``GiB``, ``TFLOPS``) converted on load.

A bare scalar in place of the mapping is accepted only from Hydra/OmegaConf (``hw.x=2`` replaces
the whole node); it is read in the base unit and recorded as ``kind: override``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

# fitted: a parameter fitted to measurements by code in this repository, which names its
# calibration set (runtime profiles; see hw_profiles/runtime.py).
KINDS: tuple[str, ...] = ("measured", "spec", "estimate", "fitted")
OVERRIDE_KIND = "override"
QUANTITY_KEYS = frozenset({"value", "unit", "kind", "source"})

# Dimension -> accepted unit spellings -> factor to the base unit. Decimal prefixes are SI
# (1 GB/s = 1e9 B/s), binary ones are explicit (GiB).
UNITS: dict[str, dict[str, float]] = {
    "Bps": {
        "B/s": 1.0, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12,
        "KiB/s": 2.0**10, "MiB/s": 2.0**20, "GiB/s": 2.0**30,
    },
    "s": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9},
    "bytes": {
        "B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
        "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "TiB": 2.0**40,
    },
    "flops": {"FLOP/s": 1.0, "GFLOPS": 1e9, "TFLOPS": 1e12},
    "count": {"1": 1.0},
    "ratio": {"1": 1.0},
    "factor": {"1": 1.0},  # a positive multiplier, e.g. a slowdown (may exceed 1)
}


# Plausible ranges per dimension, in the base unit: a value outside is a typo or a unit slip (a
# 1e-30 GB/s link or 1e-30 TFLOPS GPU ran without a word and printed 300-digit times).
PLAUSIBLE: dict[str, tuple[float, float, str]] = {
    "Bps": (1e7, 1e13, "0.01 to 10,000 GB/s"),
    "flops": (1e9, 1e18, "1 GFLOP/s to 1 EFLOP/s"),
    "s": (0.0, 10.0, "0 to 10 s"),
}


class ProfileError(ValueError):
    """A hardware profile is malformed; the message names the file, the field and the value."""


@dataclass(frozen=True)
class Quantity:
    """One number with its provenance. ``value`` is in the field's base unit (or None)."""

    value: Any
    kind: str | None
    source: str
    field: str = ""

    @property
    def known(self) -> bool:
        return self.value is not None


def missing(field: str, source: str = "not given") -> Quantity:
    return Quantity(None, None, source, field)


@dataclass(frozen=True)
class Ctx:
    """Where we are while validating: file (or mapping name) plus a dotted field path."""

    where: str
    path: str = ""
    allow_bare: bool = True

    def sub(self, key: str) -> Ctx:
        return Ctx(self.where, f"{self.path}.{key}" if self.path else key, self.allow_bare)

    def error(self, problem: str, value: Any = ...) -> ProfileError:
        got = "" if value is ... else f"; got {value!r}"
        field = self.path or "<top level>"
        return ProfileError(f"{self.where}: field {field!r}: {problem}{got}")


# --------------------------------------------------------------------------------------------
# YAML loading: one loader for files, matching what Hydra/OmegaConf would read.


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``12.4e9`` as a float (YAML 1.2 / OmegaConf do; PyYAML does not)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str, where: str) -> Any:
    """Parse profile YAML; reject anchors/aliases and tags so the file stays Hydra-plain."""
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if getattr(event, "anchor", None):
                raise ProfileError(
                    f"{where}: YAML anchors/aliases are not allowed in profiles "
                    f"(found &{event.anchor}); Hydra config groups must be plain YAML"
                )
            tag = getattr(event, "tag", None)
            if tag is not None:
                raise ProfileError(f"{where}: YAML tags are not allowed in profiles (found {tag})")
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{where}: not valid YAML: {exc}") from None


# --------------------------------------------------------------------------------------------
# Scalar checks


def as_number(ctx: Ctx, raw: Any) -> float:
    """A real, finite number (bools and numeric strings are refused with a hint)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        hint = ""
        if isinstance(raw, str):
            hint = (" (write a plain number and put the scale in 'unit:', "
                    "e.g. {value: 12.4, unit: GB/s})")
        raise ctx.error(f"expected a number{hint}", raw)
    if not math.isfinite(raw):
        raise ctx.error("must be finite", raw)
    return float(raw)


def check_range(ctx: Ctx, x: float, dim: str, raw: Any, positive: bool) -> None:
    if dim == "ratio":
        if not 0.0 < x <= 1.0:
            raise ctx.error("must be in (0, 1]", raw)
    elif dim == "count":
        if x != int(x) or x < 1:
            raise ctx.error("must be a whole number >= 1", raw)
    elif positive and x <= 0:
        raise ctx.error("must be > 0", raw)
    elif x < 0:
        raise ctx.error("must be >= 0", raw)


def check_plausible(ctx: Ctx, x: float, dim: str, raw: Any) -> None:
    """A value in the field's base unit within :data:`PLAUSIBLE` for its dimension."""
    if dim in PLAUSIBLE:
        lo, hi, text = PLAUSIBLE[dim]
        if not lo <= x <= hi:
            raise ctx.error(f"{x:.3g} {dim} is outside the plausible {text} (check the value "
                            "and its unit)", raw)


def as_str(ctx: Ctx, raw: Any, *, required: bool = False, default: str = "") -> str:
    if raw is None:
        if required:
            raise ctx.error("is required")
        return default
    if not isinstance(raw, str):
        raise ctx.error("expected a string", raw)
    return raw


def as_bool(ctx: Ctx, raw: Any, default: bool = False) -> bool:
    if raw is None:
        return default
    if not isinstance(raw, bool):
        raise ctx.error("expected true or false", raw)
    return raw


def as_mapping(ctx: Ctx, raw: Any, *, required: bool = False) -> Mapping[str, Any] | None:
    if raw is None:
        if required:
            raise ctx.error("is required")
        return None
    if not isinstance(raw, Mapping):
        raise ctx.error("expected a mapping", raw)
    return raw


def reject_unknown(ctx: Ctx, data: Mapping[str, Any], known: set[str] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ctx.error(f"unknown key(s) {unknown}; expected some of {sorted(known)}")


# --------------------------------------------------------------------------------------------
# Quantities


def _unit_factor(ctx: Ctx, unit: Any, dim: str) -> float:
    if unit is None:
        return 1.0
    table = UNITS[dim]
    if not isinstance(unit, str) or unit not in table:
        raise ctx.sub("unit").error(f"unit must be one of {sorted(table)} for this field", unit)
    return table[unit]


def _provenance(ctx: Ctx, node: Mapping[str, Any], value: Any) -> tuple[str | None, str]:
    reject_unknown(ctx, node, QUANTITY_KEYS)
    if "value" not in node:
        raise ctx.error("'value' is required (use value: null for an unknown number)")
    source = node.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ctx.sub("source").error("every number needs a non-empty 'source'", source)
    kind = node.get("kind")
    if value is None:
        if kind is not None and kind not in KINDS:
            raise ctx.sub("kind").error(f"kind must be one of {list(KINDS)} or null", kind)
        return kind, source
    if kind not in KINDS:
        raise ctx.sub("kind").error(f"kind must be one of {list(KINDS)}", kind)
    return kind, source


def _split(ctx: Ctx, raw: Any) -> tuple[Any, Any, str | None, str]:
    """(value, unit, kind, source) from a quantity mapping, or from a bare override."""
    if isinstance(raw, Mapping):
        value = raw.get("value")
        kind, source = _provenance(ctx, raw, value)
        return value, raw.get("unit"), kind, source
    if not ctx.allow_bare:
        raise ctx.error(
            "expected a mapping {value, kind, source} (optionally unit); bare numbers are "
            "only accepted as command-line overrides",
            raw,
        )
    return raw, None, OVERRIDE_KIND, "override (no provenance given)"


def quantity(
    ctx: Ctx,
    raw: Any,
    dim: str,
    *,
    required: bool = False,
    positive: bool = True,
) -> Quantity:
    """Parse one scalar quantity; ``required`` means the value itself may not be null."""
    if raw is None:
        if required:
            raise ctx.error("is required")
        return missing(ctx.path)
    value, unit, kind, source = _split(ctx, raw)
    if value is None:
        if required:
            raise ctx.sub("value").error("is required here and may not be null")
        return Quantity(None, kind, source, ctx.path)
    factor = _unit_factor(ctx, unit, dim)
    x = as_number(ctx.sub("value"), value) * factor
    check_range(ctx.sub("value"), x, dim, value, positive)
    check_plausible(ctx.sub("value"), x, dim, value)
    out: float | int = round(x) if dim in ("bytes", "count") else x
    return Quantity(out, kind, source, ctx.path)


def _pairs(ctx: Ctx, value: Any, factor: float) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ctx.error("expected a non-empty list of [x, y] pairs", value)
    out = []
    for i, item in enumerate(value):
        ictx = ctx.sub(str(i))
        if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
            raise ictx.error("expected a pair [x, y]", item)
        x = as_number(ictx, item[0])
        y = as_number(ictx, item[1]) * factor
        if x <= 0 or y <= 0:
            raise ictx.error("both entries must be > 0", list(item))
        out.append((x, y))
    xs = [p[0] for p in out]
    for i in range(1, len(xs)):
        if xs[i] <= xs[i - 1]:
            raise ctx.sub(str(i)).error(
                f"x values must be strictly ascending ({xs[i - 1]:g} then {xs[i]:g})", value[i]
            )
    return tuple(out)


def curve_quantity(ctx: Ctx, raw: Any) -> Quantity:
    """A (bytes, bytes/s) curve. ``unit`` scales the bandwidth column; sizes are bytes.

    Besides ascending sizes we require the implied copy time ``size / bandwidth`` not to fall
    with size: a curve that says a bigger copy finishes sooner is a typo, and the check is
    what makes interpolated transfer times monotone.
    """
    if raw is None:
        return missing(ctx.path)
    value, unit, kind, source = _split(ctx, raw)
    if value is None:
        return Quantity(None, kind, source, ctx.path)
    points = _pairs(ctx.sub("value"), value, _unit_factor(ctx, unit, "Bps"))
    for i, (size, bw) in enumerate(points):
        if size != int(size):
            raise ctx.sub("value").sub(str(i)).error("transfer size must be whole bytes", size)
        check_plausible(ctx.sub("value").sub(str(i)), bw, "Bps", list(value[i]))
    for i in range(1, len(points)):
        (s0, b0), (s1, b1) = points[i - 1], points[i]
        if s1 / b1 < s0 / b0 * (1 - 1e-12):
            raise ctx.sub("value").sub(str(i)).error(
                "bandwidth rises faster than size here, so the bigger copy would finish "
                f"sooner ({s0:g} B in {s0 / b0:.3g} s vs {s1:g} B in {s1 / b1:.3g} s)",
                list(value[i]),
            )
    pts = tuple((int(s), b) for s, b in points)
    return Quantity(pts, kind, source, ctx.path)


def table_quantity(ctx: Ctx, raw: Any, scalar_x: float = 1.0) -> Quantity:
    """Seconds as a scalar or as [[x, seconds], ...] with ascending x.

    The value is always stored as a tuple of (x, seconds) pairs; a scalar becomes
    ``((scalar_x, s),)`` (batch 1 for most fields, the measured context for attention).
    """
    if raw is None:
        return missing(ctx.path)
    value, unit, kind, source = _split(ctx, raw)
    if value is None:
        return Quantity(None, kind, source, ctx.path)
    factor = _unit_factor(ctx, unit, "s")
    if isinstance(value, Sequence) and not isinstance(value, str):
        pts = _pairs(ctx.sub("value"), value, factor)
    else:
        x = as_number(ctx.sub("value"), value) * factor
        check_range(ctx.sub("value"), x, "s", value, positive=True)
        pts = ((scalar_x, x),)
    return Quantity(pts, kind, source, ctx.path)


def series_quantity(ctx: Ctx, raw: Any, dim: str, *, whole_x: bool = False) -> Quantity:
    """``[[x, y], ...]`` with strictly ascending x > 0 and y > 0 in ``dim`` (``unit`` scales y).

    Used for measured series that are not copy curves: aggregate read bandwidth by reader
    count, slowdown factors by reader count. ``whole_x`` requires whole-number x (counts).
    """
    if raw is None:
        return missing(ctx.path)
    value, unit, kind, source = _split(ctx, raw)
    if value is None:
        return Quantity(None, kind, source, ctx.path)
    pts = _pairs(ctx.sub("value"), value, _unit_factor(ctx, unit, dim))
    if whole_x:
        for i, (x, _) in enumerate(pts):
            if x != int(x):
                raise ctx.sub("value").sub(str(i)).error("x must be a whole number", x)
    return Quantity(pts, kind, source, ctx.path)
