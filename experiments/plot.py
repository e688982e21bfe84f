"""``moesim-plot DIR``: gather every run's ``summary.parquet`` below DIR into one table and draw
one figure of the sweep (PNG and PDF), with axes, series and panels chosen from what the sweep
varied or given by ``--x``, ``--hue``, ``--style``, ``--col``, ``--row`` and ``--metric``.

Rules the figure keeps, so that it cannot mislead:

* every config column that varies in the table is plotted (an axis, a series or a panel) or
  pinned with ``--where``; otherwise the command refuses and names it (several runs are never
  averaged or shaded over a factor the reader cannot see);
* uncertainty is drawn only over seeds (mean and a 95 % t interval when the runs differ only in
  ``seed``) or over requests (a bootstrap interval from ``per_request.parquet`` beside a run's
  summary, for per-token times), and the legend says which and over how many;
* a categorical x (hardware profile, prediction point, policy, predictor) gets dodged points,
  never lines; a numeric x gets lines with markers, on a log axis when it spans a decade;
* each series has its own colour (Okabe-Ito), marker and dash pattern; units are chosen per
  axis from the data (µs/ms/s, B/KB/MB/GB/TB, shares in %), names come from one table
  (:mod:`moesim.experiments.plot_style`), a log axis says so in its label;
* panels form a grid that never mixes metrics along a line: metrics as rows and the ``--col``
  values as columns (``--row`` values nest under each metric), or with ``--row`` alone its
  values as rows and metrics as columns; tick labels never overlap (turned or thinned);
* PDFs embed TrueType fonts (no Type 3, which paper submission checks refuse).

Runs that have not finished have no summary yet and are simply not included, so this can be
pointed at a sweep that is still running. A run folder holding ``timeline.json`` is drawn as a
Gantt chart, a ``validation.parquet`` folder as predicted against measured.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from moesim.experiments import plot_style as ps
from moesim.experiments.plot_style import STYLE

FORMATS = ("png", "pdf", "svg")
# Columns that describe a run but are not a factor of its result.
NOT_FACTORS = frozenset({"config_hash", "run_dir", "sim_engine", "progress", "output.transfers",
                         "output.timeline_steps"})
# Config columns a sweep may vary outside the dotted groups (the schema's top-level options).
TOP_LEVEL = frozenset({"mode", "replay", "prefill_chunk", "batch", "warmup_tokens",
                       "warmup_extra_row", "seed", "engine", "max_requests", "max_tokens",
                       "requests", "label", "compute_scale", "placement"})
# Which varying factor takes a role first (x, then series, then panels).
PRIMARY = ("label", "policy.name", "placement", "cache.fraction", "cache.capacity_fraction",
           "cache.experts", "cache.bytes", "batch", "hw.name", "compute_scale", "policy.point",
           "policy.lookahead", "policy.ahead", "mode", "trace.name")
SERIES_FIRST = ("label", "policy.name", "policy.point")
PANEL_FIRST = ("mode", "trace.name", "hw.name")
STEMS = {"cache.capacity_fraction": "capacity", "cache.fraction": "capacity",
         "cache.experts": "capacity", "cache.bytes": "capacity", "hw.name": "link",
         "batch": "batch"}
# per_request.parquet's per-token metrics, which a bootstrap over requests may use (the table
# has no stall column: stall per token gets no request interval)
PER_REQUEST = ("time_per_output_token_s",)
N_BOOT = 2000
WRAP = 3
PANEL_SIZE = (3.3, 2.6)  # inches per panel
# two-sided 95 % Student t quantiles by degrees of freedom (no scipy at run time)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class PlotError(ValueError):
    """A bad option or a table that cannot be drawn honestly: one line for the user, exit 2."""


@dataclass(frozen=True)
class Spec:
    """What the figure shows: x, series (hue, style), panels (col, row) and metrics."""

    x: str
    metrics: tuple[str, ...]
    hue: str | None = None
    style: str | None = None
    col: str | None = None
    row: str | None = None
    yscale: str = "auto"  # auto | linear | log
    relative: tuple[str, str] | None = None  # (column, value): metrics as change against it

    def roles(self) -> list[str]:
        return [r for r in (self.x, self.hue, self.style, self.col, self.row) if r]


@dataclass
class Cells:
    """One metric aggregated per plotted cell: mean, interval and how it was obtained."""

    table: pd.DataFrame  # role columns + mean, lo, hi, n, ci ("" | "seeds" | "requests")
    metric: str = ""

    def ci_label(self) -> str | None:
        """The legend text for the interval drawn, or None when none is drawn."""
        for kind, unit in (("seeds", "seeds"), ("requests", "requests")):
            n = self.table.loc[self.table["ci"] == kind, "n"]
            if len(n):
                lo, hi = int(n.min()), int(n.max())
                count = f"{lo}" if lo == hi else f"{lo}-{hi}"
                what = "mean, 95% CI" if kind == "seeds" else "95% bootstrap CI"
                return f"{what} over {count} {unit}"
        return None


@dataclass
class Sweep:
    """The runs of a sweep (one row each) and, where runs wrote one, their per-request rows."""

    runs: pd.DataFrame
    per_request: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def save_figure(fig: plt.Figure, out: Path, stem: str, dpi: float | None = None,
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.<format>`` into ``out`` and close the figure. No creation date in the PDF,
    so the same data gives the same file (committed figures do not churn); TrueType fonts
    (:data:`~moesim.experiments.plot_style.FONTS`)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in formats]
    for path in paths:
        meta = {"CreationDate": None} if path.suffix == ".pdf" else None
        ps.savefig(fig, path, dpi=dpi or "figure", metadata=meta)
    plt.close(fig)
    return paths


def collect(root: Path) -> pd.DataFrame:
    """Concatenate all summaries below ``root`` (the aggregate itself excluded)."""
    files = sorted(p for p in root.rglob("summary.parquet"))
    if not files:
        raise FileNotFoundError(f"no summary.parquet below {root}")
    frames = [df for f in files if (df := _read_run_table(f, root)) is not None]
    if not frames:
        raise FileNotFoundError(f"no readable summary.parquet below {root}")
    return pd.concat(frames, ignore_index=True)


def _read_run_table(path: Path, root: Path) -> pd.DataFrame | None:
    """One run's table tagged with its run_dir, or None (named on stderr) when it cannot be
    read: a 0-byte or truncated file of a run killed mid-write, a folder without read access.
    One bad run folder used to stop the whole plot with a traceback."""
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        print(f"moesim-plot: skipped {path.parent}: unreadable {path.name} ({why})",
              file=sys.stderr)
        return None
    df["run_dir"] = str(path.parent.relative_to(root))
    return df


def collect_per_request(root: Path) -> pd.DataFrame | None:
    """Every ``per_request.parquet`` beside a summary below ``root``, tagged with its run_dir."""
    frames = []
    for f in sorted(root.rglob("per_request.parquet")):
        if not (f.parent / "summary.parquet").is_file():
            continue
        if (df := _read_run_table(f, root)) is not None:
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


# --- which columns are factors, which vary, which are plotted ------------------------------

def factor_columns(df: pd.DataFrame) -> list[str]:
    """Config columns (the flattened run config and what it determines), not results."""
    return [c for c in df.columns
            if c not in ps.METRICS and c not in NOT_FACTORS
            and not c.startswith(("moesim.", "run."))
            and ("." in c or c in TOP_LEVEL)]


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric result columns: what ``--metric`` may name."""
    factors = set(factor_columns(df))
    return [c for c in df.columns if c not in factors and c not in NOT_FACTORS
            and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]


