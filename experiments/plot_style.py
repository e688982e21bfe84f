"""One table of display names, units, orders and colours for every moesim figure.

``moesim-plot`` and ``plot_validation`` read metric names, factor names and their units from
here, so an axis label cannot disagree with the docs' Metrics table, and a value in
seconds is never printed on an "ms" axis: :func:`unit_scale` picks the unit from the data of the
whole axis. The palette is Okabe and Ito's colour-blind-safe set (defined here rather than taken
from seaborn, which is not a runtime dependency); markers and dash patterns vary with the series
too, so series stay distinguishable in grey and where they overlap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

# Okabe & Ito (2008), "Color Universal Design"; black last (it reads as an axis colour).
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9",
                            "#F0E442", "#000000")
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
DASHES: tuple[object, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)),
                              (0, (1, 3)), (0, (4, 2, 1, 2, 1, 2)))

# TrueType (Type 42) fonts in PDF and PostScript files: matplotlib's default, Type 3, is refused
# by the ACM and IEEE PDF checks. Read when a file is written, so every save goes through
# :func:`savefig` (also the link-curve and trace-statistics figures outside moesim-plot).
FONTS = {"pdf.fonttype": 42, "ps.fonttype": 42}

STYLE = {
    **FONTS,
    "figure.dpi": 120,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
}



def savefig(fig: Figure, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)`` with the venue-safe font types of :data:`FONTS`."""
    with mpl.rc_context(FONTS):
        fig.savefig(path, **kwargs)


# kind: time (seconds), bytes, fraction (shown as %), ratio (plain number), count
KINDS = ("time", "bytes", "fraction", "ratio", "count")


@dataclass(frozen=True)
class Quantity:
    """How one column is named on an axis and in which unit family it is scaled."""

    label: str
    kind: str = "ratio"
    timed_only: bool = False  # meaningless (zero or NaN) in zero-latency runs
    of: str = ""  # a share of what: "(% of routed experts)"


def _t(label: str) -> Quantity:
    return Quantity(label, "time", timed_only=True)


# The docs' Metrics table (summary.parquet), by column. Keep the labels short: they are axis
# labels; the definitions live in experiments/docs/pages/metrics.md.
METRICS: dict[str, Quantity] = {
    "accesses": Quantity("accesses", "count"),
    "hits": Quantity("hits", "count"),
    "late_hits": Quantity("late hits", "count"),
    "promoted": Quantity("promoted demand copies", "count"),
    "misses": Quantity("misses", "count"),
    "hit_rate": Quantity("hit rate", "fraction"),
    "hit_rate_incl_late": Quantity("hit rate incl. late hits", "fraction"),
    "miss_rate": Quantity("miss rate", "fraction"),
    "steps": Quantity("steps", "count"),
    "tokens": Quantity("tokens", "count"),
    "output_tokens": Quantity("output tokens", "count"),
    "token_expert_pairs": Quantity("tokens x k", "count"),
    "unique_experts_per_pair": Quantity("unique experts / (tokens x k)", "ratio"),
    "stall_time_s": _t("stall time"),
    "stall_miss_s": _t("stall on demand copies"),
    "stall_late_s": _t("stall on late prefetches"),
    "total_time_s": _t("simulated time"),
    "time_per_output_token_s": _t("time per output token"),
    "stall_per_output_token_s": _t("stall per output token"),
    "stall_fraction": Quantity("stall share of time", "fraction", timed_only=True),
    "pcie_busy_fraction": Quantity("link busy", "fraction", timed_only=True),
    "evictions": Quantity("evictions", "count"),
    "demand_fetches": Quantity("demand copies", "count"),
    "demand_bytes": Quantity("bytes copied on demand", "bytes"),
    "prefetch_issued": Quantity("prefetches issued", "count"),
    "prefetch_transfers": Quantity("prefetch transfers", "count"),
    "prefetch_bytes": Quantity("bytes prefetched", "bytes"),
    "prefetch_dropped": Quantity("prefetches dropped", "count"),
    "prefetch_cancelled": Quantity("prefetches cancelled", "count"),
    "prefetch_useful": Quantity("useful prefetches", "count"),
    "prefetch_wasted": Quantity("wasted prefetches", "count"),
    "prefetch_unused_at_end": Quantity("prefetches unused at end", "count"),
    "prefetch_served": Quantity("accesses served by a prefetch", "count"),
    "prefetch_precision": Quantity("prefetch precision", "fraction"),
    "prefetch_recall": Quantity("prefetch recall", "fraction"),
    "wasted_prefetch_bytes": Quantity("bytes of wasted prefetches", "bytes"),
    "unused_prefetch_bytes_at_end": Quantity("prefetch bytes unused at end", "bytes"),
    "prediction_coverage": Quantity("prediction coverage", "fraction"),
    "stall_cpu_s": _t("stall on host-CPU experts"),
    "cpu_expert_execs": Quantity("experts run on the host CPU", "count"),
    "cpu_busy_fraction": Quantity("host CPU busy", "fraction", timed_only=True),
    "low_precision_fetches": Quantity("low-precision copies", "count"),
    "low_precision_bytes": Quantity("bytes copied at low precision", "bytes"),
    "skipped_experts": Quantity("experts skipped", "count"),
    "gate_mass_full": Quantity("gate mass at full precision", "fraction"),
    "gate_mass_low_precision": Quantity("gate mass at low precision", "fraction"),
    "gate_mass_skipped": Quantity("gate mass skipped", "fraction"),
    "tpot_p50_s": _t("median time per output token"),
    "tpot_p90_s": _t("p90 time per output token"),
    "tpot_p99_s": _t("p99 time per output token"),
    "run.wall_s": Quantity("wall time per run", "time"),
    "run.cpu_s": Quantity("CPU time per run", "time"),
}

