"""``moesim-plot DIR``: gather every run's ``summary.parquet`` below DIR into one table and plot
hit rate and stall per token against cache capacity, one line per policy (PNG and PDF).

Runs that have not finished have no summary yet and are simply not included, so this can be
pointed at a sweep that is still running.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

STYLE = {
    "figure.dpi": 120,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "legend.fontsize": 8,
}


def save_figure(fig: plt.Figure, out: Path, stem: str, dpi: float | None = None) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` into ``out`` and close the figure. No creation date
    in the PDF, so the same data gives the same file (committed figures do not churn)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        meta = {"CreationDate": None} if path.suffix == ".pdf" else None
        fig.savefig(path, dpi=dpi or "figure", metadata=meta)
    plt.close(fig)
    return paths


def collect(root: Path) -> pd.DataFrame:
    """Concatenate all summaries below ``root`` (the aggregate itself excluded)."""
    files = sorted(p for p in root.rglob("summary.parquet"))
    if not files:
        raise FileNotFoundError(f"no summary.parquet below {root}")
    frames = []
    for f in files:
        df = pd.read_parquet(f)
        df["run_dir"] = str(f.parent.relative_to(root))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _series_label(df: pd.DataFrame) -> pd.Series:
    label = df["policy.name"].astype(str)
    for extra in ("hw.name", "trace.name"):
        if extra in df and df[extra].nunique() > 1:
            label = label + " · " + df[extra].astype(str)
    return label


def plot_vs_capacity(df: pd.DataFrame, out: Path) -> list[Path]:
    """Hit rate (and, for timed runs, stall per output token) against capacity."""
    df = df.copy()
    df["series"] = _series_label(df)
    modes = sorted(df["mode"].dropna().unique())
    timed = df[df["mode"] == "timed"]
    panels = [(m, "hit_rate", "hit rate") for m in modes]
    if not timed.empty:
        panels.append(("timed", "stall_per_output_token_s", "stall per output token (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    with plt.rc_context(STYLE):
        for ax, (mode, metric, ylabel) in zip(axes[0], panels, strict=True):
            sub = df[df["mode"] == mode]
            for name, g in sub.groupby("series"):
                g = g.groupby("cache.capacity_fraction", as_index=False)[metric].agg(
                    ["mean", "min", "max"]
                )
                scale = 1e3 if metric.endswith("_s") else 1.0
                x = g["cache.capacity_fraction"] * 100
                ax.plot(x, g["mean"] * scale, marker="o", ms=3, label=name)
                if (g["max"] > g["min"]).any():  # several seeds: show their range
                    ax.fill_between(x, g["min"] * scale, g["max"] * scale, alpha=0.2)
            ax.set_xlabel("cache capacity (% of routed experts)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel} ({mode.replace('_', '-')})")
            if metric == "hit_rate":
                ax.set_ylim(0, 1)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(loc="best")
        fig.tight_layout()
    return save_figure(fig, out, "capacity")


METRIC_LABELS = {
    "hit_rate": ("hit rate", 1.0),
    "hit_rate_incl_late": ("hit rate incl. late", 1.0),
    "stall_per_output_token_s": ("stall per output token (ms)", 1e3),
    "time_per_output_token_s": ("time per output token (ms)", 1e3),
    "unique_experts_per_pair": ("unique experts / (tokens x k)", 1.0),
    "demand_bytes": ("demand bytes (GB)", 1e-9),
}


def plot_sweep(df: pd.DataFrame, x: str, xlabel: str, metrics: list[str], out: Path,
               stem: str) -> list[Path]:
    """One panel per metric against a swept factor ``x``, one line per policy (and mode)."""
    df = df.copy()
    df["series"] = df["policy.name"].astype(str)
    if df["mode"].nunique() > 1:
        df["series"] += " · " + df["mode"].astype(str)
    categorical = not pd.api.types.is_numeric_dtype(df[x])
    order = list(dict.fromkeys(df[x])) if categorical else sorted(df[x].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4),
                                 squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            label, scale = METRIC_LABELS[metric]
            for name, g in df.groupby("series"):
                g = g.groupby(x)[metric].agg(["mean", "min", "max"]).reindex(order).dropna()
                xs = [order.index(v) for v in g.index] if categorical else g.index
                ax.plot(xs, g["mean"] * scale, marker="o", ms=3, label=name)
                if (g["max"] > g["min"]).any():  # several seeds: show their range
                    ax.fill_between(xs, g["min"] * scale, g["max"] * scale, alpha=0.2)
            if categorical:
                ax.set_xticks(range(len(order)), [str(v) for v in order], rotation=35,
                              ha="right")
            elif x == "batch":
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if metric.startswith("hit_rate"):
                ax.set_ylim(0, 1)
            else:
                vals = df[metric].dropna()
                vals = vals[vals > 0]
                if len(vals) and vals.max() > 20 * vals.min():  # e.g. NVMe vs PCIe 5
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0)
        axes[0][0].legend(loc="best")
        fig.tight_layout()
    return save_figure(fig, out, stem)


def _bars(ax: plt.Axes, table: pd.DataFrame, scale: float) -> None:
    """Grouped bars: one group per row label of ``table``, one bar per column."""
    n = max(len(table.columns), 1)
    width = 0.8 / n
    for i, col in enumerate(table.columns):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(table))]
        ax.bar(xs, table[col] * scale, width, label=str(col))
    ax.set_xticks(range(len(table)), [str(v) for v in table.index], rotation=35, ha="right")


# experiments/conf/predictor entries, by how early their prediction exists, oracles last
PREDICTOR_ORDER = (
    "none", "pre_attention", "moe_beyond_causal", "moe_beyond_text", "fate", "speculation",
    "oracle_pre_attention", "oracle_routed", "oracle_next_layer", "oracle_two_layers",
)


def _factor_text(factor: str, value: object) -> str:
    if factor == "compute_scale":
        return f"x{float(value):g}"  # type: ignore[arg-type]
    return str(value)


def plot_predictors(df: pd.DataFrame, out: Path) -> list[Path]:
    """Runs labelled by predictor (``experiment=prediction_point``): zero-latency hit rate,
    timed stall per token per hardware profile, and stall saved against the ``none`` run."""
    df = df[df["label"].notna()].copy()
    known = {name: i for i, name in enumerate(PREDICTOR_ORDER)}
    order = sorted(dict.fromkeys(df["label"]), key=lambda v: (known.get(v, len(known)), v))
    zl = df[df["mode"] == "zero_latency"]
    timed = df[df["mode"] == "timed"].copy()
    factors = [c for c in ("hw.name", "compute_scale") if c in timed and timed[c].nunique() > 1]
    factors = factors or ["hw.name"]
    title = " · ".join("compute x" if f == "compute_scale" else "hw" for f in factors)
    timed["group"] = [" · ".join(_factor_text(f, v) for f, v in zip(factors, vals, strict=True))
                      for vals in timed[factors].itertuples(index=False)]
    group_keys = timed.groupby("group")[factors].first()  # group label -> factor values
    panels = []
    if not zl.empty:
        panels.append("zl")
    if not timed.empty:
        panels += ["stall", "saved"] if "none" in set(timed["label"]) else ["stall"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8),
                                 squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            if panel == "zl":
                t = zl.groupby("label")[["hit_rate"]].mean().reindex(order).dropna()
                _bars(ax, t.rename(columns={"hit_rate": "zero-latency"}), 1.0)
                ax.set_ylabel("hit rate (zero-latency)")
                ax.set_ylim(0, 1)
                continue
            t = timed.pivot_table(index="label", columns="group",
                                  values="stall_per_output_token_s", aggfunc="mean")
            t = t.reindex([o for o in order if o in t.index])
            t = t[sorted(t.columns, key=lambda g: tuple(group_keys.loc[g]))]
            if panel == "stall":
                _bars(ax, t, 1e3)
                ax.set_ylabel("stall per output token (ms), timed")
            else:
                base = t.loc["none"].where(t.loc["none"] > 0)  # no stall: nothing to save
                saved = 1.0 - t.div(base, axis=1)
                _bars(ax, saved.drop(index="none"), 100.0)
                ax.axhline(0, color="black", lw=0.6)
                ax.set_ylabel("stall saved vs no prediction (%)")
            ax.legend(loc="best", title=title)
        fig.tight_layout()
    return save_figure(fig, out, "predictors")


def plot_auto(df: pd.DataFrame, out: Path) -> list[Path]:
    """The plots that fit what the sweep varied."""
    def varies(col: str) -> bool:
        return col in df and df[col].nunique(dropna=True) > 1

    if varies("label"):
        return plot_predictors(df, out)

    timed = (df["mode"] == "timed").any()
    stall = ["stall_per_output_token_s", "time_per_output_token_s"] if timed else []
    paths: list[Path] = []
    if varies("cache.capacity_fraction") or not any(
        varies(c) for c in ("hw.name", "batch", "policy.point", "policy.lookahead")
    ) or (varies("policy.name") and not varies("hw.name") and not varies("batch")):
        paths += plot_vs_capacity(df, out)
    if varies("hw.name"):
        paths += plot_sweep(df, "hw.name", "hardware profile (expert link)",
                            ["hit_rate_incl_late", *stall], out, "link")
    if varies("batch"):
        extra = ["unique_experts_per_pair", "demand_bytes"]
        paths += plot_sweep(df, "batch", "batch size (requests)", ["hit_rate", *extra, *stall],
                            out, "batch")
    if (varies("policy.point") or varies("policy.lookahead")) and not varies("policy.name"):
        df = df.copy()
        short = {"pre_attention": "pre-attn", "routed": "routed", "demand_issued": "after demand"}
        df["when"] = (df["policy.point"].map(short).fillna(df["policy.point"].astype(str))
                      + " +" + df["policy.lookahead"].astype("Int64").astype(str))
        paths += plot_sweep(df, "when", "issued at (point of layer l, + layers ahead)",
                            ["hit_rate_incl_late", *stall], out, "prediction_point")
    return paths


def plot_timeline(path: Path, out: Path, max_ms: float | None = None) -> list[Path]:
    """Gantt chart of a run's ``timeline.json``: GPU compute above, host-link copies below."""
    import json

    events = json.loads(path.read_text())["traceEvents"]
    if not events:
        raise FileNotFoundError(f"{path} has no events (run with output.timeline_steps=N)")
    rows = {"compute": 1, "host link": 0}
    colors = {"attention": "#9e9e9e", "shared": "#6d8fb3", "demand": "#d62728",
              "prefetch": "#2ca02c"}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 2.4))
        for ev in events:
            start, dur = ev["ts"] / 1e3, ev["dur"] / 1e3
            if max_ms is not None and start > max_ms:
                continue
            kind = ev["name"].split()[0]
            color = colors.get(kind, "#1f77b4")  # routed experts
            if kind.startswith("L"):
                color = colors["shared"] if ev["name"].endswith("shared") else "#1f77b4"
            ax.broken_barh([(start, dur)], (rows[ev["tid"]] - 0.35, 0.7), facecolors=color,
                           edgecolor="white", linewidth=0.3)
        ax.set_yticks(list(rows.values()), list(rows.keys()))
        ax.set_xlabel("simulated time (ms)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in
                   ("#9e9e9e", "#6d8fb3", "#1f77b4", "#d62728", "#2ca02c")]
        ax.legend(handles, ["attention + router", "shared experts", "routed expert",
                            "demand copy", "prefetch copy"], ncol=5, loc="upper center",
                  bbox_to_anchor=(0.5, 1.25), frameon=False)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
    return save_figure(fig, out, "timeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesim-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run or sweep directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DIR)")
    parser.add_argument("--timeline-ms", type=float, default=None,
                        help="with a run that wrote timeline.json: plot its first N ms")
    args = parser.parse_args(argv)
    if (args.dir / "timeline.json").is_file():
        out = args.out or args.dir
        out.mkdir(parents=True, exist_ok=True)
        try:
            paths = plot_timeline(args.dir / "timeline.json", out, args.timeline_ms)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print("timeline: " + ", ".join(map(str, paths)))
    from moesim.experiments import plot_validation as pv

    try:  # an experiment=validate folder: predicted vs measured, not the sweep plots
        vpath = pv.find_table(args.dir)
    except FileNotFoundError:
        vpath = None
    if vpath is not None:
        vpaths = pv.plot_validation(pv.tidy(pd.read_parquet(vpath)), args.out or args.dir)
        print("validation: " + ", ".join(map(str, vpaths)))
        return 0
    try:
        df = collect(args.dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.dir
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "aggregate.parquet", index=False)
    paths = plot_auto(df, out)
    cols = [c for c in ("policy.name", "mode", "hw.name", "batch", "cache.capacity_fraction",
                        "hit_rate", "stall_per_output_token_s") if c in df]
    table = df[cols].sort_values(cols[:5]).to_string(index=False, float_format=_fmt)
    print(table)
    print(f"{len(df)} runs -> {out / 'aggregate.parquet'}, " + ", ".join(map(str, paths)))
    return 0


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"


if __name__ == "__main__":
    raise SystemExit(main())
