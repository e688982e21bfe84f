"""Result blocks generated from committed result files, so their numbers cannot drift.

    python -m moesim.experiments.readme_blocks          # rewrite every block (and its figure)
    python -m moesim.experiments.readme_blocks --check  # exit 1 if a block differs (tested)
    python -m moesim.experiments.readme_blocks --collect stall_vs_link multirun/stall_vs_link

A block sits between ``<!-- BEGIN generated:<name> -->`` and ``<!-- END generated:<name> -->`` in
README.md or in a page of the docs site (``experiments/docs/pages/**/*.md``); each block appears
exactly once, in whichever of those files it belongs. :data:`BLOCKS` says which result file and
renderer make it. Result files are small files committed under ``experiments/results/``,
``experiments/bench/results/`` (written by the experiment's or benchmark's own command, see each
block's text) and ``experiments/docs/results/`` (one CSV per experiment sweep, written from the
sweep's summaries by ``--collect``: :data:`SWEEP_RESULTS` says which columns it keeps); no file
ever holds a number typed by hand inside a block.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.experiments import modern_models
from moesim.experiments.plot_style import level_order
from moesim.experiments.published import docs as published_docs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parent / "figures"
PAGES = Path(__file__).resolve().parent / "docs" / "pages"
# Compact results of the experiment sweeps, one CSV each (written by --collect from a sweep).
SWEEPS = Path(__file__).resolve().parent / "docs" / "results"
PROVENANCE = ("moesim.version", "moesim.commit", "run.date")

# Predictions of experiment=validate, in the order the model gains terms (experiments/validate.py
# validation_table): label, column suffix, what it adds.
VALIDATION_STEPS = (
    ("A. profiled once before the config (reads, ops, per-copy latency; no contention)",
     "before"),
    ("B. reads timed around each run; no per-copy latency", "bracketed_no_handoff"),
    ("C. B + the copy path's per-copy latency", "bracketed"),
    ("D. C + compute timed beside a busy reader (contention): the headline", "bracketed_io"),
)


def _pct(x: float, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:+.1f} %" if signed else f"{x:.1f} %"


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def render_validation(df: pd.DataFrame) -> str:
    """The "How accurate is moesim?" block: error by model term, then every config."""
    n = len(df)
    traces = sorted(df["trace.name"].unique())
    lines = [
        f"{n} configs ({df['policy.label'].nunique()} policies x "
        f"{df['cache.fraction'].nunique()} capacities x {len(traces)} traces: "
        f"{', '.join(traces)}); each simulated, then run for real `validate.repeats` times on "
        "the executor. Errors are of the simulated "
        "time per token against the median real run; spread is (max - min) / median of the real "
        "runs.",
        "",
        "| prediction (what its profile holds) | median \\|error\\| | max \\|error\\| "
        "| mean signed |",
        "|---|---|---|---|",
    ]
    for label, kind in VALIDATION_STEPS:
        col = f"tpot_err_{kind}_pct"
        if col not in df:
            continue
        e = df[col].astype(float)
        lines.append(f"| {label} | {_pct(e.abs().median())} | {_pct(e.abs().max())} "
                     f"| {_pct(e.mean(), True)} |")
    if "tpot_err_inrun_link_pct" in df:
        e = df["tpot_err_inrun_link_pct"].astype(float)
        lines.append(f"| *diagnostic, not a prediction: the run's own mean copy time* "
                     f"| {_pct(e.abs().median())} | {_pct(e.abs().max())} "
                     f"| {_pct(e.mean(), True)} |")
    spread = df["tpot_real_spread_pct"].astype(float)
    lines += ["", f"Real runs' own spread: median {_pct(spread.median())}, max "
              f"{_pct(spread.max())}."]
    demand = df["policy.label"].isin(["lru", "belady", "fifo", "lfu", "least_stale"])
    if "counts_equal" in df:
        eq = df["counts_equal"].astype(bool)
        lines.append(
            f"Hit / late-hit / promoted / miss counts equal between sim and real: "
            f"{int(eq[demand].sum())} of {int(demand.sum())} demand-only configs, "
            f"{int(eq[~demand].sum())} of {int((~demand).sum())} prefetching configs (a "
            "prefetch's timing decides whether it lands, so these may differ).")
    if "load_avg_1m" in df:
        load = df["load_avg_1m"].astype(float)
        lines.append(f"Load average during the real runs: {load.min():.1f} to {load.max():.1f} "
                     "(2 cores).")
    lines += ["", "| trace | policy | cache | sim ms/token | real ms/token (min-max) | error "
              "| stall sim / real ms | counts |", "|---|---|---|---|---|---|---|---|"]
    for _, r in df.sort_values(["trace.name", "cache.fraction", "config_id"]).iterrows():
        counts = "=" if bool(r.get("counts_equal", False)) else "differ"
        lines.append(
            f"| {r['trace.name']} | {r['policy.label']} | {r['cache.fraction']:.0%} "
            f"| {_ms(r['tpot_sim_s'])} | {_ms(r['tpot_real_s'])} ({_ms(r['tpot_real_min_s'])}-"
            f"{_ms(r['tpot_real_max_s'])}) | {_pct(r['tpot_err_pct'], True)} "
            f"| {_ms(r['stall_sim_s'])} / {_ms(r['stall_real_s'])} | {counts} |")
    return "\n".join(lines)


def render_validation_runs(df: pd.DataFrame) -> str:
    """Every committed run of the same sweep, one row each: how much the headline itself moves
    between runs on this machine (``run`` names the file, ``final`` the one shown above)."""
    lines = ["| run | median \\|error\\| | max \\|error\\| | real spread (median) "
             "| load average |", "|---|---|---|---|---|"]
    for run, g in df.groupby("run", sort=False):
        e = g["tpot_err_pct"].astype(float).abs()
        load = g["load_avg_1m"].astype(float)
        lines.append(f"| {run} | {_pct(e.median())} | {_pct(e.max())} "
                     f"| {_pct(g['tpot_real_spread_pct'].astype(float).median())} "
                     f"| {load.min():.1f} to {load.max():.1f} |")
    return "\n".join(lines)


def _all_validation_runs() -> pd.DataFrame:
    """The shown run first (``final``), then earlier ones (``validate_ci_vm_<run>.csv``)."""
    frames = [pd.read_csv(RESULTS / "validate_ci_vm.csv").assign(run="final (shown above)")]
    for path in sorted(RESULTS.glob("validate_ci_vm_*.csv")):
        run = path.stem.removeprefix("validate_ci_vm_")
        frames.append(pd.read_csv(path).assign(run=f"{run} (earlier code, same sweep)"))
    return pd.concat(frames, ignore_index=True)


def _validation_figure(df: pd.DataFrame) -> None:
    from moesim.experiments import plot_validation as pv

    paths = pv.plot_validation(pv.tidy(df), FIGURES, log=True)  # two traces, 10x apart
    for p in paths:  # one stable name per figure in the README
        p.replace(p.with_name(f"validation_ci_vm{p.suffix}"))


def _validation_noise() -> pd.DataFrame:
    from moesim.experiments.validate import noise_results

    return noise_results()


def _render_validation_noise(df: pd.DataFrame) -> str:
    from moesim.experiments.validate import render_noise_block

    return render_noise_block(df)


def _bench_sim() -> dict[str, Any]:
    from moesim.experiments.bench.report_sim import JSON

    return json.loads(JSON.read_text())


def _render_bench_sim(res: dict[str, Any]) -> str:
    from moesim.experiments.bench.report_sim import render

    return render(res)


def _bench_stream() -> dict[str, Any]:
    from moesim.experiments.bench.bench_stream import JSON

    return json.loads(JSON.read_text())


def _render_bench_stream(res: dict[str, Any]) -> str:
    from moesim.experiments.bench.bench_stream import render

    return render(res)


def _bench_stream_oracle() -> dict[str, Any]:
    from moesim.experiments.bench.bench_stream import ORACLE_JSON

    return json.loads(ORACLE_JSON.read_text())


BENCH_DIR = Path(__file__).resolve().parent / "bench" / "results"


def render_bench_sweep(res: dict[str, Any]) -> str:
    """Every measured sweep: launcher, wall and CPU, the simulation's share, the load."""
    lines = ["| sweep | runs | launcher | wall s | CPU s | simulation share of CPU | load "
             "before -> after |", "|---|---|---|---|---|---|---|"]
    for name, sw in res.items():
        for r in sw["runs"]:
            lines.append(f"| {name} | {r['runs']} | {r.get('launcher', 'joblib')} | "
                         f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['sim_share']:.0%} | "
                         f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
    dates = ", ".join(f"{name} {sw['date']}" for name, sw in res.items())
    cpus = next(iter(res.values()))["cpus"]
    return "\n".join([*lines, "", f"Measured on {cpus} CPUs ({dates}); the machine was shared "
                       "(load beside each run)."])