# Swept config options that name an axis or a facet.
FACTORS: dict[str, Quantity] = {
    "cache.capacity_fraction": Quantity("cache capacity", "fraction", of="routed experts"),
    "cache.fraction": Quantity("cache capacity", "fraction", of="routed experts"),
    "cache.capacity_bytes": Quantity("cache capacity", "bytes"),
    "cache.bytes": Quantity("cache capacity", "bytes"),
    "cache.slots": Quantity("cache capacity (experts)", "count"),
    "cache.experts": Quantity("cache capacity (experts)", "count"),
    "batch": Quantity("batch size (requests)", "count"),
    "hw.name": Quantity("hardware profile"),
    "policy.name": Quantity("policy"),
    "placement": Quantity("placement of missed experts"),
    "placement_params.threshold": Quantity("gate-weight threshold"),
    "placement_params.bits": Quantity("low-precision bits", "count"),
    "placement_params.layers": Quantity("layers on the host CPU", "count"),
    "label": Quantity("predictor"),
    "compute_scale": Quantity("compute time scale (x)"),
    "policy.point": Quantity("prediction issued at"),
    "policy.lookahead": Quantity("layers ahead", "count"),
    "policy.ahead": Quantity("layers ahead", "count"),
    "mode": Quantity("mode"),
    "trace.name": Quantity("trace"),
    "seed": Quantity("seed", "count"),
    "warmup_tokens": Quantity("warm-up tokens", "count"),
    "link.expert_transfer_s": Quantity("copy time per expert", "time"),
    "runtime.name": Quantity("offloading runtime"),
    "runtime.model": Quantity("runtime's model"),
    "model.name": Quantity("model"),
    "trace.path": Quantity("trace file"),
    "trace.format": Quantity("trace format"),
    "trace.requests": Quantity("requests in the trace", "count"),
    "trace.tokens": Quantity("tokens in the trace", "count"),
    "policy.eviction": Quantity("eviction policy"),
    "policy.prefetch": Quantity("prefetch policy"),
    "policy.prefetch_touch": Quantity("prefetch counts as a use"),
    "cache.mib": Quantity("cache capacity (MiB)"),
    "cache.sizing": Quantity("cache sizing"),
    "cache.partition": Quantity("cache partition"),
    "cache.pin_layer": Quantity("cache pinned per layer"),
    "cache.pin_layer_effective": Quantity("cache pinned per layer (effective)"),
    "cache.prefill": Quantity("cache during prefill"),
    "cache.reset_per_request": Quantity("cache reset per request"),
    "replay": Quantity("replay"),
    "prefill_chunk": Quantity("prefill chunk (tokens)", "count"),
    "warmup_extra_row": Quantity("warm-up extra row"),
    "engine": Quantity("simulation engine"),
    "max_requests": Quantity("requests (at most)", "count"),
    "max_tokens": Quantity("tokens per request (at most)", "count"),
    "requests": Quantity("requests"),
    "predictions.path": Quantity("prediction table"),
    "predictions.min_coverage": Quantity("minimum prediction coverage", "fraction"),
    "weights.experts_bits": Quantity("expert weight bits", "count"),
    "weights.attention_bits": Quantity("attention weight bits", "count"),
    "weights.shared_bits": Quantity("shared-expert weight bits", "count"),
}
# A config group's name in a readable fallback (``placement_params.x`` -> "placement x"); a
# group mapped to "" is left out (``hw.host_link.pinned.peak_bandwidth_Bps`` -> "host link
# pinned peak bandwidth (B/s)").
GROUP_NAMES: dict[str, str] = {"placement_params": "placement", "hw": "", "weights": "",
                               "predictions": "prediction", "output": "output"}
