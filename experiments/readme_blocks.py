"""README blocks generated from committed result files, so their numbers cannot drift.

    python -m moesim.experiments.readme_blocks          # rewrite every block (and its figure)
    python -m moesim.experiments.readme_blocks --check  # exit 1 if a block differs (tested)

A block sits between ``<!-- BEGIN generated:<name> -->`` and ``<!-- END generated:<name> -->`` in
README.md; :data:`BLOCKS` says which result file and renderer make it. Result files are small
files committed under ``experiments/results/`` and ``experiments/bench/results/`` (written by
the experiment's or benchmark's own command, see each block's text); the README never holds a
number typed by hand inside a block.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parent / "figures"

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


def _bench_sim() -> dict[str, Any]:
    from moesim.experiments.bench.report_sim import JSON

    return json.loads(JSON.read_text())


def _render_bench_sim(res: dict[str, Any]) -> str:
    from moesim.experiments.bench.report_sim import render

    return render(res)


# name -> (load the results, render them, draw the block's figure or None)
Block = tuple[Callable[[], Any], Callable[[Any], str], Callable[[Any], None] | None]
BLOCKS: dict[str, Block] = {
    "validation": (lambda: pd.read_csv(RESULTS / "validate_ci_vm.csv"), render_validation,
                   _validation_figure),
    "validation_runs": (_all_validation_runs, render_validation_runs, None),
    # experiments/bench/bench_sim.py writes it; experiments/bench/report_sim.py renders it
    "bench_sim": (_bench_sim, _render_bench_sim, None),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- BEGIN generated:{name} -->\n)(.*?)(<!-- END generated:{name} -->)",
                      re.S)


def update(readme: Path, *, check: bool, figures: bool = True) -> list[str]:
    """Rewrite (or with ``check`` only compare) every block; returns the names that differ."""
    text = readme.read_text()
    stale = []
    for name, (load, render, figure) in BLOCKS.items():
        pat = _pattern(name)
        if not pat.search(text):
            raise SystemExit(f"error: README has no block generated:{name}")
        data = load()
        body = render(data).rstrip("\n") + "\n"
        new = pat.sub(lambda m, body=body: m.group(1) + body + m.group(3), text)
        if new != text:
            stale.append(name)
            text = new
        if figure is not None and figures and not check:
            figure(data)
    if stale and not check:
        readme.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moesim.experiments.readme_blocks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1)")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    stale = update(args.readme, check=args.check)
    if args.check and stale:
        print(f"stale README blocks: {', '.join(stale)}; "
              "run python -m moesim.experiments.readme_blocks",
              file=sys.stderr)
        return 1
    print("README blocks " + ("up to date" if not stale else "rewritten: " + ", ".join(stale)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
