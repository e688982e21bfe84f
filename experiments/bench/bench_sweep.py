"""What a sweep costs beyond simulating: whole ``moesim-sim -m`` sweeps on 2 joblib workers.

    python -m moesim.experiments.bench.bench_sweep [--sweep capacity|zl200] [--reps 3]
        [--launcher joblib|packed_joblib] [--before DIR] [--traces DIR] [--out FILE]

``capacity`` is the 16-run DeepSeek-V2-Lite capacity sweep of the benchmarks page (timed,
``trace=deepseek_v2_lite``, needs ``../shared/traces``); ``zl200`` is 200 zero-latency runs on
the embedded trace (5 policies x 10 capacities x 4 seeds). Each sweep runs in a fresh folder;
its CPU time is the sweep process's and every worker's it waited for (``os.wait4``), and the
simulation's share is the sum of its runs' ``run.sim_cpu_s`` over that. ``--before DIR`` runs
the same sweep, interleaved, with another checkout's package first on ``PYTHONPATH`` (DIR holds
a ``moesim`` package folder), for before/after figures on one machine under one load.
``--launcher both`` runs the sweep with Hydra's joblib launcher and with ``packed_joblib``
(runs packed per joblib task), interleaved; each record names its launcher and the load.
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
           "runs_cpu_s": round(float(rows["run.cpu_s"].sum()), 2),
           "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}
    if "run.sim_cpu_s" in rows:
        sim = float(rows["run.sim_cpu_s"].sum())
        out.update(sim_cpu_s=round(sim, 2), sim_share=round(sim / cpu, 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="capacity")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--launcher", choices=["joblib", "packed_joblib", "both"],
                    default="joblib")
    ap.add_argument("--before", type=Path, help="a folder holding another checkout's moesim")
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--out", type=Path,
                    default=ROOT / "experiments/bench/results/bench_sweep.json")
    args = ap.parse_args()
    versions: dict[str, dict[str, str]] = {
        "after": {**os.environ, "MOESIM_TRACES": str(Path(args.traces).resolve())}}
    if args.before:
        versions = {"before": {**versions["after"], "PYTHONPATH": str(args.before.resolve())},
                    **versions}
    launchers = (["joblib", "packed_joblib"] if args.launcher == "both"
                 else [args.launcher])
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, env in versions.items():
                for launcher in launchers:
                    rec = {"version": name, "launcher": launcher, "rep": rep,
                           **run_sweep(SWEEPS[args.sweep], Path(tmp) / "s", env,
                                       launcher_args(launcher))}
                    print(json.dumps(rec), flush=True)
                    results.append(rec)
    best = {f"{name} {launcher}": min(
        (r for r in results if r["version"] == name and r["launcher"] == launcher),
        key=lambda r: r["cpu_s"]) for name in versions for launcher in launchers}
    record = {"sweep": args.sweep, "command": ["moesim-sim", "-m", *SWEEPS[args.sweep],
                                               *launcher_args(launchers[-1])],
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": results, "best_cpu": best}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[args.sweep] = record
    args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
