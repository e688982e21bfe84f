"""What a sweep costs beyond simulating: whole ``moesim-sim -m`` sweeps on 2 joblib workers.

    python -m moesim.experiments.bench.bench_sweep [--sweep capacity|zl200] [--reps 3]
        [--launcher joblib|packed_joblib|packed_fork|both|all] [--before DIR]
        [--traces DIR] [--out FILE]

``capacity`` is the 16-run DeepSeek-V2-Lite capacity sweep of the benchmarks page (timed,
``trace=deepseek_v2_lite``, needs ``../shared/traces``); ``zl200`` is 200 zero-latency runs on
the embedded trace (5 policies x 10 capacities x 4 seeds). Each sweep runs in a fresh folder;
its CPU time is the sweep process's and every worker's it waited for (``os.wait4``), and the
simulation's share is the sum of its runs' ``run.sim_cpu_s`` over that. ``--before DIR`` runs
the same sweep, interleaved, with another checkout's package first on ``PYTHONPATH`` (DIR holds
a ``moesim`` package folder), for before/after figures on one machine under one load.
``--launcher both`` runs the sweep with Hydra's joblib launcher and with ``packed_joblib``
(runs packed per joblib task), interleaved; ``all`` adds ``packed_fork`` (packed runs in workers
forked from the sweep's process); each record names its launcher (``packed_joblib before``:
``packed_joblib`` of the ``--before`` package, the only launcher run with it) and the load.
A sweep during which the simulator's kernels were compiled (an edit under ``sim/compiled/``)
would count the compiling as simulation: it is run again (up to twice) and kept apart, under
``discarded_compiling``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = {
    "capacity": ["trace=deepseek_v2_lite", "policy=lru,lfu,least_stale,belady",
                 "cache.fraction=0.05,0.1,0.25,0.5"],
    "zl200": ["mode=zero_latency", "policy=lru,fifo,lfu,least_stale,belady",
              "cache.fraction=0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.75,1.0", "seed=0,1,2,3"],
}
LAUNCHER = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "progress=false"]
LAUNCHERS = ["joblib", "packed_joblib", "packed_fork"]


def launcher_args(name: str) -> list[str]:
    """The sweep's launcher overrides: 2 joblib workers, Hydra's launcher or the packed one."""
    return [f"hydra/launcher={name}", *LAUNCHER[1:]]


def run_sweep(args: list[str], folder: Path, env: dict[str, str],
              launcher: list[str] = LAUNCHER) -> dict[str, Any]:
    """One sweep: wall and CPU seconds (its process and its workers), load around it, and the
    runs' own CPU (``run.cpu_s``) and simulation CPU (``run.sim_cpu_s``) summed."""
    import pandas as pd

    shutil.rmtree(folder, ignore_errors=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moesim.experiments.sim_app import main; main()", "-m",
         *args, *launcher, f"hydra.sweep.dir={folder}"],
        cwd=folder.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"sweep failed: {err[-2000:]}")
    rows = pd.concat([pd.read_parquet(p) for p in folder.glob("*/summary.parquet")])
    cpu = usage.ru_utime + usage.ru_stime
    out = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "runs": len(rows),
           "kernels_compiled": "compiling the simulator's kernels" in err,
           "runs_cpu_s": round(float(rows["run.cpu_s"].sum()), 2),
           "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}
    if "run.sim_cpu_s" in rows:
        sim = float(rows["run.sim_cpu_s"].sum())
        out.update(sim_cpu_s=round(sim, 2), sim_share=round(sim / cpu, 3))
    return out


def _commit() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="capacity")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--launcher", choices=[*LAUNCHERS, "both", "all"], default="joblib")
    ap.add_argument("--before", type=Path, help="a folder holding another checkout's moesim")
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--commit", help="the commit the measured package is a copy of (default: "
                    "this checkout's HEAD; give it when PYTHONPATH points at a copy)")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "experiments/bench/results/bench_sweep.json")
    args = ap.parse_args()
    versions: dict[str, dict[str, str]] = {
        "after": {**os.environ, "MOESIM_TRACES": str(Path(args.traces).resolve())}}
    if args.before:
        versions = {"before": {**versions["after"], "PYTHONPATH": str(args.before.resolve())},
                    **versions}
    launchers = {"both": LAUNCHERS[:2], "all": LAUNCHERS}.get(args.launcher, [args.launcher])
    results: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []  # sweeps that compiled the kernels: not measurements
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, env in versions.items():
                for launcher in launchers:
                    if name == "before" and launcher != "packed_joblib":
                        continue  # Hydra's joblib is unchanged; packed_fork is new
                    label = f"{launcher} before" if name == "before" else launcher
                    for _attempt in range(3):  # once more after a sweep that compiled
                        rec = {"version": name, "launcher": label, "rep": rep,
                               **run_sweep(SWEEPS[args.sweep], Path(tmp) / "s", env,
                                           launcher_args(launcher))}
                        print(json.dumps(rec), flush=True)
                        (discarded if rec["kernels_compiled"] else results).append(rec)
                        if not rec["kernels_compiled"]:
                            break
    best = {f"{r['version']} {r['launcher']}": min(
        (q for q in results if q["launcher"] == r["launcher"]), key=lambda q: q["cpu_s"])
        for r in results}
    record = {"sweep": args.sweep, "command": ["moesim-sim", "-m", *SWEEPS[args.sweep],
                                               *launcher_args(launchers[-1])],
              "cpus": os.cpu_count(), "commit": args.commit or _commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": results, "best_cpu": best, "discarded_compiling": discarded}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[args.sweep] = record
    args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