def render_bench_mi(res: dict[str, Any]) -> str:
    """MoE-Infinity's compiled speed beside the compiled LRU and libCacheSim's LRU."""
    lines = ["| policy | CPU s | M token-layers per CPU s | x compiled LRU | x libCacheSim LRU |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['policy']} | {r['cpu_s']:.2f} | {r['m_token_layers_per_cpu_s']:.3f} "
                     f"| {r['vs_compiled_lru']:.1f} | {r['vs_libcachesim_lru']:.1f} |")
    c = res["conditions"]
    return "\n".join([
        *lines, "",
        f"DeepSeek-V2-Lite training trace ({res['token_layers'] / 1e6:.2f} M token-layers), "
        f"batch {res['batch']}, best of {res['reps']} interleaved; libCacheSim's LRU replay of "
        f"the same stream {res['libcachesim_lru_cpu_s']:.2f} CPU-s. Measured {c['date_utc']} "
        f"UTC at {c['commit']} on {c['cpus']} CPUs ({c['processor']}), load "
        f"{c['load_avg_1m_before']:.1f} -> {c['load_avg_1m_after']:.1f}. Target: 1 M "
        "token-layers per CPU s (or within 2x of the compiled LRU)."])


# A block: (load the results, render them, draw the block's figure or None).
Block = tuple[Callable[[], Any], Callable[[Any], str], Callable[[Any], None] | None]


