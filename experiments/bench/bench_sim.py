"""Benchmark: simulator speed and memory on MoE-Beyond's DeepSeek-V2-Lite training trace.

CPU time (``time.process_time``; children by ``os.wait4``), compiled and SimPy runs interleaved,
the best of ``--reps``. Writes one JSON file; ``python -m moesim.experiments.bench.report_sim``
renders it, and ``python -m moesim.experiments.readme_blocks`` rewrites the README's Benchmarks
tables from it.

- every shipped policy, timed, v100_pcie, 10 % cache, batch 1 and 8: the compiled engine on
  the whole trace, and both engines on the first ``--simpy-requests`` requests (same runs, so
  the ratio compares like with like; their summaries must agree);
- the whole ``moesim-sim`` command per policy (CPU seconds and peak RSS of the child);
- zero-latency LRU and Belady (unpinned) beside libCacheSim on the same access stream;
- optionally (``--sweep``) the 16-run capacity sweep on 2 joblib workers (wall seconds).

Every figure is also rendered as a ratio to libCacheSim's LRU replay of the same access stream
measured in the same run, so that readers on other machines can compare. ``--only`` re-measures
a few policies (beside that replay) and merges them into the existing file as a new run.

    python -m moesim.experiments.bench.bench_sim [--traces DIR] [--out FILE] [--reps N] [--sweep]
    python -m moesim.experiments.bench.bench_sim --only "moe_infinity_priority,lru"
    python -m moesim.experiments.bench.bench_sim --mi --reps 3 [--before DIR --before-label C]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moesim.experiments.inputs import trace_file
from moesim.hw_profiles import load_profile
from moesim.sim import (
    SimulationError,
    build_workload,
    capacity_slots,
    dense_layers_before,
    simulate,
)
from moesim.traces import load_trace
from moesim.traces.model_card import load_card

ROOT = Path(__file__).resolve().parents[2]
POLICIES: dict[str, dict[str, Any]] = {  # label -> policy config
    "lru": {"name": "lru"},
    "fifo": {"name": "fifo"},
    "lfu": {"name": "lfu"},
    "least_stale": {"name": "least_stale"},
    "static": {"name": "static"},
    "belady": {"name": "belady"},
    "moe_infinity_lfu": {"name": "moe_infinity_lfu"},
    "next_layer_all": {"name": "next_layer_all"},
    "oracle_prefetch": {"name": "oracle_prefetch"},
    "oracle_prefetch pre_attention +0": {"name": "oracle_prefetch", "point": "pre_attention",
                                         "lookahead": 0},
    "prediction_prefetch (perfect table)": {"name": "prediction_prefetch"},
    "moe_beyond_replay (perfect table)": {"name": "moe_beyond_replay"},
    "fate_arc (per-layer, 25 %)": {"name": "fate_arc"},
    "moe_infinity_priority": {"name": "moe_infinity_priority"},
    "moe_infinity": {"name": "moe_infinity"},
    "moe_infinity (priority eviction)": {"name": "moe_infinity",
                                         "eviction": "moe_infinity_priority"},
}
# EAMC matching costs O(stored EAMs x layers) per layer-step: the whole trace is timed once
ONE_REP_WHOLE = {"moe_infinity", "moe_infinity (priority eviction)"}


def _cpu(fn: Any) -> tuple[float, Any]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def _kwargs(trace: Any, cfg: dict[str, Any], batch: int, env: dict[str, Any]) -> dict[str, Any]:
    kw = dict(capacity=env["cap"], mode="timed", link=env["link"], compute=env["comp"],
              dense_before=env["dense"], batch=batch)
    if cfg["name"] in ("prediction_prefetch", "moe_beyond_replay"):
        kw["predictions"] = {r.request_id: r.experts for r in trace.requests}
    if cfg["name"] == "fate_arc":  # 10 % leaves a layer fewer slots than one step needs
        kw.update(partition="per_layer", capacity=env["cap_fate"])
    return kw


def _config_error(trace: Any, cfg: dict[str, Any], kw: dict[str, Any]) -> str | None:
    """The error a run on ``trace`` stops with (e.g. a cache too small for the widest step),
    or None."""
    try:
        simulate(trace, cfg, **kw)
    except SimulationError as err:
        return str(err).split(";")[0]
    return None


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for key in ("accesses", "hits", "late_hits", "promoted", "misses", "prefetch_transfers",
                "prefetch_useful", "prefetch_wasted", "evictions"):
        if a[key] != b[key]:
            return False
    return math.isclose(a["stall_time_s"], b["stall_time_s"], rel_tol=1e-9)


def engines(trace: Any, sub: Any, env: dict[str, Any], reps: int,
            policies: dict[str, dict[str, Any]] | None = None,
            anchor: Any = None) -> list[dict[str, Any]]:
    """Compiled on the whole trace; compiled and SimPy on the subset; interleaved (with
    ``anchor()``, libCacheSim's LRU replay, once per repetition when given)."""
    policies = POLICIES if policies is None else policies
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for cfg in policies.values():  # warm-up: compile / load every kernel once
        simulate(sub.subset(2), cfg, **_kwargs(sub, cfg, 1, env))
    for rep in range(reps):
        if anchor is not None:
            anchor()
        for batch in (1, 8):
            for label, cfg in policies.items():
                row = rows.setdefault((label, batch), {
                    "policy": label, "batch": batch, "whole_cpu_s": math.inf,
                    "sub_compiled_cpu_s": math.inf, "sub_simpy_cpu_s": math.inf})
                if rep == 0 and cfg["name"] == "fate_arc":
                    row["error"] = _config_error(trace, cfg, _kwargs(trace, cfg, batch, env))
                if row.get("error"):  # e.g. a per-layer cache too small for batch 8
                    continue
                if rep == 0 or label not in ONE_REP_WHOLE:
                    dt, res = _cpu(lambda c=cfg, b=batch: simulate(
                        trace, c, **_kwargs(trace, c, b, env)))
                    row["whole_cpu_s"] = min(row["whole_cpu_s"], dt)
                    row["whole_engine"] = res.summary["sim_engine"]
                    row["hit_rate"] = res.summary["hit_rate"]
                kw = _kwargs(sub, cfg, batch, env)
                dt, fast = _cpu(lambda c=cfg, k=kw: simulate(sub, c, **k))
                row["sub_compiled_cpu_s"] = min(row["sub_compiled_cpu_s"], dt)
                row["sub_engine"] = fast.summary["sim_engine"]
                if rep == 0 or row["sub_engine"] == "compiled":  # SimPy twice is the same run
                    dt, ref = _cpu(lambda c=cfg, k=kw: simulate(sub, c, engine="python", **k))
                    row["sub_simpy_cpu_s"] = min(row["sub_simpy_cpu_s"], dt)
                    row["sub_same_metrics"] = _same(ref.summary, fast.summary)
                print(json.dumps(row), flush=True)
    return list(rows.values())


# ``moesim-sim`` in a child that records its own peak RSS (VmHWM of its address space: a
# child's ru_maxrss on Linux also carries the parent's peak from before the exec).
_MEASURED = """
import atexit, re, runpy, sys
out = sys.argv.pop(1)
def hwm():
    text = open("/proc/self/status").read()
    open(out, "w").write(re.search(r"VmHWM:\\s+(\\d+)", text).group(1))
atexit.register(hwm)
runpy.run_module("moesim.experiments.sim_app", run_name="__main__", alter_sys=True)
"""


def whole_commands(traces: str, reps: int) -> list[dict[str, Any]]:
    """``moesim-sim`` end to end (start-up, trace load, run, parquet writes), per child."""
    out = []
    names = ["lru", "fifo", "lfu", "least_stale", "static", "belady", "moe_infinity_lfu",
             "moe_infinity_priority", "next_layer_all", "oracle_prefetch", "moe_infinity"]
    env = {**os.environ, "MOESIM_TRACES": str(Path(traces).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 8):
            for name in names:
                best = (math.inf, 0)
                for rep in range(reps):
                    hwm = Path(tmp) / f"hwm_{name}_{batch}_{rep}"
                    cmd = [sys.executable, "-c", _MEASURED, str(hwm), "trace=deepseek_v2_lite",
                           f"policy={name}", f"batch={batch}", "cache.fraction=0.1",
                           "hw=v100_pcie", f"hydra.run.dir={tmp}/{name}_{batch}_{rep}"]
                    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
                    _, status, usage = os.wait4(proc.pid, 0)
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    if status != 0:
                        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
                    cpu = usage.ru_utime + usage.ru_stime
                    best = min(best, (cpu, int(hwm.read_text())))
                row = {"policy": name, "batch": batch, "command_cpu_s": best[0],
                       "command_peak_rss_mb": best[1] / 1024}
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def _stream(trace: Any) -> np.ndarray:
    """The trace's access stream (every key of every layer-step, in order)."""
    keys = build_workload(trace).keys
    return keys[keys >= 0].astype(np.int64)


def _lcs(stream: np.ndarray, capacity: int, algo: str, tmp: Path) -> tuple[float, float]:
    """libCacheSim's C replay of ``stream`` (oracleGeneral, with next-access for Belady):
    CPU seconds of ``process_trace`` and the hit ratio."""
    import libcachesim as lcs

    from moesim.sim.compiled.heaps import next_occurrences
    from moesim.sim.compiled.layout import NO_USE

    n = len(stream)
    nxt, _ = next_occurrences(stream, int(stream.max()) + 1)
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("sz", "<u4"), ("nx", "<i8")])
    rec["t"] = np.arange(n) % (1 << 32)
    rec["id"] = stream + 1
    rec["sz"] = 1
    rec["nx"] = np.where(nxt == NO_USE, -1, nxt)
    path = tmp / "stream.oracleGeneral"
    rec.tofile(path)
    # libCacheSim's TraceReader implements its protocol in C++ (pyright sees it as abstract)
    reader = lcs.TraceReader(  # pyright: ignore[reportAbstractUsage]
        str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    cache = getattr(lcs, algo)(cache_size=capacity, hashpower=16)
    dt, (miss_ratio, _) = _cpu(lambda: cache.process_trace(reader))
    return dt, 1 - miss_ratio


def zero_latency(trace: Any, cap: int, reps: int) -> list[dict[str, Any]]:
    """Zero-latency LRU and unpinned Belady vs libCacheSim's on the same access stream."""
    stream = _stream(trace)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy, algo in (("lru", "LRU"), ("belady", "Belady")):
            _lcs(stream, cap, algo, Path(tmp))  # warm-up, as the anchors note advises
            simulate(trace.subset(2), policy, capacity=cap, mode="zero_latency", pin_layer=False)
            best_l, best_m = math.inf, math.inf
            for _ in range(reps):  # interleaved
                dt, hit_l = _lcs(stream, cap, algo, Path(tmp))
                best_l = min(best_l, dt)
                dt, res = _cpu(lambda p=policy: simulate(trace, p, capacity=cap,
                                                         mode="zero_latency", pin_layer=False))
                best_m = min(best_m, dt)
            row = {"policy": policy, "accesses": len(stream), "moesim_cpu_s": best_m,
                   "libcachesim_cpu_s": best_l, "moesim_hit_rate": res.summary["hit_rate"],
                   "libcachesim_hit_rate": hit_l}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` (from /proc: every process's parent)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid]
        out += kids
        todo += kids
    return out


def _hwm_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) if "VmHWM" in text else 0


def sweep(traces: str) -> dict[str, Any]:
    """The README's 16-run capacity sweep on 2 joblib workers: wall seconds, and the peak RSS
    (VmHWM) of the sweep process and of its largest worker, read every 0.2 s while they run."""
    env = {**os.environ, "MOESIM_TRACES": str(Path(traces).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "moesim.experiments.sim_app", "-m", "trace=deepseek_v2_lite",
               "policy=lru,lfu,least_stale,belady", "cache.fraction=0.05,0.1,0.25,0.5",
               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp}/s"]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        main_kb, worker_kb = 0, 0
        while proc.poll() is None:
            main_kb = max(main_kb, _hwm_kb(proc.pid))
            for pid in _descendants(proc.pid):
                worker_kb = max(worker_kb, _hwm_kb(pid))
            time.sleep(0.2)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed")
        return {"runs": 16, "workers": 2, "wall_s": time.perf_counter() - t,
                "main_peak_rss_mb": main_kb / 1024, "worker_peak_rss_mb": worker_kb / 1024}


def _conditions(load0: tuple[float, float, float]) -> dict[str, Any]:
    """Where and when a run was measured (machine, load, versions)."""
    import numba

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": commit,
        "cpus": os.cpu_count(), "load_avg_1m_before": load0[0],
        "load_avg_1m_after": os.getloadavg()[0], "python": platform.python_version(),
        "numba": numba.__version__, "machine": platform.machine(),
        "processor": _processor(),
    }


def _processor() -> str:
    """The CPU model (Linux: /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def runs_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurement runs a result holds; each with its libCacheSim LRU replay (CPU-s of
    the trace's whole access stream), the anchor of every ratio. A result written before runs
    were recorded is one run: its conditions and its zero-latency LRU row."""
    if "runs" in res:
        return res["runs"]
    lru = next(z for z in res["zero_latency"] if z["policy"] == "lru")
    return [{"id": 0, **res["conditions"], "lcs_lru_cpu_s": lru["libcachesim_cpu_s"],
             "accesses": lru["accesses"]}]


def partial(args: argparse.Namespace, trace: Any, sub: Any, env: dict[str, Any],
            load0: tuple[float, float, float]) -> None:
    """Measure only ``--only``'s policies (both batches, whole trace and subset) beside
    libCacheSim's LRU replay of the same stream, and put them into the existing result as a
    new run: the rows they replace name it, so every ratio divides figures of one run."""
    out = Path(args.out)
    res = json.loads(out.read_text())
    labels = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in labels if x not in POLICIES]
    if unknown:
        raise SystemExit(f"error: --only: unknown policy label(s) {unknown}; known: "
                         f"{list(POLICIES)}")
    stream = _stream(trace)
    best = [math.inf]
    with tempfile.TemporaryDirectory() as tmp:
        _lcs(stream, env["cap"], "LRU", Path(tmp))  # warm-up

        def anchor() -> None:
            best[0] = min(best[0], _lcs(stream, env["cap"], "LRU", Path(tmp))[0])

        rows = engines(trace, sub, env, args.reps, {x: POLICIES[x] for x in labels}, anchor)
    runs = runs_of(res)
    run = {"id": len(runs), **_conditions(load0), "lcs_lru_cpu_s": best[0],
           "accesses": len(stream), "reps": args.reps, "policies": labels}
    res["runs"] = [*runs, run]
    for r in rows:
        r["run"] = run["id"]
    new = {(r["policy"], r["batch"]): r for r in rows}
    res["engines"] = [new.pop((r["policy"], r["batch"]), r) for r in res["engines"]]
    res["engines"] += list(new.values())
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out} (run {run['id']}: {', '.join(labels)})")


# --mi: MoE-Infinity's policies beside the compiled LRU, batch 1, whole trace (issue target:
# >= 1 M token-layers per CPU-s, i.e. no slower than 2x the compiled LRU)
MI_POLICIES = ("lru", "moe_infinity_priority", "moe_infinity")


# --mi --before DIR: the same moe_infinity run by another version of the package (DIR holds
# a ``moesim`` folder laid out as installed, e.g. a copy of an older commit), in a child that
# keeps the trace loaded and times one run per line it reads, interleaved with the others
_BEFORE_CHILD = r"""
import json, sys, time
from moesim.experiments.inputs import trace_file
from moesim.hw_profiles import load_profile
from moesim.sim import dense_layers_before, simulate
from moesim.traces import load_trace
from moesim.traces.model_card import load_card
src, cap = sys.argv[1], int(sys.argv[2])
trace = load_trace(trace_file(src, "moe-beyond-csv"))
card, prof = load_card("deepseek_v2_lite"), load_profile("v100_pcie")
kw = dict(capacity=cap, mode="timed", link=prof.expert_link(), compute=prof.compute_model(card),
          dense_before=dense_layers_before(trace.meta.moe_layers, 27), batch=1)
simulate(trace.subset(2), "moe_infinity", **kw)
print("ready", flush=True)
for _ in sys.stdin:
    t = time.process_time()
    s = simulate(trace, "moe_infinity", **kw).summary
    print(json.dumps({"cpu_s": time.process_time() - t, "engine": s["sim_engine"],
                      "hit_rate": s["hit_rate"], "stall_time_s": s["stall_time_s"],
                      "prefetch_transfers": s["prefetch_transfers"]}), flush=True)
"""


def _before_child(before: str, src: str, cap: int) -> subprocess.Popen[str]:
    """The child timing ``moe_infinity`` with the package in ``before`` (its own numba cache
    folder, so that the two versions' kernels do not replace each other's)."""
    env = {**os.environ, "PYTHONPATH": str(Path(before).resolve()),
           "NUMBA_CACHE_DIR": str(Path(before).resolve() / ".numba_cache")}
    proc = subprocess.Popen([sys.executable, "-c", _BEFORE_CHILD, src, str(cap)], env=env,
                            cwd=tempfile.gettempdir(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"--before {before}: the child did not start")
    return proc


def moe_infinity_speed(trace: Any, env: dict[str, Any], reps: int, before: str = "",
                       before_label: str = "", src: str = "") -> dict[str, Any]:
    """CPU seconds of the compiled LRU and MoE-Infinity's policies on the whole trace at batch
    1 and of libCacheSim's LRU replay of the same access stream, interleaved, best of
    ``reps``; token-layers per CPU-s and the ratios to both LRUs (CPU time / LRU's). With
    ``before``, also ``moe_infinity`` by that version of the package (``_before_child``),
    whose metrics must equal this one's."""
    stream = _stream(trace)
    best = dict.fromkeys(("libcachesim lru", *MI_POLICIES), math.inf)
    rows: dict[str, dict[str, Any]] = {}
    loads = [os.getloadavg()[0]]
    child = _before_child(before, src, env["cap"]) if before else None
    old = f"moe_infinity (before: {before_label or before})"
    with tempfile.TemporaryDirectory() as tmp:
        _lcs(stream, env["cap"], "LRU", Path(tmp))  # warm-up
        for label in MI_POLICIES:  # load or compile the kernels once
            simulate(trace.subset(2), POLICIES[label], **_kwargs(trace, POLICIES[label], 1, env))
        for _ in range(reps):
            best["libcachesim lru"] = min(best["libcachesim lru"],
                                          _lcs(stream, env["cap"], "LRU", Path(tmp))[0])
            if child is not None:
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                got = json.loads(child.stdout.readline())
                best[old] = min(best.get(old, math.inf), got.pop("cpu_s"))
                rows[old] = {"policy": old, **got}
            for label in MI_POLICIES:
                cfg = POLICIES[label]
                dt, res = _cpu(lambda c=cfg: simulate(trace, c, **_kwargs(trace, c, 1, env)))
                best[label] = min(best[label], dt)
                s = res.summary
                rows[label] = {"policy": label, "engine": s["sim_engine"],
                               "hit_rate": s["hit_rate"], "stall_time_s": s["stall_time_s"],
                               "prefetch_transfers": s["prefetch_transfers"]}
            loads.append(os.getloadavg()[0])
    if child is not None:
        child.communicate("")
        keys = ("hit_rate", "stall_time_s", "prefetch_transfers")
        if any(rows[old][k] != rows["moe_infinity"][k] for k in keys):
            raise RuntimeError(f"--before: {old} and moe_infinity differ: {rows[old]} vs "
                               f"{rows['moe_infinity']}")
    out = []
    for label in (*MI_POLICIES, *([old] if child is not None else [])):
        cpu = best[label]
        out.append({**rows[label], "cpu_s": round(cpu, 3),
                    "m_token_layers_per_cpu_s": round(trace.num_rows / cpu / 1e6, 3),
                    "vs_compiled_lru": round(cpu / best["lru"], 2),
                    "vs_libcachesim_lru": round(cpu / best["libcachesim lru"], 2)})
    return {"token_layers": trace.num_rows, "accesses": len(stream), "batch": 1,
            "reps": reps, "libcachesim_lru_cpu_s": round(best["libcachesim lru"], 3),
            "load_avg_1m": loads, "rows": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--out", default=str(ROOT / "experiments/bench/results/bench_sim.json"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--simpy-requests", type=int, default=40)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--mi", action="store_true", help="only MoE-Infinity's policies beside "
                    "the compiled and libCacheSim LRU (batch 1, whole trace) into "
                    "experiments/bench/results/bench_mi.json")
    ap.add_argument("--before", default="", help="with --mi: also time moe_infinity by the "
                    "package in this folder (holding a `moesim` folder laid out as installed, "
                    "e.g. a copy of an older commit), interleaved; its metrics must be the same")
    ap.add_argument("--before-label", default="", help="what --before is (e.g. its commit)")
    ap.add_argument("--only", default="", help="comma-separated policy labels: measure just "
                    "these (and libCacheSim's LRU) and merge them into --out as a new run")
    args = ap.parse_args()
    load0 = os.getloadavg()
    src = Path(args.traces) / "deepseek_v2_lite_moe-beyond" / "training_data_eamc"
    load_cpu, trace = _cpu(lambda: load_trace(trace_file(str(src), "moe-beyond-csv")))
    card = load_card("deepseek_v2_lite")
    prof = load_profile("v100_pcie")
    env = {"cap": capacity_slots(1664, card.expert_bytes, fraction=0.1),
           "cap_fate": capacity_slots(1664, card.expert_bytes, fraction=0.25),
           "link": prof.expert_link(), "comp": prof.compute_model(card),
           "dense": dense_layers_before(trace.meta.moe_layers, 27)}
    sub = trace.subset(args.simpy_requests)
    if args.mi:
        res = {**moe_infinity_speed(trace, env, args.reps, args.before, args.before_label,
                                    str(src)), "conditions": _conditions(load0)}
        out = Path(args.out).with_name("bench_mi.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["rows"], indent=1))
        print(f"wrote {out}")
        return
    if args.only:
        partial(args, trace, sub, env, load0)
        return
    result: dict[str, Any] = {
        "trace": {"requests": len(trace), "tokens": trace.num_tokens,
                  "token_layers": trace.num_rows, "load_cpu_s": load_cpu,
                  "subset_requests": len(sub), "subset_token_layers": sub.num_rows},
        "config": {"hw": "v100_pcie", "cache_fraction": 0.1, "capacity": env["cap"],
                   "mode": "timed", "reps": args.reps},
    }
    result["engines"] = engines(trace, sub, env, args.reps)
    result["zero_latency"] = zero_latency(trace, env["cap"], args.reps)
    result["in_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["commands"] = whole_commands(args.traces, max(1, args.reps - 1))
    if args.sweep:
        result["sweep"] = sweep(args.traces)
    result["conditions"] = _conditions(load0)
    result["runs"] = runs_of({k: v for k, v in result.items() if k != "runs"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
