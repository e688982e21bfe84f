"""Result blocks generated from committed result files, so their numbers cannot drift.

    python -m moesim.experiments.readme_blocks          # rewrite every block (and its figure)
    python -m moesim.experiments.readme_blocks --check  # exit 1 if a block differs (tested)

A block sits between ``<!-- BEGIN generated:<name> -->`` and ``<!-- END generated:<name> -->`` in
README.md or in a page of the docs site (``experiments/docs/pages/**/*.md``); each block appears
exactly once, in whichever of those files it belongs. :data:`BLOCKS` says which result file and
renderer make it. Result files are small files committed under ``experiments/results/`` and
``experiments/bench/results/`` (written by the experiment's or benchmark's own command, see each
block's text); no file ever holds a number typed by hand inside a block.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parent / "figures"
PAGES = Path(__file__).parent / "docs" / "pages"

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
    p.add_argument("files", nargs="*", type=Path,
                   help="only these files (default: README.md and experiments/docs/pages)")
    args = p.parse_args(argv)
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