def _text(s: pd.Series) -> pd.Series:
    return s.map(repr)  # None, NaN, lists and numbers compared as written


def varies(df: pd.DataFrame, col: str) -> bool:
    return col in df and _text(df[col]).nunique() > 1


def determined(df: pd.DataFrame, by: Sequence[str], col: str) -> bool:
    """True when ``col`` takes one value for each combination of ``by`` (e.g. ``cache.slots``
    given ``cache.capacity_fraction``, ``policy.eviction`` given ``policy.name``)."""
    if not by:
        return not varies(df, col)
    keys = [_text(df[b]) for b in by]
    return bool(_text(df[col]).groupby(keys).nunique().max() <= 1)


def primary_factors(df: pd.DataFrame) -> list[str]:
    """The varying factors, minus those determined by earlier ones (``PRIMARY`` order)."""
    factors = factor_columns(df)
    rank = {c: i for i, c in enumerate(PRIMARY)}
    cands = sorted((c for c in factors if c != "seed" and varies(df, c)),
                   key=lambda c: (rank.get(c, len(rank)), factors.index(c)))
    chosen: list[str] = []
    for c in cands:
        if not determined(df, chosen, c):
            chosen.append(c)
    return chosen


def _levels_text(df: pd.DataFrame, col: str, limit: int = 6) -> str:
    vals = [str(v) for v in ps.level_order(col, df[col].tolist())]
    more = f", ... ({len(vals)} values)" if len(vals) > limit else ""
    return ", ".join(vals[:limit]) + more


def _check_column(df: pd.DataFrame, option: str, name: str) -> None:
    if name not in df.columns:
        swept = primary_factors(df)
        rest = [c for c in factor_columns(df) if c not in swept]
        raise PlotError(f"{option} {name!r}: no such column; swept: {', '.join(swept) or '-'}; "
                        f"other config columns: {', '.join(rest)}")