# Unit suffixes of field names: (suffix, unit printed, kind).
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    ("_Bps", "B/s", "ratio"), ("_flops", "FLOP/s", "ratio"), ("_bytes", "", "bytes"),
    ("_s", "", "time"))

# Policies: baselines (past only) first, then prefetchers, then oracles (they know the future).
POLICY_ORDER: tuple[str, ...] = (
    "fifo", "lru", "lfu", "least_stale", "fate_arc", "moe_infinity_lfu", "moe_infinity_priority",
    "next_layer_all", "moe_infinity", "moe_beyond_replay", "prediction_prefetch",
    "static", "belady", "oracle_prefetch",
)
POLICY_NAMES: dict[str, str] = {
    "fifo": "FIFO", "lru": "LRU", "lfu": "LFU", "least_stale": "least-stale",
    "fate_arc": "Fate ARC", "moe_infinity_lfu": "MoE-Infinity LFU",
    "moe_infinity_priority": "MoE-Infinity priority", "next_layer_all": "next layer (all)",
    "moe_infinity": "MoE-Infinity", "moe_beyond_replay": "MoE-Beyond replay",
    "prediction_prefetch": "prediction prefetch", "static": "static (oracle)",
    "belady": "Belady (oracle)", "oracle_prefetch": "oracle prefetch",
}
# experiments/conf/predictor entries, by how early their prediction exists, oracles last.
PREDICTOR_ORDER: tuple[str, ...] = (
    "none", "pre_attention", "moe_beyond_causal", "moe_beyond_text", "fate", "speculation",
    "oracle_pre_attention", "oracle_routed", "oracle_next_layer", "oracle_two_layers",
)
PREDICTOR_NAMES: dict[str, str] = {
    "none": "none (LRU)", "pre_attention": "pre-attention",
    "moe_beyond_causal": "MoE-Beyond (router input)", "moe_beyond_text": "MoE-Beyond (text)",
    "fate": "Fate", "speculation": "speculation",
    "oracle_pre_attention": "oracle, pre-attention", "oracle_routed": "oracle, routed",
    "oracle_next_layer": "oracle, next layer", "oracle_two_layers": "oracle, two layers",
}
POINT_ORDER: tuple[str, ...] = ("pre_attention", "routed", "demand_issued")
POINT_NAMES: dict[str, str] = {"pre_attention": "pre-attention", "routed": "routed",
                               "demand_issued": "after demand"}
MODE_NAMES: dict[str, str] = {"timed": "timed", "zero_latency": "zero-latency"}
# Placements: the default first, then the CPU ones, then the approximate ones.
PLACEMENT_ORDER: tuple[str, ...] = ("fetch", "cpu_on_miss", "fetch_or_cpu", "static_cpu",
                                    "cpu_layers", "layer_offload", "low_precision_fetch",
                                    "skip_low_weight")
PLACEMENT_NAMES: dict[str, str] = {
    "fetch": "fetch", "cpu_on_miss": "CPU on miss", "fetch_or_cpu": "fetch or CPU",
    "static_cpu": "first layers on CPU", "cpu_layers": "last layers whole on CPU",
    "layer_offload": "last layers copied in", "low_precision_fetch": "low-precision fetch",
    "skip_low_weight": "skip low-weight experts",
}
LEVEL_ORDER: dict[str, tuple[str, ...]] = {"policy.name": POLICY_ORDER, "label": PREDICTOR_ORDER,
                                           "policy.point": POINT_ORDER,
                                           "mode": ("timed", "zero_latency"),
                                           "placement": PLACEMENT_ORDER}
LEVEL_NAMES: dict[str, dict[str, str]] = {"policy.name": POLICY_NAMES, "label": PREDICTOR_NAMES,
                                          "policy.point": POINT_NAMES, "mode": MODE_NAMES,
                                          "placement": PLACEMENT_NAMES}

_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))
_BYTE_UNITS = ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1.0, "B"))


def readable(key: str) -> str:
    """A name for a column no table knows: no dots, no underscores, no unit suffix, its config
    group named as a word (``placement_params.min_gate`` -> "placement min gate")."""
    group, dot, rest = key.partition(".")
    if dot:
        parts = ([GROUP_NAMES.get(group, group)] if GROUP_NAMES.get(group, group) else [])
        parts += rest.split(".")
    else:
        parts = [key]
    for suffix, _unit, _kind in _SUFFIXES:
        if parts[-1].endswith(suffix) and len(parts[-1]) > len(suffix):
            parts[-1] = parts[-1].removesuffix(suffix)
            break
    return " ".join(p.replace("_", " ").strip() for p in parts if p).strip() or key