# --- experiment sweeps: a committed CSV per sweep, a table per CSV ---------------------------


@dataclass(frozen=True)
class SweepResult:
    """The summary columns of one experiment's sweep kept in its committed CSV: the factors
    that identify a run (unique per run), the metrics its table shows, and provenance."""

    factors: tuple[str, ...]
    metrics: tuple[str, ...]


SWEEP_RESULTS: dict[str, SweepResult] = {
    "capacity_deepseek_train": SweepResult(
        ("policy.name", "cache.fraction"),
        ("hit_rate", "stall_per_output_token_s", "time_per_output_token_s")),
    "hit_rate_vs_capacity": SweepResult(
        ("policy.name", "mode", "cache.fraction"),
        ("hit_rate", "hit_rate_incl_late", "stall_per_output_token_s")),
    "stall_vs_link": SweepResult(
        ("policy.name", "hw.name"),
        ("hit_rate_incl_late", "stall_per_output_token_s", "time_per_output_token_s")),
    "batch_dedup": SweepResult(
        ("policy.name", "batch"),
        ("unique_experts_per_pair", "hit_rate", "demand_bytes", "time_per_output_token_s")),
    "prediction_point_oracle": SweepResult(
        ("hw.name", "policy.point", "policy.lookahead"),
        ("hit_rate_incl_late", "stall_per_output_token_s", "time_per_output_token_s")),
    "prediction_point": SweepResult(
        ("mode", "compute_scale", "label"),
        ("hit_rate", "stall_per_output_token_s", "time_per_output_token_s")),
    "fetch_vs_compute": SweepResult(
        ("hw.name", "placement", "cache.fraction"),
        ("time_per_output_token_s", "tpot_p99_s", "hit_rate", "cpu_expert_execs",
         "cpu_busy_fraction", "pcie_busy_fraction")),
    "fetch_vs_compute_batch": SweepResult(
        ("hw.name", "placement", "batch"),
        ("time_per_output_token_s", "tpot_p99_s", "cpu_expert_execs", "cpu_busy_fraction")),
    "approximate_fetch": SweepResult(
        ("hw.name", "placement", "placement_params.threshold"),
        ("time_per_output_token_s", "gate_mass_full", "gate_mass_low_precision",
         "gate_mass_skipped", "low_precision_fetches", "skipped_experts")),
}