def apply_where(df: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Keep the rows matching every ``key=value[,value...]`` (values as printed, or numbers)."""
    for item in where:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise PlotError(f"--where {item!r}: expected KEY=VALUE[,VALUE...]")
        _check_column(df, "--where", key)
        wanted = values.split(",")
        mask = _level_mask(df[key], wanted)
        if not mask.any():
            raise PlotError(f"--where {item}: no run has {key} in {wanted}; values: "
                            f"{_levels_text(df, key)}")
        df = df[mask]
    return df


def _level_mask(col: pd.Series, wanted: Sequence[str]) -> pd.Series:
    """Rows whose value is one of ``wanted`` (as printed, or numerically equal)."""
    mask = col.astype(str).isin(wanted)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        nums = [float(v) for v in wanted if _is_number(v)]
        mask |= col.apply(lambda v: any(math.isclose(v, n) for n in nums))
    return mask


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def default_metrics(df: pd.DataFrame, roles: Sequence[str]) -> list[str]:
    """Hit rate, and per-token stall and time when some runs are timed (as before); batch
    sweeps add deduplication and bytes moved."""
    out = ["hit_rate"]
    if "batch" in roles:
        out += ["unique_experts_per_pair", "demand_bytes"]
    if "mode" not in df or (df["mode"] == "timed").any():
        out += ["stall_per_output_token_s", "time_per_output_token_s"]
    return [m for m in out if m in df]


def choose_spec(df: pd.DataFrame, *, x: str | None = None, hue: str | None = None,
                style: str | None = None, col: str | None = None, row: str | None = None,
                metrics: Sequence[str] | None = None, yscale: str = "auto",
                relative: str | None = None) -> Spec:
    """Fill the roles not given from the varying factors and check that nothing varies unseen.

    Defaults: series by predictor or policy, x the first numeric swept factor (capacity, batch,
    compute scale, ...) else a categorical one (hardware, prediction point), then panels by
    mode, trace or what is left. Raises :class:`PlotError` naming what is wrong.
    """
    given = {"--x": x, "--hue": hue, "--style": style, "--col": col, "--row": row}
    for option, name in given.items():
        if name is not None:
            _check_column(df, option, name)
    named = [n for n in given.values() if n is not None]
    if len(set(named)) < len(named):
        raise PlotError(f"one column in two roles: {', '.join(named)}")
    if yscale not in ("auto", "linear", "log"):
        raise PlotError(f"--yscale {yscale!r}: choose auto, linear or log")
    valid = metric_columns(df)
    for m in metrics or ():
        if m not in valid:
            raise PlotError(f"--metric {m!r}: not in the table; choose from: {', '.join(valid)}")
    primary = primary_factors(df)

    def free() -> list[str]:
        taken = [r for r in (x, hue, style, col, row) if r]
        return [c for c in primary if c not in taken and not (taken and determined(df, taken, c))]

    if hue is None and x not in SERIES_FIRST:
        hue = next((c for c in SERIES_FIRST if c in free()), None)
    if x is None:
        left = free()
        numeric = [c for c in left if pd.api.types.is_numeric_dtype(df[c])
                   and c not in PANEL_FIRST]
        x = (numeric or [c for c in left if c not in PANEL_FIRST] or left or [None])[0]
        if x is None:  # nothing varies: one point per series
            x = hue or ("policy.name" if "policy.name" in df else factor_columns(df)[0])
            hue = None if hue == x else hue
    if hue is None:
        left = free()
        hue = next((c for c in left if c not in PANEL_FIRST), None)
    for role in ("col", "row"):
        if (col if role == "col" else row) is None:
            left = free()
            pick = next((c for c in left if c in PANEL_FIRST), left[0] if left else None)
            if role == "col":
                col = pick
            else:
                row = pick
    unseen = free()
    if unseen:
        what = "; ".join(f"{c} ({_levels_text(df, c)})" for c in unseen)
        first = unseen[0]
        raise PlotError(f"not plotted but varying: {what}; show it with --style {first} (or "
                        f"--col/--row), or keep one value with --where {first}=VALUE")
    roles = [r for r in (x, hue, style, col, row) if r]
    chosen = list(metrics) if metrics else default_metrics(df, roles)
    if not chosen:
        raise PlotError(f"no default metric in the table; choose --metric from: {', '.join(valid)}")
    base = None
    if relative is not None:
        key, sep, value = relative.partition("=")
        if not sep or key not in roles:
            raise PlotError(f"--relative-to {relative!r}: expected KEY=VALUE with KEY one of the "
                            f"plotted columns ({', '.join(roles)})")
        if not _level_mask(df[key], [value]).any():
            raise PlotError(f"--relative-to {relative}: no run has {key}={value}; values: "
                            f"{_levels_text(df, key)}")
        base = (key, value)
    return Spec(x=x, hue=hue, style=style, col=col, row=row, metrics=tuple(chosen),
                yscale=yscale, relative=base)


def default_stem(spec: Spec) -> str:
    """Figure file name: the names older versions used (capacity, link, batch, ...)."""
    roles = spec.roles()
    if "label" in roles:
        return "predictors"
    if {"policy.point", "policy.lookahead"} & {spec.x, spec.hue}:
        return "prediction_point"
    return STEMS.get(spec.x, spec.x.replace(".", "_"))


# --- aggregation: means and intervals per cell ----------------------------------------------

def t975(dof: int) -> float:
    """Two-sided 95 % Student t quantile (table to 30, then a 1/dof expansion)."""
    return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof


def bootstrap_ci(values: np.ndarray, weights: np.ndarray, seed: int,
                 n_boot: int = N_BOOT) -> tuple[float, float]:
    """Percentile 95 % interval of the weighted mean, resampling rows (requests) with
    replacement. Weighting per-request time per token by output tokens gives the summary's
    ratio of totals, so the interval is about the plotted statistic."""
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = np.empty(n_boot)
    block = max(1, 2_000_000 // max(n, 1))
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(block, n_boot - start), n))
        w = weights[idx]
        stats[start:start + len(idx)] = (values[idx] * w).sum(axis=1) / w.sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _per_request_values(per_request: pd.DataFrame | None, run_dir: str, metric: str
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    if per_request is None or metric not in PER_REQUEST or metric not in per_request:
        return None
    col = metric
    rows = per_request[per_request["run_dir"] == run_dir]
    rows = rows[np.isfinite(rows[col].astype(float))]
    if len(rows) < 2:
        return None
    weights = (rows["output_tokens"].to_numpy(float) if "output_tokens" in rows
               else np.ones(len(rows)))
    keep = weights > 0
    return rows[col].to_numpy(float)[keep], weights[keep]


def relative_frame(df: pd.DataFrame, spec: Spec, metric: str) -> pd.DataFrame:
    """The runs other than the reference, ``metric`` replaced by its relative change against
    the reference run that matches on every other plotted column (and seed): ``v / ref - 1``,
    NaN where the reference is 0 or missing."""
    assert spec.relative is not None
    key, value = spec.relative
    is_ref = _level_mask(df[key], [value])
    keys = [r for r in spec.roles() if r != key]
    if "seed" in df and "seed" not in keys:
        keys.append("seed")
    text = [f"_k{i}" for i in range(len(keys))]
    tagged = df.assign(**{t: _text(df[k]) for t, k in zip(text, keys, strict=True)})
    ref = tagged[is_ref].groupby(text)[metric].mean().rename("_ref") if text else (
        pd.Series({(): df.loc[is_ref, metric].mean()}, name="_ref"))
    rows = tagged[~is_ref]
    joined = rows.join(ref, on=text) if text else rows.assign(_ref=float(ref.iloc[0]))
    joined[metric] = joined[metric] / joined["_ref"].where(joined["_ref"] != 0) - 1.0
    return joined.drop(columns=[*text, "_ref"])


def _same(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(abs(a), abs(b))


def aggregate(df: pd.DataFrame, spec: Spec, metric: str, per_request: pd.DataFrame | None = None,
              seed: int = 0) -> Cells:
    """Mean of ``metric`` per cell of the plotted roles, with a 95 % interval over seeds (when
    the runs of a cell differ in ``seed``) or over requests (one run with per-request rows)."""
    roles = spec.roles()
    rows = df
    if ps.quantity(metric).timed_only and "mode" in rows:
        rows = rows[rows["mode"] != "zero_latency"]
    rows = rows[np.isfinite(rows[metric].astype(float))]
    by_seed = "seed" in rows and "seed" not in roles
    out = []
    for keys, g in rows.groupby(roles, dropna=False, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        rec: dict[str, Any] = dict(zip(roles, keys, strict=True))
        vals = g.groupby("seed")[metric].mean() if by_seed else g[metric]
        mean = float(vals.mean())
        lo = hi = math.nan
        ci, n = "", len(vals)
        if by_seed and n > 1:
            half = t975(n - 1) * float(vals.std(ddof=1)) / math.sqrt(n)
            lo, hi, ci = mean - half, mean + half, "seeds"
        elif len(g) == 1 and per_request is not None and "run_dir" in g:
            pr = _per_request_values(per_request, str(g["run_dir"].iloc[0]), metric)
            if pr is not None and _same(float((pr[0] * pr[1]).sum() / pr[1].sum()), mean):
                # Only where the requests' token-weighted mean IS the summary's statistic
                # (batch 1: the steps split between requests). With batch > 1 a step's time
                # counts for every request in it: the per-request mean is the latency a
                # request sees per token, not time / output tokens, so no interval is drawn.
                v, w = pr
                lo, hi = bootstrap_ci(v, w, seed)
                ci, n = "requests", len(v)
        out.append({**rec, "mean": mean, "lo": lo, "hi": hi, "n": n, "ci": ci})
    table = pd.DataFrame(out, columns=[*roles, "mean", "lo", "hi", "n", "ci"])
    return Cells(table, metric)


# --- drawing --------------------------------------------------------------------------------

def _is_categorical(df: pd.DataFrame, col: str) -> bool:
    s = df[col]
    return not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)


def _log_base(values: Sequence[float]) -> int | None:
    """10 or 2 when positive values span at least a decade (powers of two: base 2), else None."""
    vals = [float(v) for v in values if np.isfinite(v)]
    if len(vals) < 3 or min(vals) <= 0 or max(vals) / min(vals) < 10:
        return None
    if all(v == int(v) and int(v) & (int(v) - 1) == 0 for v in vals):
        return 2
    return 10


def _match(df: pd.DataFrame, col: str | None, value: object) -> pd.Series:
    if col is None:
        return pd.Series(True, index=df.index)
    if isinstance(value, float) and math.isnan(value):
        return df[col].isna()
    return df[col] == value


@dataclass(frozen=True)
class Series:
    """One drawn series: its hue and style values and how it looks."""

    hue: object
    style: object
    color: str
    marker: str
    dash: object
    label: str


def _series(df: pd.DataFrame, spec: Spec) -> list[Series]:
    hues = ps.level_order(spec.hue, df[spec.hue].tolist()) if spec.hue else [None]
    styles = ps.level_order(spec.style, df[spec.style].tolist()) if spec.style else [None]
    out = []
    for i, h in enumerate(hues):
        for j, s in enumerate(styles):
            k = j if spec.style else i  # marker and dash follow style when there is one
            parts = [ps.level_name(f, v) for f, v in ((spec.hue, h), (spec.style, s)) if f]
            out.append(Series(h, s, ps.PALETTE[i % len(ps.PALETTE)], ps.MARKERS[k % len(
                ps.MARKERS)], ps.DASHES[k % len(ps.DASHES)], " · ".join(parts)))
    return out


def make_figure(df: pd.DataFrame, spec: Spec, per_request: pd.DataFrame | None = None,
                seed: int = 0) -> plt.Figure:
    """Draw ``spec`` from the run table ``df`` (one row per run) and return the figure."""
    if spec.relative is not None:  # the reference itself is the zero line
        data = {m: relative_frame(df, spec, m) for m in spec.metrics}
        df = df[~_level_mask(df[spec.relative[0]], [spec.relative[1]])]
        kinds = dict.fromkeys(spec.metrics, "fraction")
        ref = ps.level_name(spec.relative[0], df_ref_value(spec))
        labels = {m: f"{ps.quantity(m).label}\nchange vs {ref} (%)" for m in spec.metrics}
    else:
        data = dict.fromkeys(spec.metrics, df)
        kinds = {m: ps.quantity(m).kind for m in spec.metrics}
        labels = {}
    cells = {m: aggregate(data[m], spec, m, per_request if spec.relative is None else None, seed)
             for m in spec.metrics}
    rows_lv = ps.level_order(spec.row, df[spec.row].tolist()) if spec.row else [None]
    cols_lv = ps.level_order(spec.col, df[spec.col].tolist()) if spec.col else [None]
    panels = []  # (metric, row value, col value, table)
    # A grid never mixes metrics along a line: with --col, one row per metric (and --row
    # value) and one column per col value; with --row alone, one row per row value and one
    # column per metric.
    metric_cols = bool(spec.row) and not spec.col
    if metric_cols:
        for rv in rows_lv:
            panels += [(m, rv, None, cells[m].table[_match(cells[m].table, spec.row, rv)])
                       for m in spec.metrics]
        ncols, nrows = len(spec.metrics), len(rows_lv)
    elif spec.col:
        for m in spec.metrics:
            t = cells[m].table
            panels += [(m, rv, cv, t[_match(t, spec.row, rv) & _match(t, spec.col, cv)])
                       for rv in rows_lv for cv in cols_lv]
        ncols, nrows = len(cols_lv), len(spec.metrics) * len(rows_lv)
    else:  # one panel per metric, side by side (wrapped): every panel shows the same runs
        panels = [(m, None, None, cells[m].table) for m in spec.metrics
                  if len(cells[m].table)]  # e.g. stall in zero-latency runs
        ncols = min(WRAP, max(len(panels), 1))
        nrows = max(1, math.ceil(len(panels) / ncols))
    where = list(range(len(panels)))
    if not any(len(p[3]) for p in panels):
        raise PlotError(f"nothing to draw: no finite values of {', '.join(spec.metrics)}")
    categorical = _is_categorical(df, spec.x)
    x_levels = ps.level_order(spec.x, df[spec.x].tolist())
    x_kind = ps.quantity(spec.x).kind
    x_scale, x_unit = ps.unit_scale(x_kind, x_levels if not categorical else [])
    log_base = None if categorical else _log_base(x_levels)
    series = _series(df, spec)
    y_units, y_log = {}, {}
    for m in spec.metrics:
        t = cells[m].table
        vals = pd.concat([t["mean"], t["lo"], t["hi"]])
        vals = vals[np.isfinite(vals)]
        y_log[m] = spec.yscale == "log" or (
            spec.yscale == "auto" and kinds[m] != "fraction" and len(vals) > 0
            and vals.min() > 0 and vals.max() / vals.min() > 30)
        y_units[m] = ps.unit_scale(kinds[m], [ps.log_middle(vals)] if y_log[m] else vals)
    width, height = _panel_size(spec.x, x_levels, categorical, len(series))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                                 figsize=(width * ncols + 1.9, height * nrows))
        flat = list(axes.flat)
        for ax in flat[len(panels):]:
            ax.set_visible(False)
        grid = bool(spec.row or spec.col)
        for pos, (metric, rv, cv, sub) in zip(where, panels, strict=True):
            ax = flat[pos]
            if sub.empty:  # a grid cell without values says why, instead of a blank hole
                _empty_panel(ax, spec, metric, rv, cv)
                continue
            yf, y_unit = y_units[metric]
            for k, s in enumerate(series):
                g = sub[_match(sub, spec.hue, s.hue) & _match(sub, spec.style, s.style)]
                if g.empty:
                    continue
                if categorical:
                    _draw_dodged(ax, g, spec.x, x_levels, s, k, len(series), yf)
                else:
                    _draw_line(ax, g.sort_values(spec.x), spec.x, x_scale, s, yf)
            _format_x(ax, spec.x, x_levels, categorical, x_scale, x_unit, log_base)
            row, col = divmod(pos, ncols)
            if not grid or col == 0 or metric_cols:  # a grid row's metric, once per row
                log = y_log[metric]
                ax.set_ylabel(labels[metric].replace("(%)", "(%, log scale)" if log else "(%)")
                              if metric in labels
                              else _wrap_label(ps.axis_label(metric, y_unit, log)))
            if spec.relative is not None:
                ax.axhline(0, color="0.3", lw=0.8, zorder=1)
            if grid:
                _facet_titles(ax, spec, rv, cv, row, col, ncols)
        if grid:  # one x label per column, under its lowest drawn panel
            for col in range(ncols):
                drawn = [ax for ax in flat[col::ncols] if ax.axison and ax.get_visible()]
                for ax in drawn[:-1]:
                    ax.set_xlabel("")
        _format_y(flat, panels, where, spec, y_units, y_log,
                  {m: "relative" if spec.relative else k for m, k in kinds.items()})
        _legend(fig, spec, series, categorical, [cells[m].ci_label() for m in spec.metrics])
        untangle_ticks(fig, categorical_x=categorical)
    return fig


def _wrap_label(text: str, width: int = 34) -> str:
    """A long axis label on two lines: the name, then its parenthesis (unit, log scale) whole."""
    if len(text) <= width:
        return text
    name, sep, unit = text.rpartition(" (")
    if not sep:
        return textwrap.fill(text, width)
    return f"{textwrap.fill(name, width)}\n({unit}"


def _facet_titles(ax: plt.Axes, spec: Spec, rv: object, cv: object, row: int, col: int,
                  ncols: int) -> None:
    """Column values above the top row, row values in the right margin (as FacetGrid does):
    each is printed once per grid line, not on every panel."""
    if spec.col and row == 0:
        ax.set_title(f"{ps.quantity(spec.col).label}: {ps.level_name(spec.col, cv)}")
    if spec.row and col == ncols - 1:
        ax.annotate(f"{ps.quantity(spec.row).label}: {ps.level_name(spec.row, rv)}",
                    xy=(1.04, 0.5), xycoords="axes fraction", rotation=270, ha="left",
                    va="center")


def _empty_panel(ax: plt.Axes, spec: Spec, metric: str, rv: object, cv: object) -> None:
    zero = any(f == "mode" and v == "zero_latency" for f, v in ((spec.row, rv), (spec.col, cv)))
    why = ("not defined in zero-latency runs" if zero and ps.quantity(metric).timed_only
           else "no finite values")
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{ps.quantity(metric).label}:\n{why}", ha="center", va="center",
            transform=ax.transAxes, color="0.45")


def untangle_ticks(fig: plt.Figure, categorical_x: bool = False, pad: float = 3.0) -> None:
    """No two tick labels overlap, measured on the laid-out figure (constrained layout).

    Category names on x are turned by 45, then 90 degrees when they do not fit side by side,
    and only every k-th is printed when even upright names collide; numeric ticks that
    collide are thinned (the first kept, each later one only where it has room)."""
    for _ in range(3):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        changed = False
        for ax in fig.axes:
            if not ax.get_visible() or not ax.axison:
                continue
            if categorical_x:
                changed |= _turn_categories(ax, renderer, pad)
            else:
                changed |= _thin_ticks(ax, ax.xaxis, renderer, pad)
            changed |= _thin_ticks(ax, ax.yaxis, renderer, pad)
        if not changed:
            return


def _shown_ticks(ax: plt.Axes, axis: Any) -> list[tuple[float, float, Any]]:
    """(display position, data position, label) of the labelled major ticks in view."""
    locs = list(axis.get_majorticklocs())
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) * 1e-9
    is_x = axis is ax.xaxis
    out = []
    for loc, tick in zip(locs, axis.get_major_ticks(len(locs)), strict=True):
        label = tick.label1
        if not (lo - span <= loc <= hi + span) or not label.get_visible() or not label.get_text():
            continue
        point = ax.transData.transform((loc, 0.0) if is_x else (0.0, loc))
        out.append((float(point[0] if is_x else point[1]), float(loc), label))
    return sorted(out, key=lambda t: t[0])


def _thin_ticks(ax: plt.Axes, axis: Any, renderer: Any, pad: float) -> bool:
    ticks = _shown_ticks(ax, axis)
    if len(ticks) < 2:
        return False
    is_x = axis is ax.xaxis
    kept = [ticks[0]]
    for t in ticks[1:]:
        a, b = kept[-1][2].get_window_extent(renderer), t[2].get_window_extent(renderer)
        gap = b.x0 - a.x1 if is_x else b.y0 - a.y1
        if gap >= pad:
            kept.append(t)
    if len(kept) == len(ticks):
        return False
    axis.set_ticks([t[1] for t in kept], labels=[t[2].get_text() for t in kept])
    axis.set_minor_formatter(NullFormatter())
    return True


def _turn_categories(ax: plt.Axes, renderer: Any, pad: float) -> bool:
    ticks = _shown_ticks(ax, ax.xaxis)
    if len(ticks) < 2:
        return False
    angle = ticks[0][2].get_rotation()
    step = min(b[0] - a[0] for a, b in itertools.pairwise(ticks))
    height = max(t[2].get_fontsize() for t in ticks) * fig_dpi(ax) / 72 * 1.2
    if angle == 0:
        boxes = [t[2].get_window_extent(renderer) for t in ticks]
        if all(b.x0 - a.x1 >= pad for a, b in itertools.pairwise(boxes)):
            return False
    elif step * math.sin(math.radians(angle)) >= height + pad:
        return False  # turned labels are parallel: they clear when their spacing does
    names = [t[2].get_text() for t in ticks]
    locs = [t[1] for t in ticks]
    if angle < 45 and step * math.sin(math.radians(45)) >= height + pad:
        ax.set_xticks(locs, names, rotation=45, ha="right", rotation_mode="anchor")
    elif angle < 90 and step >= height + pad:
        ax.set_xticks(locs, names, rotation=90, ha="center", rotation_mode="default")
    else:  # too many even upright: every k-th name
        k = math.ceil((height + pad) / max(step, 1e-9))
        ax.set_xticks(locs[::k], names[::k], rotation=90, ha="center",
                      rotation_mode="default")
    return True


def fig_dpi(ax: plt.Axes) -> float:
    fig = ax.get_figure()
    return float(fig.dpi) if fig is not None else 100.0


def df_ref_value(spec: Spec) -> object:
    """The reference value of ``--relative-to`` as a number when it reads as one."""
    assert spec.relative is not None
    value = spec.relative[1]
    return float(value) if _is_number(value) else value


def _draw_line(ax: plt.Axes, g: pd.DataFrame, x: str, x_scale: float, s: Series,
               yf: float) -> None:
    xs = g[x].to_numpy(float) * x_scale
    ax.plot(xs, g["mean"] * yf, color=s.color, marker=s.marker, ls=s.dash, lw=1.3, ms=5,
            mfc="none", mew=1.2, label=s.label)
    band = g["lo"].notna().to_numpy()
    if band.any():
        ax.fill_between(xs[band], g["lo"][band] * yf, g["hi"][band] * yf, color=s.color,
                        alpha=0.18, lw=0)


def _draw_dodged(ax: plt.Axes, g: pd.DataFrame, x: str, levels: list[object], s: Series,
                 k: int, n: int, yf: float) -> None:
    """Points beside each other within a category, never joined: the categories are not a
    scale, a line between them would suggest one."""
    width = min(0.8 / n, 0.22)
    pos = np.array([levels.index(v) for v in g[x]], float) + (k - (n - 1) / 2) * width
    y = g["mean"].to_numpy(float) * yf
    ax.plot(pos, y, marker=s.marker, ls="none", color=s.color, ms=5.5, mfc="none", mew=1.2,
            label=s.label)
    if g["lo"].notna().any():
        lo = np.nan_to_num(y - g["lo"].to_numpy(float) * yf)
        hi = np.nan_to_num(g["hi"].to_numpy(float) * yf - y)
        ax.errorbar(pos, y, yerr=np.vstack([lo, hi]), fmt="none", color=s.color, capsize=2,
                    elinewidth=1)


def _turn_labels(names: Sequence[str]) -> bool:
    """Category names too long to sit side by side are turned by 30 degrees."""
    return max((len(n) for n in names), default=0) * len(names) > 40


def _panel_size(x: str, levels: list[object], categorical: bool, n_series: int
                ) -> tuple[float, float]:
    """Inches per panel: wider for many dodged points, taller for turned category names."""
    width, height = PANEL_SIZE
    if categorical:
        names = [ps.level_name(x, v) for v in levels]
        width = max(width, 0.12 * len(levels) * max(n_series, 3))
        if _turn_labels(names):
            height += 0.04 * max(len(n) for n in names)  # half a character width per char
    return min(width, 8.0), height


def _format_x(ax: plt.Axes, x: str, levels: list[object], categorical: bool, x_scale: float,
              x_unit: str, log_base: int | None) -> None:
    if categorical:
        names = [ps.level_name(x, v) for v in levels]
        ax.set_xticks(range(len(levels)), names)  # turned later if they collide
        ax.set_xlim(-0.6, len(levels) - 0.4)
        ax.grid(False, axis="x")
        for b in range(len(levels) - 1):
            ax.axvline(b + 0.5, color="0.88", lw=0.6, zorder=0)
        ax.set_xlabel(ps.quantity(x).label)
        return
    if log_base:
        ax.set_xscale("log", base=log_base)
    if len(levels) <= 12:
        ticks = [float(v) * x_scale for v in levels]  # type: ignore[arg-type]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.set_xlabel(ps.axis_label(x, x_unit, log=log_base is not None))


def _format_y(flat: list[plt.Axes], panels: list[tuple[Any, ...]], where: list[int], spec: Spec,
              y_units: dict[str, tuple[float, str]], y_log: dict[str, bool],
              kinds: dict[str, str]) -> None:
    """One y range per metric across its panels (they compare), log when it spans decades."""
    for m in spec.metrics:
        axes = [flat[p] for p, pan in zip(where, panels, strict=True) if pan[0] == m
                and len(pan[3])]
        if not axes:
            continue
        vals = pd.concat([pan[3][c] for pan in panels if pan[0] == m for c in ("mean", "lo", "hi")])
        vals = vals[np.isfinite(vals)] * y_units[m][0]
        if not len(vals):
            continue
        kind = kinds[m]
        for ax in axes:
            if y_log[m]:
                ax.set_yscale("log")
                ax.set_ylim(float(vals.min()) / 1.3, float(vals.max()) * 1.3)
                ps.readable_log_ticks(ax.yaxis)
            elif kind == "fraction" and vals.max() <= 100 and vals.min() >= 0:
                ax.set_ylim(0, 102)
            elif vals.min() >= 0:
                ax.set_ylim(0, float(vals.max()) * 1.08 or 1.0)


def _legend(fig: plt.Figure, spec: Spec, series: list[Series], categorical: bool,
            ci_labels: list[str | None]) -> None:
    """One legend for the whole figure, outside the panels: series, then what the band is."""
    handles: list[Any] = []
    ls_of = (lambda s: "none") if categorical else (lambda s: s.dash)
    if spec.hue and spec.style:
        for title, f in ((spec.hue, "hue"), (spec.style, "style")):
            handles.append(Line2D([], [], ls="none", label=ps.quantity(title).label))
            seen: set[str] = set()
            for s in series:
                v = getattr(s, f)
                name = ps.level_name(title, v)
                if name in seen:
                    continue
                seen.add(name)
                if f == "hue":
                    handles.append(Line2D([], [], color=s.color, ls="-", label=name))
                else:
                    handles.append(Line2D([], [], color="0.3", marker=s.marker, ls=ls_of(s),
                                          mfc="none", label=name))
    elif spec.hue or spec.style:
        handles = [Line2D([], [], color=s.color, marker=s.marker, ls=ls_of(s), mfc="none",
                          mew=1.2, label=s.label) for s in series]
    labels = sorted({c for c in ci_labels if c})
    for text in labels:
        handles.append(Line2D([], [], color="0.4", marker="|", ms=9, ls="none", label=text)
                       if categorical else Patch(color="0.6", alpha=0.35, label=text))
    if handles:
        title = None if (spec.hue and spec.style) else ps.quantity(spec.hue or spec.style
                                                                   or "").label
        fig.legend(handles=handles, loc="outside right upper", title=title or None,
                   alignment="left")


def plot_spec(df: pd.DataFrame, spec: Spec, out: Path, stem: str | None = None,
              formats: Sequence[str] = ("png", "pdf"), per_request: pd.DataFrame | None = None,
              seed: int = 0) -> list[Path]:
    """Draw ``spec`` and write it as ``out/stem.<format>``."""
    fig = make_figure(df, spec, per_request, seed)
    return save_figure(fig, out, stem or default_stem(spec), formats=formats)


def plot_auto(df: pd.DataFrame, out: Path, per_request: pd.DataFrame | None = None
              ) -> list[Path]:
    """The default figure of what the sweep varied (raises :class:`PlotError` if it cannot)."""
    spec = choose_spec(df)
    return plot_spec(df, spec, out, per_request=per_request)


def plot_timeline(path: Path, out: Path, max_ms: float | None = None,
                  formats: Sequence[str] = ("png", "pdf"), stem: str = "timeline") -> list[Path]:
    """Gantt chart of a run's ``timeline.json``: host-link copies, GPU compute and (with a
    CPU placement) the host CPU's expert executions, one row each."""
    import json

    events = json.loads(path.read_text())["traceEvents"]
    if not events:
        raise FileNotFoundError(f"{path} has no events (run with output.timeline_steps=N)")
    # A placement's CPU-executed experts get a row of their own; its copies that serve no
    # cache slot (activations, low-precision experts) a colour each.
    rows = {"host link": 0, "compute": 1}
    if any(ev["tid"] == "host cpu" for ev in events):
        rows["host cpu"] = 2
    colors = {"attention": "#999999", "shared": ps.PALETTE[5], "routed": ps.PALETTE[0],
              "demand": ps.PALETTE[3], "prefetch": ps.PALETTE[2], "cpu": ps.PALETTE[1],
              "activation": ps.PALETTE[4], "low_precision": ps.PALETTE[6]}
    names = {"attention": "attention + router", "shared": "shared experts",
             "routed": "routed expert", "demand": "demand copy", "prefetch": "prefetch copy",
             "cpu": "expert on host CPU", "activation": "activation copy",
             "low_precision": "low-precision copy"}
    optional = {"cpu", "activation", "low_precision"}  # in the legend only when drawn
    seen: set[str] = set()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 2.4 + 0.4 * (len(rows) - 2)), layout="constrained")
        for ev in events:
            start, dur = ev["ts"] / 1e3, ev["dur"] / 1e3
            if max_ms is not None and start > max_ms:
                continue
            kind = "cpu" if ev["tid"] == "host cpu" else ev["name"].split()[0]
            if kind.startswith("L"):
                kind = "shared" if ev["name"].endswith("shared") else "routed"
            kind = kind if kind in colors else "routed"
            seen.add(kind)
            color = colors[kind]
            link = ev["tid"] == "host link"  # white edges split back-to-back copies; a
            ax.broken_barh([(start, dur)], (rows[ev["tid"]] - 0.35, 0.7), facecolors=color,
                           edgecolor="white" if link else color,  # sliver of compute stays dark
                           linewidth=0.3)
        ax.set_yticks(list(rows.values()), list(rows.keys()))
        ax.set_xlabel("simulated time (ms)")
        handles = [Patch(color=colors[k], label=v) for k, v in names.items()
                   if k not in optional or k in seen]
        ax.legend(handles=handles, ncol=min(len(handles), 5), loc="lower center",
                  bbox_to_anchor=(0.5, 1.0))
        ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, out, stem, formats=formats)


