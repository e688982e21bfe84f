"""Predicted (simulator) against measured (offloading executor) time and stall per token.

    python -m moesim.experiments.plot_validation OUTDIR [--out DIR] [--log]

reads ``OUTDIR/validation.parquet`` (found recursively if not at the top) and writes
``validation_scatter.png`` (and ``.pdf``): one panel per metric, x = measured median, y =
predicted, the y = x line, a +-10 % band, one marker shape per policy, one colour per trace,
horizontal error bars for the real runs' spread. Units, palette, markers and policy names are
moesim-plot's (:mod:`moesim.experiments.plot_style`): the time unit is chosen from the data of
each panel (µs, ms or s), policies are ordered baselines first, oracles last. It prints the
per-config errors and their median and max, because an error is only meaningful next to the real
runs' own spread.

Two layouts of ``validation.parquet`` are accepted (column names are matched from the lists in
``ALIASES`` so the plot does not break when the writer picks a sibling spelling):

* wide, one row per config: ``policy``, ``capacity``, ``trace`` and per metric ``sim_<m>``,
  ``real_<m>`` (the median of the repeats) and optionally ``real_<m>_min``/``_max`` (or
  ``_p10``/``_p90``, ``_lo``/``_hi``) or a symmetric ``real_<m>_std``;
* experiments/validate.py's own columns: ``policy.label``, ``cache.fraction``, ``trace.name``,
  ``tpot_sim_s``, ``tpot_real_s``, ``tpot_real_min_s``, ``tpot_real_max_s`` and the same with
  ``stall_``;
* long, one row per run: a ``source`` column (``sim`` | ``real``), the config columns and the
  metric ``<m>`` itself; the median and min/max of the real repeats are taken here.

``<m>`` is ``time_per_output_token_s`` and ``stall_per_output_token_s`` (the simulator's
summary names; ``time_per_token_s``/``stall_per_token_s`` also work).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from moesim.experiments import plot_style as ps

METRICS: dict[str, tuple[str, ...]] = {
    "time per token": ("time_per_output_token_s", "time_per_token_s"),
    "stall per token": ("stall_per_output_token_s", "stall_per_token_s"),
}
# experiments/validate.py's short spelling: <short>_sim_s, <short>_real_s, <short>_real_min_s
SHORT: dict[str, str] = {"time per token": "tpot", "stall per token": "stall"}
ALIASES: dict[str, tuple[str, ...]] = {
    "policy": ("policy.label", "policy", "policy.name"),
    "capacity": ("capacity", "cache.slots", "cache.experts", "cache.capacity_fraction",
                 "cache.fraction"),
    "trace": ("trace", "trace.name"),
}
PRED_PREFIX = ("sim_", "predicted_", "pred_")
REAL_PREFIX = ("real_", "measured_")
LO_SUFFIX = ("_min", "_p10", "_lo", "_q25")
HI_SUFFIX = ("_max", "_p90", "_hi", "_q75")
BAND = 0.10


def _first(df: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in df.columns), None)


def find_table(folder: Path) -> Path:
    """``validation.parquet`` in ``folder`` or the shallowest one below it."""
    direct = folder / "validation.parquet"
    if direct.is_file():
        return direct
    found = sorted(folder.rglob("validation.parquet"), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"no validation.parquet in or below {folder}")
    return found[0]


def _keys(df: pd.DataFrame) -> dict[str, str]:
    keys = {k: c for k, names in ALIASES.items() if (c := _first(df, names)) is not None}
    if "policy" not in keys:
        raise ValueError(f"validation table needs a policy column (one of {ALIASES['policy']})")
    return keys


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config: policy, capacity, trace, and per metric pred, real, real_lo, real_hi.

    Metric columns are named ``<label>|pred`` etc. with ``<label>`` a key of ``METRICS``.
    """
    keys = _keys(df)
    out = pd.DataFrame({k: df[c] for k, c in keys.items()})
    if "source" in df.columns:  # long layout: aggregate the repeats here
        return _tidy_long(df, keys)
    found = False
    for label, names in METRICS.items():
        short = SHORT[label]
        pred = _first(df, [p + n for n in names for p in PRED_PREFIX] + [f"{short}_sim_s"])
        real = _first(df, [p + n + s for n in names for p in REAL_PREFIX
                           for s in ("", "_median")] + [f"{short}_real_s"])
        if pred is None or real is None:
            continue
        found = True
        out[f"{label}|pred"] = df[pred].astype(float)
        out[f"{label}|real"] = df[real].astype(float)
        base = real.removesuffix("_median")
        lo = _first(df, [base + s for s in LO_SUFFIX] + [f"{short}_real_min_s"])
        hi = _first(df, [base + s for s in HI_SUFFIX] + [f"{short}_real_max_s"])
        std = _first(df, [base + "_std", base + "_spread"])
        if lo is not None and hi is not None:
            out[f"{label}|lo"] = df[lo].astype(float)
            out[f"{label}|hi"] = df[hi].astype(float)
        elif std is not None:
            out[f"{label}|lo"] = out[f"{label}|real"] - df[std].astype(float)
            out[f"{label}|hi"] = out[f"{label}|real"] + df[std].astype(float)
    if not found:
        raise ValueError("validation table has no sim_/real_ columns for "
                         f"{[n for names in METRICS.values() for n in names]}")
    return out