def collect_sweep(name: str, dirs: Sequence[Path]) -> pd.DataFrame:
    """The rows ``SWEEP_RESULTS[name]`` keeps from every ``summary.parquet`` below ``dirs``,
    sorted by the factors; one clear error for no runs, a missing column or a repeated run."""
    if name not in SWEEP_RESULTS:
        raise SystemExit(f"error: --collect {name}: not a sweep table; known: "
                         f"{', '.join(SWEEP_RESULTS)}")
    spec = SWEEP_RESULTS[name]
    paths = sorted(p for d in dirs for p in Path(d).rglob("summary.parquet"))
    if not paths:
        raise SystemExit(f"error: --collect {name}: no summary.parquet below "
                         f"{', '.join(map(str, dirs))}")
    df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    missing = [c for c in (*spec.factors, *spec.metrics) if c not in df]
    if missing:
        raise SystemExit(f"error: --collect {name}: the summaries have no column "
                         f"{', '.join(missing)}")
    factors = list(spec.factors)
    if df.duplicated(factors).any():
        raise SystemExit(f"error: --collect {name}: several runs with the same "
                         f"{', '.join(factors)} (collect one sweep, or sweeps that differ in "
                         "these)")
    keep = [*factors, *spec.metrics, *(c for c in PROVENANCE if c in df)]
    return df[keep].sort_values(factors, kind="stable").reset_index(drop=True)


def _load_sweep(name: str) -> pd.DataFrame:
    path = SWEEPS / f"{name}.csv"
    if not path.is_file():
        raise SystemExit(f"error: block {name}: {path} does not exist; write it with --collect "
                         f"{name} <sweep dir>")
    return pd.read_csv(path)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and bool(np.isfinite(x))


def _p(x: Any) -> str:
    return f"{100 * x:.1f} %" if _finite(x) else "–"


def _msec(x: Any) -> str:
    return f"{x * 1e3:.1f}" if _finite(x) else "–"


def _source(name: str, df: pd.DataFrame) -> str:
    """Where the table's numbers come from: the CSV, its runs and their provenance."""
    parts = [f"{len(df)} runs, from `experiments/docs/results/{name}.csv`"]
    for col, what in (("moesim.version", "moesim"), ("moesim.commit", "commit")):
        if col in df:
            parts.append(f"{what} {', '.join(sorted(df[col].astype(str).unique()))}")
    if "run.date" in df:
        dates = pd.to_datetime(df["run.date"], utc=True)
        parts.append(f"run {dates.min():%Y-%m-%d %H:%M}-{dates.max():%H:%M} UTC")
    return "; ".join(parts) + "."


# Host links from slowest to fastest PCIe, then the NVMe-backed board (the experiments' order).
HW_ORDER = ("v100_pcie", "v100_sxm2", "a100_pcie", "a100_sxm4", "rtx4090", "h100_pcie",
            "jetson_orin_nano", "jetson_agx_orin")


def _order(factor: str, values: pd.Series) -> list[Any]:
    """Distinct values in the figures' order (hardware: :data:`HW_ORDER`)."""
    if factor == "hw.name":
        rank = {name: i for i, name in enumerate(HW_ORDER)}
        return sorted(values.unique(), key=lambda v: (rank.get(str(v), len(rank)), str(v)))
    return level_order(factor, values)


def _grid(df: pd.DataFrame, rows: str, cols: str, cell: Callable[[pd.DataFrame], str],
          corner: str, col_name: Callable[[Any], str] = str) -> list[str]:
    """A Markdown table: one row per value of ``rows``, one column per value of ``cols`` (in
    the figures' order), each cell ``cell`` of the matching runs."""
    rvals, cvals = _order(rows, df[rows]), _order(cols, df[cols])
    lines = ["| " + " | ".join([corner, *(col_name(c) for c in cvals)]) + " |",
             "|" + "---|" * (len(cvals) + 1)]
    for r in rvals:
        cells = [cell(df[(df[rows] == r) & (df[cols] == c)]) for c in cvals]
        lines.append("| " + " | ".join([f"`{r}`" if isinstance(r, str) else str(r),
                                        *(c or "–" for c in cells)]) + " |")
    return lines


def _one(g: pd.DataFrame, col: str) -> Any:
    return g[col].iloc[0] if len(g) == 1 else None


def render_capacity(df: pd.DataFrame) -> str:
    """Hit rate and stall per token by policy and cache size."""
    return "\n".join([
        _source("capacity_deepseek_train", df) + " Each cell: hit rate / stall per output "
        "token (ms).", "",
        *_grid(df, "policy.name", "cache.fraction",
               lambda g: (f"{_p(_one(g, 'hit_rate'))} / "
                          f"{_msec(_one(g, 'stall_per_output_token_s'))}"),
               "policy", lambda c: f"{c:.0%}")])