# --- command line ---------------------------------------------------------------------------

EXAMPLES = """examples:
  moesim-plot multirun/capacity                  # axes and panels from what the sweep varied
  moesim-plot multirun/stall_vs_link --metric hit_rate_incl_late,stall_per_output_token_s \\
      --out figs/stall_vs_link.pdf               # hardware on x: dodged points, one per policy
  moesim-plot multirun/prediction_point --where mode=timed --x label --hue compute_scale \\
      --metric stall_per_output_token_s --relative-to label=none   # stall saved per predictor

Every column that varies must be plotted (x, hue, style, col, row) or pinned with --where;
several seeds give a mean with a 95% CI over seeds, per_request.parquet a bootstrap CI over
requests for time per output token. Metric names: the Metrics table (docs/metrics)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moesim-plot", description=(__doc__ or "").split("\n\n")[0].replace("``", ""),
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="a run or sweep directory (searched recursively)")
    p.add_argument("--x", help="column on the x axis (default: the first swept numeric factor)")
    p.add_argument("--hue", help="column giving one colour per value (default: policy or "
                   "predictor)")
    p.add_argument("--style", help="column giving one marker and dash pattern per value")
    p.add_argument("--col", help="column giving one column of panels per value (each metric "
                   "is a row of the grid)")
    p.add_argument("--row", help="column giving one row of panels per value (under each "
                   "metric with --col; else one column per metric)")
    p.add_argument("--metric", action="append", help="metric(s) to draw, one panel each; "
                   "repeat or comma-separate (default: hit rate, stall and time per token)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                   help="keep only runs with these values (repeatable)")
    p.add_argument("--relative-to", metavar="KEY=VALUE", help="draw each metric as its change "
                   "against the run with KEY=VALUE and the same other plotted values (e.g. "
                   "label=none: stall saved by each predictor)")
    p.add_argument("--yscale", default="auto", help="auto (log when a metric spans more than "
                   "30x), linear or log")
    p.add_argument("--out", type=Path, default=None, help="figure folder (default: DIR), or a "
                   "file name whose stem names the figure (e.g. figs/stall_vs_link.pdf); the "
                   "table of all runs is written to DIR/aggregate.parquet")
    p.add_argument("--format", default=None, help="comma list of png, pdf, svg (default: png,pdf"
                   ", or the suffix of --out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap over requests")
    p.add_argument("--timeline-ms", type=float, default=None,
                   help="with a run that wrote timeline.json: plot its first N ms")
    return p


def _outputs(out: Path | None, default_dir: Path, fmt: str | None
             ) -> tuple[Path, str | None, list[str]]:
    """Folder, stem (None: the default) and formats from ``--out`` and ``--format``."""
    stem = None
    folder = out or default_dir
    formats = _split([fmt]) if fmt else []
    if out is not None and out.suffix.lstrip(".") in FORMATS:
        folder, stem = out.parent, out.stem
        formats = formats or [out.suffix.lstrip(".")]
    formats = formats or ["png", "pdf"]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PlotError(f"--format {','.join(bad)}: choose from {', '.join(FORMATS)}")
    return folder, stem, formats


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except PlotError as exc:
        print(f"moesim-plot: error: {exc}", file=sys.stderr)
        return 2


def _writable(folder: Path) -> None:
    """The figure folder exists (made now) and takes files, before anything is drawn or
    written: an unusable ``--out`` is one line, with nothing half-written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlotError(f"--out {folder}: cannot create the folder ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise PlotError(f"--out {folder}: the folder is not writable")


def _main(args: argparse.Namespace) -> int:
    folder, stem, formats = _outputs(args.out, args.dir, args.format)
    if args.timeline_ms is not None and not (math.isfinite(args.timeline_ms)
                                             and args.timeline_ms > 0):
        raise PlotError(f"--timeline-ms {args.timeline_ms:g}: must be a number of ms > 0")
    if not args.dir.exists():
        raise PlotError(f"{args.dir}: no such run or sweep directory")
    if (args.dir / "timeline.json").is_file():
        _writable(folder)
        try:
            paths = plot_timeline(args.dir / "timeline.json", folder, args.timeline_ms, formats,
                                  stem or "timeline")
        except FileNotFoundError as exc:
            raise PlotError(str(exc)) from None
        print("timeline: " + ", ".join(map(str, paths)))
        return 0  # one run's timeline; its one-point summary is not a figure
    from moesim.experiments import plot_validation as pv

    try:  # an experiment=validate folder: predicted vs measured, not the sweep plots
        vpath = pv.find_table(args.dir)
    except FileNotFoundError:
        vpath = None
    if vpath is not None:
        _writable(folder)
        vpaths = pv.plot_validation(pv.tidy(pd.read_parquet(vpath)), folder, formats=formats)
        print("validation: " + ", ".join(map(str, vpaths)))
        return 0
    try:
        df = collect(args.dir)
    except FileNotFoundError as exc:
        raise PlotError(str(exc)) from None
    per_request = collect_per_request(args.dir)
    rows = apply_where(df, args.where)
    spec = choose_spec(rows, x=args.x, hue=args.hue, style=args.style, col=args.col,
                       row=args.row, metrics=_split(args.metric), yscale=args.yscale,
                       relative=args.relative_to)
    fig = make_figure(rows, spec, per_request, args.seed)  # all checks passed: now write
    _writable(folder)
    df.to_parquet(args.dir / "aggregate.parquet", index=False)  # the sweep's table, beside it
    paths = save_figure(fig, folder, stem or default_stem(spec), formats=formats)
    cols = list(dict.fromkeys([*spec.roles(), *(["seed"] if varies(rows, "seed") else []),
                               *spec.metrics]))
    table = rows[cols].sort_values(spec.roles()).to_string(index=False, float_format=_fmt)
    print(table)
    roles = ", ".join(f"{k}={v}" for k, v in (("x", spec.x), ("hue", spec.hue),
                                                ("style", spec.style), ("col", spec.col),
                                                ("row", spec.row)) if v)
    print(f"{len(rows)} runs ({roles}) -> {args.dir / 'aggregate.parquet'}, "
          + ", ".join(map(str, paths)))
    return 0


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"


if __name__ == "__main__":
    raise SystemExit(main())