def _tidy_long(df: pd.DataFrame, keys: dict[str, str]) -> pd.DataFrame:
    cols = list(keys.values())
    src = df["source"].astype(str)
    rows: list[pd.DataFrame] = []
    for label, names in METRICS.items():
        m = _first(df, names)
        if m is None:
            continue
        g = df.assign(_v=df[m].astype(float))
        sim = g[src == "sim"].groupby(cols, dropna=False)["_v"].median().rename(f"{label}|pred")
        real = g[src == "real"].groupby(cols, dropna=False)["_v"]
        rows.append(pd.concat([sim, real.median().rename(f"{label}|real"),
                               real.min().rename(f"{label}|lo"),
                               real.max().rename(f"{label}|hi")], axis=1))
    if not rows:
        raise ValueError(f"long validation table has none of the metrics {list(METRICS)}")
    out = pd.concat(rows, axis=1).reset_index()
    return out.rename(columns={c: k for k, c in keys.items()})


def errors(table: pd.DataFrame) -> pd.DataFrame:
    """Signed relative error (pred - real) / real per config and metric; NaN where real is 0."""
    out = table[[c for c in ("policy", "capacity", "trace") if c in table]].copy()
    for label in METRICS:
        if f"{label}|pred" not in table:
            continue
        real = table[f"{label}|real"].replace(0.0, np.nan)
        out[f"{label} error"] = (table[f"{label}|pred"] - real) / real
        if f"{label}|lo" in table:
            out[f"{label} real spread"] = (table[f"{label}|hi"] - table[f"{label}|lo"]) / real
    return out