def render_hit_rate_vs_capacity(df: pd.DataFrame) -> str:
    """Zero-latency and timed hit rate, and timed stall, by policy and cache size."""
    def cell(g: pd.DataFrame) -> str:
        zl, timed = g[g["mode"] == "zero_latency"], g[g["mode"] == "timed"]
        return (f"{_p(_one(zl, 'hit_rate'))} / {_p(_one(timed, 'hit_rate'))} / "
                f"{_msec(_one(timed, 'stall_per_output_token_s'))}")

    return "\n".join([
        _source("hit_rate_vs_capacity", df) + " Each cell: hit rate zero-latency / hit rate "
        "timed (late hits not counted) / timed stall per output token (ms).", "",
        *_grid(df, "policy.name", "cache.fraction", cell, "policy", lambda c: f"{c:.0%}")])


def render_stall_vs_link(df: pd.DataFrame) -> str:
    """Stall per token (and hits including late ones) by policy and host link."""
    return "\n".join([
        _source("stall_vs_link", df) + " Each cell: stall per output token (ms) / hit rate "
        "including late hits.", "",
        *_grid(df, "policy.name", "hw.name",
               lambda g: (f"{_msec(_one(g, 'stall_per_output_token_s'))} / "
                          f"{_p(_one(g, 'hit_rate_incl_late'))}"), "policy",
               lambda c: f"`{c}`")])