def quantity(column: str) -> Quantity:
    """The column's display name and unit family; unknown columns get a readable name
    (:func:`readable`) and a unit family from their suffix (``_s`` seconds, ``bytes`` bytes,
    ``fraction``/``rate`` shares), so new metrics and config keys plot correctly before they
    are added to :data:`METRICS` or :data:`FACTORS`."""
    if column in METRICS:
        return METRICS[column]
    if column in FACTORS:
        return FACTORS[column]
    name = readable(column)
    if column.endswith("_s") or "_s_p" in column:
        return Quantity(name, "time", timed_only="." not in column)
    if "bytes" in column:
        return Quantity(name, "bytes")
    for suffix, unit, _kind in _SUFFIXES[:2]:
        if column.endswith(suffix):
            return Quantity(f"{name} ({unit})")
    if column.endswith(("fraction", "_rate", "precision", "recall")):
        return Quantity(name, "fraction")
    return Quantity(name)


def unit_scale(kind: str, values: Iterable[float]) -> tuple[float, str]:
    """Factor to multiply by and unit to print for an axis showing ``values`` of ``kind``.

    Times and bytes take the largest unit the axis's largest magnitude reaches at least once
    (5e-6 s -> µs, 2e10 B -> GB); fractions are always percent; others are unscaled.
    """
    if kind == "fraction":
        return 100.0, "%"
    if kind not in ("time", "bytes"):
        return 1.0, ""
    finite = [abs(float(v)) for v in values if v is not None and math.isfinite(float(v))]
    top = max((v for v in finite if v > 0), default=0.0)
    units = _TIME_UNITS if kind == "time" else _BYTE_UNITS
    for size, unit in units:
        if top >= size:
            return 1.0 / size, unit
    size, unit = units[-1] if top > 0 else units[0 if kind == "time" else -1]
    return 1.0 / size, unit


def log_middle(values: Iterable[float]) -> float:
    """The geometric middle of the positive values: on a log axis the unit is chosen from it,
    so ticks read 20, 200, 2000 ms rather than 0.02 to 2 s or 20,000 µs."""
    pos = [float(v) for v in values if v is not None and math.isfinite(float(v)) and v > 0]
    return math.sqrt(min(pos) * max(pos)) if pos else 0.0


def readable_log_ticks(axis: Axis) -> None:
    """Ticks at 1, 2, 5 x 10^k printed as plain numbers (no 10^-1 exponents)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def axis_label(column: str, unit: str, log: bool = False) -> str:
    """``label (unit)``, ``label (unit, log scale)`` on a log axis: the reader of a printed
    figure cannot tell 1-2-5 ticks of a log axis from a linear one without it."""
    q = quantity(column)
    notes = [f"% of {q.of}" if unit == "%" and q.of else unit, "log scale" if log else ""]
    inside = ", ".join(n for n in notes if n)
    return f"{q.label} ({inside})" if inside else q.label


def level_name(factor: str, value: object) -> str:
    """How one value of a factor is printed in a legend, tick or panel title."""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    names = LEVEL_NAMES.get(factor)
    if names is not None:
        return names.get(str(value), str(value))
    if factor == "compute_scale":
        return f"x{float(value):g}"  # type: ignore[arg-type]
    kind = quantity(factor).kind
    if kind in ("fraction", "time", "bytes") and isinstance(value, (int, float)):
        scale, unit = unit_scale(kind, [float(value)])
        return f"{float(value) * scale:g}{'' if unit == '%' else ' '}{unit}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def level_order(factor: str, values: Iterable[object]) -> list[object]:
    """Distinct values in display order: the known order of policies and predictors (baselines
    first, oracles last), numbers ascending, anything else as first seen."""
    distinct = list(dict.fromkeys(v for v in values
                                  if not (isinstance(v, float) and math.isnan(v))))
    known = LEVEL_ORDER.get(factor)
    if known is not None:
        rank = {name: i for i, name in enumerate(known)}
        return sorted(distinct, key=lambda v: (rank.get(str(v), len(rank)), str(v)))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)  # type: ignore[type-var]
    return distinct


def policy_label(label: str) -> str:
    """A validation config's policy label (``oracle_prefetch@pre_attention+0``) for a legend:
    the policy's display name, then where and how far ahead it prefetches."""
    base, _, rest = label.partition("@")
    name = POLICY_NAMES.get(base, base)
    if not rest:
        return name
    for point, shown in POINT_NAMES.items():
        rest = rest.replace(point, shown)
    return f"{name} @ {rest}"


def policy_label_order(labels: Iterable[str]) -> list[str]:
    """Labels ordered by their policy (baselines first, oracles last), then as written."""
    rank = {name: i for i, name in enumerate(POLICY_ORDER)}
    return sorted(dict.fromkeys(labels),
                  key=lambda v: (rank.get(v.partition("@")[0], len(rank)), v))