def plot_validation(table: pd.DataFrame, out: Path, *, log: bool = False,
                    formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Draw the scatter (one panel per metric present) and write it into ``out``."""
    labels = [lab for lab in METRICS if f"{lab}|pred" in table]
    if not labels:
        raise ValueError("nothing to plot: no metric with predicted and measured values")
    policies = ps.policy_label_order(table["policy"].astype(str))
    traces = sorted(table["trace"].astype(str).unique()) if "trace" in table else [""]
    colours = ps.PALETTE
    markers = ps.MARKERS
    err = errors(table)
    with plt.rc_context(ps.STYLE):
        fig, axes = plt.subplots(1, len(labels), figsize=(4.4 * len(labels) + 2.6, 4.2),
                                 squeeze=False, layout="constrained")
        for ax, label in zip(axes[0], labels, strict=True):
            real, pred = table[f"{label}|real"], table[f"{label}|pred"]
            finite = np.isfinite(real) & np.isfinite(pred)
            if log:
                finite &= (real > 0) & (pred > 0)
            if not finite.any():
                ax.set_title(f"{label}: no finite values")
                continue
            vals = pd.concat([real[finite], pred[finite]])
            if f"{label}|hi" in table:
                vals = pd.concat([vals, table.loc[finite, f"{label}|hi"]])
            vals = vals[np.isfinite(vals)]
            f, unit = ps.unit_scale("time", [ps.log_middle(vals)] if log else vals)
            lo_v, hi_v = float(vals.min()) * f, float(vals.max()) * f
            lo_v = lo_v / 1.5 if log else min(0.0, lo_v)
            hi_v = hi_v * 1.5 if log else hi_v * 1.1 + 1e-12
            line = (np.geomspace(max(lo_v, 1e-12), hi_v, 50) if log
                    else np.linspace(lo_v, hi_v, 50))
            ax.fill_between(line, line * (1 - BAND), line * (1 + BAND), color="0.88", lw=0)
            ax.plot(line, line, color="0.3", lw=1)
            for _, row in table[finite].iterrows():
                pol, tr = str(row["policy"]), str(row.get("trace", ""))
                x, y = row[f"{label}|real"] * f, row[f"{label}|pred"] * f
                xerr = None
                if f"{label}|lo" in table and np.isfinite(row[f"{label}|lo"]):
                    xerr = [[max(0.0, x - row[f"{label}|lo"] * f)],
                            [max(0.0, row[f"{label}|hi"] * f - x)]]
                ax.errorbar(x, y, xerr=xerr, fmt=markers[policies.index(pol) % len(markers)],
                            ls="none", color=colours[traces.index(tr) % len(colours)]
                            if tr in traces else colours[0], ms=6, mfc="none", mew=1.2,
                            capsize=2, elinewidth=0.8)
            e = err[f"{label} error"].abs()
            e = e[np.isfinite(e)]
            stats = (f"median |err| {e.median():.0%}, max {e.max():.0%} (n={len(e)})"
                     if len(e) else "no errors (real = 0)")
            ax.set_title(f"{label}\n{stats}")
            scale = ", log scale" if log else ""  # said in the label: 1-2-5 ticks look linear
            ax.set_xlabel(f"measured (real executor, median) ({unit}{scale})")
            ax.set_ylabel(f"predicted (simulator) ({unit}{scale})")
            ax.set_xlim(lo_v, hi_v)
            ax.set_ylim(lo_v, hi_v)
            if log:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ps.readable_log_ticks(ax.xaxis)
                ps.readable_log_ticks(ax.yaxis)
            ax.set_aspect("equal", adjustable="box")
        handles: list[Any] = [plt.Line2D([], [], color="0.3", lw=1, label="y = x"),
                              Patch(color="0.88", label=f"±{BAND:.0%}"),
                              plt.Line2D([], [], color="0.3", marker="|", ms=9, ls="none",
                                         label="real runs: min-max")]
        handles += [plt.Line2D([], [], ls="none", marker=markers[i % len(markers)], mfc="none",
                               mew=1.2, color="0.2", label=ps.policy_label(p))
                    for i, p in enumerate(policies)]
        if len(traces) > 1 or traces != [""]:
            handles += [plt.Line2D([], [], ls="none", marker="s", color=colours[i % len(colours)],
                                   label=t) for i, t in enumerate(traces)]
        fig.legend(handles=handles, loc="outside right center")
        from moesim.experiments.plot import save_figure, untangle_ticks

        untangle_ticks(fig)
    return save_figure(fig, out, "validation_scatter", dpi=130, formats=formats)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moesim.experiments.plot_validation OUTDIR``: plot and print the errors."""
    p = argparse.ArgumentParser(prog="python -m moesim.experiments.plot_validation",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("dir", type=Path, help="validate output folder (holds validation.parquet)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: DIR)")
    p.add_argument("--log", action="store_true", help="log-log axes")
    args = p.parse_args(argv)
    try:
        path = find_table(args.dir)
        table = tidy(pd.read_parquet(path))
        paths = plot_validation(table, args.out or args.dir, log=args.log)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"plot_validation: {exc}", file=sys.stderr)
        return 2
    err = errors(table)
    shown = err.copy()
    for col in shown.columns:
        if col.endswith((" error", " spread")):
            shown[col] = shown[col].map(lambda v: f"{v:+.1%}" if np.isfinite(v) else "-")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(shown.to_string(index=False))
    for label in METRICS:
        col = f"{label} error"
        if col in err:
            e = err[col].abs().dropna()
            if len(e):
                print(f"{label}: median |error| {e.median():.1%}, max {e.max():.1%} over "
                      f"{len(e)} configs")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