def render_batch_dedup(df: pd.DataFrame) -> str:
    """Deduplication and, per policy, hit rate and time per token by batch size."""
    lines = [_source("batch_dedup", df) + " Unique experts per (token × k) do not depend on "
             "the policy; each policy cell: hit rate / GB copied on demand / time per output "
             "token (ms).", ""]
    policies = _order("policy.name", df["policy.name"])
    lines += ["| batch | unique experts / (token × k) | " + " | ".join(
        f"`{p}`" for p in policies) + " |", "|" + "---|" * (len(policies) + 2)]
    for b in _order("batch", df["batch"]):
        g = df[df["batch"] == b]
        dedup = g["unique_experts_per_pair"].unique()
        cells = []
        for pol in policies:
            run = g[g["policy.name"] == pol]
            gb = _one(run, "demand_bytes")
            cells.append(f"{_p(_one(run, 'hit_rate'))} / "
                         f"{f'{gb / 1e9:,.0f}' if _finite(gb) else '–'} / "
                         f"{_msec(_one(run, 'time_per_output_token_s'))}")
        lines.append(f"| {b} | {dedup[0]:.3f} | " + " | ".join(cells) + " |"
                     if len(dedup) == 1 else f"| {b} | – | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_prediction_point_oracle(df: pd.DataFrame) -> str:
    """Stall per token of a perfect prefetch by issue point and lookahead, per profile."""
    lines = [_source("prediction_point_oracle", df) + " Each cell: stall per output token "
             "(ms) with a perfect prediction of layer l+d issued at that point of layer l."]
    for hw in _order("hw.name", df["hw.name"]):
        g = df[df["hw.name"] == hw]
        lines += ["", f"`{hw}` (time per output token "
                  f"{_msec(g['time_per_output_token_s'].min())}-"
                  f"{_msec(g['time_per_output_token_s'].max())} ms):", "",
                  *_grid(g, "policy.point", "policy.lookahead",
                         lambda x: _msec(_one(x, "stall_per_output_token_s")), "point",
                         lambda c: f"d = {c}")]
    return "\n".join(lines)


def render_prediction_point(df: pd.DataFrame) -> str:
    """Zero-latency hit rate and timed stall per token (saved against no prediction) for each
    predictor at each compute scale."""
    scales = _order("compute_scale", df["compute_scale"])
    zl, timed = df[df["mode"] == "zero_latency"], df[df["mode"] == "timed"]
    base = {s: _one(timed[(timed["label"] == "none") & (timed["compute_scale"] == s)],
                    "stall_per_output_token_s") for s in scales}
    lines = [_source("prediction_point", df) + " Stall per output token in µs; in brackets "
             "the share of `none`'s stall saved at the same compute scale.", "",
             "| `predictor=` | hit rate, zero-latency | " + " | ".join(
                 f"compute x{s:g}: stall / token (saved)" for s in scales) + " |",
             "|" + "---|" * (len(scales) + 2)]
    for label in _order("label", df["label"]):
        hit = _one(zl[(zl["label"] == label) & (zl["compute_scale"] == scales[0])], "hit_rate")
        cells = []
        for s in scales:
            st = _one(timed[(timed["label"] == label) & (timed["compute_scale"] == s)],
                      "stall_per_output_token_s")
            saved = (1 - st / base[s]) if _finite(st) and _finite(base[s]) and base[s] else None
            cells.append(f"{st * 1e6:.1f} µs ({saved * 100:+.0f} %)"
                         if _finite(st) and saved is not None else "–")
        lines.append(f"| `{label}` | {hit:.3f} | " + " | ".join(cells) + " |"
                     if _finite(hit) else f"| `{label}` | – | " + " | ".join(cells) + " |")
    tpot = [_one(timed[(timed["label"] == "none") & (timed["compute_scale"] == s)],
                 "time_per_output_token_s") for s in scales]
    lines.append("| time / token, `none` | | " + " | ".join(
        f"{t * 1e6:.1f} µs" if _finite(t) else "–" for t in tpot) + " |")
    return "\n".join(lines)


def render_fetch_vs_compute(df: pd.DataFrame) -> str:
    """Time per output token of each placement by host link and cache size."""
    return "\n".join([
        _source("fetch_vs_compute", df) + " Each cell: time per output token (ms) at 10 % / "
        "25 % / 50 % of the routed experts cached.", "",
        *_grid(df, "placement", "hw.name",
               lambda g: " / ".join(_msec(_one(g[g["cache.fraction"] == f],
                                               "time_per_output_token_s"))
                                    for f in _order("cache.fraction", g["cache.fraction"])),
               "placement", lambda c: f"`{c}`")])


def render_fetch_vs_compute_batch(df: pd.DataFrame) -> str:
    """Time per output token of each placement by host link and batch size."""
    batches = _order("batch", df["batch"])
    return "\n".join([
        _source("fetch_vs_compute_batch", df) + " Each cell: time per output token (ms) at "
        f"batch {' / '.join(str(b) for b in batches)}.", "",
        *_grid(df, "placement", "hw.name",
               lambda g: " / ".join(_msec(_one(g[g["batch"] == b], "time_per_output_token_s"))
                                    for b in batches),
               "placement", lambda c: f"`{c}`")])


def render_approximate_fetch(df: pd.DataFrame) -> str:
    """Time per token and gate mass kept at full precision, by threshold, per placement and
    profile."""
    thresholds = _order("placement_params.threshold", df["placement_params.threshold"])
    lines = [_source("approximate_fetch", df) + " Each cell: time per output token (µs) / "
             "routed gate mass computed at full precision.", "",
             "| placement | `hw` | " + " | ".join(f"threshold {t:g}" for t in thresholds)
             + " |", "|" + "---|" * (len(thresholds) + 2)]
    for pl in _order("placement", df["placement"]):
        for hw in _order("hw.name", df["hw.name"]):
            g = df[(df["placement"] == pl) & (df["hw.name"] == hw)]
            cells = []
            for t in thresholds:
                r = g[g["placement_params.threshold"] == t]
                tp, gm = _one(r, "time_per_output_token_s"), _one(r, "gate_mass_full")
                cells.append(f"{tp * 1e6:.1f} / {_p(gm)}" if _finite(tp) else "–")
            lines.append(f"| `{pl}` | `{hw}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CROSSOVER_CARDS = ("deepseek_v2_lite", "mixtral_8x7b", "qwen3_30b_a3b")


def _crossover() -> pd.DataFrame:
    """Fiddler's decision boundary for every shipped profile with a host CPU path and a few
    model cards, from the profiles themselves (:func:`moesim.sim.hardware.cpu_crossover_tokens`:
    idle queues; ``fetch_or_cpu`` adds the queues)."""
    from moesim.hw_profiles import list_profiles, load_profile
    from moesim.sim.hardware import cpu_crossover_tokens, host_side
    from moesim.traces.model_card import load_card

    rows = []
    for model in CROSSOVER_CARDS:
        card = load_card(model)
        for name in list_profiles():
            prof = load_profile(name)
            host = host_side(prof, card)
            if host.cpu is None:
                continue
            link, comp = prof.expert_link(), prof.compute_model(card)
            rows.append({
                "hw.name": name, "model": model,
                "copy_ms": link.transfer_time(card.expert_bytes) * 1e3,
                "cpu_ms": host.cpu.expert_time(1) * 1e3,
                "gpu_ms": comp.expert_time(1) * 1e3,
                "tokens": cpu_crossover_tokens(link, comp, host.cpu, card.expert_bytes,
                                               host.activation_bytes),
            })
    return pd.DataFrame(rows)


def render_crossover(df: pd.DataFrame) -> str:
    """Per profile and model: one expert's copy, CPU and GPU time at 1 token, and the fewest
    tokens per missed expert from which fetching beats the host CPU."""
    lines = ["Computed from the shipped profiles by `python -m moesim.experiments.readme_blocks`"
             " (`moesim.sim.hardware.cpu_crossover_tokens`, idle link and CPU). Each cell: copy "
             "one expert / run it on the host CPU / run it on the GPU, at 1 token (ms); then the "
             "fewest tokens routed to one missed expert from which fetching it is faster.", "",
             "| `hw` | " + " | ".join(f"`{m}`" for m in CROSSOVER_CARDS) + " |",
             "|" + "---|" * (len(CROSSOVER_CARDS) + 1)]
    for hw in _order("hw.name", df["hw.name"]):
        cells = []
        for m in CROSSOVER_CARDS:
            r = df[(df["hw.name"] == hw) & (df["model"] == m)]
            if len(r) != 1:
                cells.append("–")
                continue
            r = r.iloc[0]
            n = "never up to 4096" if pd.isna(r["tokens"]) else f"{int(r['tokens'])} tokens"
            cells.append(f"{r['copy_ms']:.3g} / {r['cpu_ms']:.3g} / {r['gpu_ms']:.3g}; {n}")
        lines.append(f"| `{hw}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _host_cpu_table(_: None) -> str:
    """``moesim-profile table --host-cpu --card deepseek_v2_lite``'s table (the same function)."""
    from moesim.hw_profiles import list_profiles
    from moesim.hw_profiles.report import host_cpu_table
    from moesim.traces.model_card import load_card

    return host_cpu_table(list_profiles(), load_card("deepseek_v2_lite")).rstrip()


def _sweep_block(name: str, render: Callable[[pd.DataFrame], str]) -> Block:
    return (lambda: _load_sweep(name), render, None)


# name -> (load the results, render them, draw the block's figure or None)
BLOCKS: dict[str, Block] = {
    "validation": (lambda: pd.read_csv(RESULTS / "validate_ci_vm.csv"), render_validation,
                   _validation_figure),
    "validation_runs": (_all_validation_runs, render_validation_runs, None),
    # experiments/results/validate_{paced,forecast}_ci_vm.csv; experiments/validate.py renders
    "validation_noise": (_validation_noise, _render_validation_noise, None),
    # experiments/bench/bench_sim.py writes it; experiments/bench/report_sim.py renders it
    "bench_sim": (_bench_sim, _render_bench_sim, None),
    # experiments/bench/bench_stream.py writes and renders it
    "bench_stream": (_bench_stream, _render_bench_stream, None),
    # the same benchmark for the oracle prefetcher (bench_stream --policies oracle_prefetch)
    "bench_stream_oracle": (_bench_stream_oracle, _render_bench_stream, None),
    # experiments/bench/bench_sweep.py and bench_sim.py --mi write them
    "bench_sweep": (lambda: json.loads((BENCH_DIR / "bench_sweep.json").read_text()),
                    render_bench_sweep, None),
    "bench_mi": (lambda: json.loads((BENCH_DIR / "bench_mi.json").read_text()),
                 render_bench_mi, None),
    # experiments/docs/results/<name>.csv, written by --collect <name> <sweep dir>
    "capacity_deepseek_train": _sweep_block("capacity_deepseek_train", render_capacity),
    "hit_rate_vs_capacity": _sweep_block("hit_rate_vs_capacity", render_hit_rate_vs_capacity),
    "stall_vs_link": _sweep_block("stall_vs_link", render_stall_vs_link),
    "batch_dedup": _sweep_block("batch_dedup", render_batch_dedup),
    "prediction_point_oracle": _sweep_block("prediction_point_oracle",
                                            render_prediction_point_oracle),
    "prediction_point": _sweep_block("prediction_point", render_prediction_point),
    "fetch_vs_compute": _sweep_block("fetch_vs_compute", render_fetch_vs_compute),
    "fetch_vs_compute_batch": _sweep_block("fetch_vs_compute_batch",
                                           render_fetch_vs_compute_batch),
    "approximate_fetch": _sweep_block("approximate_fetch", render_approximate_fetch),
    # computed from the shipped hardware profiles, not from a sweep
    "crossover": (_crossover, render_crossover, None),
    "host_cpu_table": (lambda: None, _host_cpu_table, None),
    # experiments/modern_models.py and traces/residency.py write them; modern_models renders
    **modern_models.BLOCKS,
    # experiments/docs/results/published_*.csv, written by python -m moesim.experiments.published
    # predict; experiments/published/docs.py renders them
    **published_docs.BLOCKS,
}


# Markers are whole lines (the same text quoted inside a line is not a marker).
_BLOCK = re.compile(r"^(<!-- BEGIN generated:([\w-]+) -->\n)(.*?)^(<!-- END generated:\2 -->)$",
                    re.S | re.M)
_MARKER = re.compile(r"^<!-- (?:BEGIN|END) generated:([\w-]+) -->$", re.M)


def _pattern(name: str) -> re.Pattern[str]:
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    return re.compile(rf"^({begin}\n)(.*?)^({end})$", re.S | re.M)


def doc_files() -> list[Path]:
    """Every file that may hold blocks: the README, then the docs pages (sorted)."""
    return [ROOT / "README.md", *sorted(PAGES.rglob("*.md"))]


def find_blocks(files: Sequence[Path]) -> dict[str, Path]:
    """Block name -> the file holding it. Errors (one line each): a marker without its pair, a
    block no renderer knows, a block in two places."""
    where: dict[str, Path] = {}
    for path in files:
        text = path.read_text()
        names = [m.group(2) for m in _BLOCK.finditer(text)]
        markers = _MARKER.findall(text)
        if len(markers) != 2 * len(names):
            raise SystemExit(f"error: {path}: a generated-block marker has no matching pair")
        for name in names:
            if name not in BLOCKS:
                raise SystemExit(f"error: {path}: block generated:{name} has no renderer "
                                 "in experiments/readme_blocks.py BLOCKS")
            if name in where:
                raise SystemExit(f"error: block generated:{name} is in both {where[name]} "
                                 f"and {path}")
            where[name] = path
    return where


def update(files: Sequence[Path] | None = None, *, check: bool,
           figures: bool = True) -> list[str]:
    """Rewrite (or with ``check`` only compare) every block in ``files`` (default: the README
    and every docs page, which must then hold every block of :data:`BLOCKS`); returns the names
    that differ. Figures are redrawn only when rewriting."""
    every = files is None
    files = doc_files() if files is None else list(files)
    where = find_blocks(files)
    if every and (missing := [n for n in BLOCKS if n not in where]):
        raise SystemExit(f"error: no file holds block(s) {', '.join(missing)} "
                         "(README.md or experiments/docs/pages)")
    stale = []
    texts = {path: path.read_text() for path in set(where.values())}
    for name, path in where.items():
        load, render, figure = BLOCKS[name]
        data = load()
        body = render(data).rstrip("\n") + "\n"
        new = _pattern(name).sub(lambda m, body=body: m.group(1) + body + m.group(3), texts[path])
        if new != texts[path]:
            stale.append(name)
            texts[path] = new
        if figure is not None and figures and not check:
            figure(data)
    if not check:
        for path, text in texts.items():
            if text != path.read_text():
                path.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moesim.experiments.readme_blocks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1)")
    p.add_argument("--collect", nargs="+", metavar=("NAME", "SWEEP_DIR"),
                   help="first write experiments/docs/results/NAME.csv from the summaries below "
                   f"SWEEP_DIR... (NAME: {', '.join(SWEEP_RESULTS)})")
    p.add_argument("files", nargs="*", type=Path,
                   help="only these files (default: README.md and experiments/docs/pages)")
    args = p.parse_args(argv)
    if args.collect:
        if len(args.collect) < 2:
            p.error("--collect needs NAME and at least one SWEEP_DIR")
        name, dirs = args.collect[0], [Path(d) for d in args.collect[1:]]
        df = collect_sweep(name, dirs)
        SWEEPS.mkdir(parents=True, exist_ok=True)
        tmp = SWEEPS / f".{name}.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(SWEEPS / f"{name}.csv")
        print(f"wrote {SWEEPS / f'{name}.csv'}: {len(df)} runs")
    stale = update(args.files or None, check=args.check)
    if args.check and stale:
        print(f"stale generated blocks: {', '.join(stale)}; "
              "run python -m moesim.experiments.readme_blocks",
              file=sys.stderr)
        return 1
    print("generated blocks " + ("up to date" if not stale else "rewritten: " + ", ".join(stale)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
