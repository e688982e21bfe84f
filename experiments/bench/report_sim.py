"""Render ``bench_sim``'s JSON as the README's simulator benchmark tables.

    python -m moesim.experiments.bench.report_sim [--json FILE]     # print the markdown

The README's ``bench_sim`` block is rewritten from the committed JSON by
``python -m moesim.experiments.readme_blocks``, like every generated block (its test fails when the
README and the JSON disagree).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
JSON = ROOT / "experiments/bench/results/bench_sim.json"


def _m(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x / 1e6:.2f} M"


def _k(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x / 1e3:.0f} k"


def _x(x: float) -> str:
    """A speed ratio to libCacheSim's LRU replay (above 1: faster)."""
    if not math.isfinite(x) or x <= 0:
        return "–"
    return f"{x:.2g}" if x < 1 else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def _run_line(run: dict[str, Any]) -> str:
    where = run.get("processor") or run.get("machine", "")
    return (f"run {run['id']}: {run['date_utc']} UTC at {run['commit']}, {run['cpus']} CPUs "
            f"({where}), load average {run['load_avg_1m_before']:.1f} before / "
            f"{run['load_avg_1m_after']:.1f} after; libCacheSim LRU replay "
            f"{run['lcs_lru_cpu_s']:.3f} CPU-s for {run['accesses']:,} accesses "
            f"({_m(run['accesses'] / run['lcs_lru_cpu_s'])} accesses / CPU-s)")


def render(res: dict[str, Any]) -> str:
    """The markdown block (tables and conditions) for one benchmark result."""
    from moesim.experiments.bench.bench_sim import runs_of

    tr, cfg = res["trace"], res["config"]
    runs = {r["id"]: r for r in runs_of(res)}
    run0 = runs[0]
    tl, sub_tl = tr["token_layers"], tr["subset_token_layers"]

    def vs(rate: float, run: int = 0) -> str:
        """``rate`` (token-layers / CPU-s) over libCacheSim's on the same trace, same run."""
        return _x(rate / (tl / runs[run]["lcs_lru_cpu_s"]))

    mine: dict[int, list[str]] = {}  # the rows each later run measured (and still holds)
    for r in res["engines"]:
        if r.get("run", 0) and r["policy"] not in mine.setdefault(r["run"], []):
            mine[r["run"]].append(r["policy"])
    later = len(mine) > 0
    out = [
        f"DeepSeek-V2-Lite training trace ({tr['requests']} requests, {tr['tokens']:,} tokens, "
        f"{tl:,} token-layers; loading it: {tr['load_cpu_s']:.1f} CPU-s), {cfg['mode']}, "
        f"{cfg['hw']}, {cfg['cache_fraction']:.0%} cache ({cfg['capacity']} experts), "
        f"CPU time (best of {cfg['reps']}, compiled and SimPy runs interleaved; CPU time is less "
        "sensitive to other load than wall time, not immune).",
        "",
        "Every speed is also given as a ratio to libCacheSim's LRU replay (C, `process_trace` "
        "only) of the same trace's access stream measured in the same run (**vs LCS**: the "
        "figure's token-layers per CPU-s over libCacheSim's; above 1 is faster), so that it can "
        "be compared across machines. Runs:",
        "",
        *[f"- {_run_line(r)}" + (f"; its rows: {', '.join(mine[r['id']])}" if r["id"] else "")
          for r in runs.values() if r["id"] == 0 or mine.get(r["id"])],
        "",
        "| policy | batch | engine | whole trace: CPU-s | token-layers / CPU-s | vs LCS | "
        f"first {tr['subset_requests']} requests: compiled / SimPy per CPU-s | vs LCS | "
        "speed-up | same metrics |" + (" run |" if later else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if later else ""),
    ]
    for r in res["engines"]:
        run = r.get("run", 0)
        tail = f" {run} |" if later else ""
        if r.get("error"):
            out.append(f"| {r['policy']} | {r['batch']} | – | {r['error']} | | | | | | |" + tail)
            continue
        whole = r["whole_cpu_s"]
        rate = tl / whole if math.isfinite(whole) else math.nan
        fast, slow = sub_tl / r["sub_compiled_cpu_s"], sub_tl / r["sub_simpy_cpu_s"]
        engine = r.get("whole_engine", r["sub_engine"])
        whole_s = f"{whole:.2f}"
        if not math.isfinite(whole):  # SimPy only: the whole trace scaled from the subset
            engine, rate = "python", slow
            whole_s = f"~{tl / slow:.0f} (scaled from the first {tr['subset_requests']} requests)"
        out.append(
            f"| {r['policy']} | {r['batch']} | {engine} | {whole_s} | {_m(rate)} | "
            f"{vs(rate, run)} | {_m(fast)} / {_k(slow)} | {vs(fast, run)} / {vs(slow, run)} | "
            f"{fast / slow:.0f}x | {'yes' if r.get('sub_same_metrics') else 'NO'} |" + tail
        )
    cmds = {(c["policy"], c["batch"]): c for c in res["commands"]}
    lcs0 = run0["lcs_lru_cpu_s"]
    out += ["", "Whole `moesim-sim trace=deepseek_v2_lite policy=P batch=B cache.fraction=0.1 "
            "hw=v100_pcie` command (start-up, trace load, run, parquet writes; one child "
            "process each; run 0; vs LCS: libCacheSim's replay CPU-s over the command's):", "",
            "| policy | batch 1: CPU-s | vs LCS | batch 1: peak RSS | batch 8: CPU-s | vs LCS | "
            "batch 8: peak RSS |",
            "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(c["policy"] for c in res["commands"]):
        a, b = cmds[(name, 1)], cmds[(name, 8)]
        out.append(f"| {name} | {a['command_cpu_s']:.2f} | {_x(lcs0 / a['command_cpu_s'])} | "
                   f"{a['command_peak_rss_mb']:.0f} MB | {b['command_cpu_s']:.2f} | "
                   f"{_x(lcs0 / b['command_cpu_s'])} | {b['command_peak_rss_mb']:.0f} MB |")
    out += ["", "Zero-latency, unpinned (`mode=zero_latency cache.pin_layer=false`), batch 1, "
            "the same access stream in libCacheSim's C replay (oracleGeneral file; only "
            "`process_trace` timed) and in moesim (the whole `simulate` call, workload "
            "building included); run 0:", "",
            "| policy | accesses | moesim: accesses / CPU-s | libCacheSim | ratio (vs LCS) | "
            "hit rate moesim / libCacheSim |", "|---|---|---|---|---|---|"]
    for z in res["zero_latency"]:
        a = z["accesses"]
        out.append(
            f"| {z['policy']} | {a:,} | {_m(a / z['moesim_cpu_s'])} | "
            f"{_m(a / z['libcachesim_cpu_s'])} | "
            f"{z['libcachesim_cpu_s'] / z['moesim_cpu_s']:.2f} | "
            f"{z['moesim_hit_rate']:.4f} / {z['libcachesim_hit_rate']:.4f} |")
    out.append("")
    out.append(f"Peak RSS of the benchmark process (every run of run 0 in one process): "
               f"{res['in_process_peak_rss_mb']:.0f} MB.")
    if "sweep" in res:
        sw = res["sweep"]
        out.append(f"The 16-run capacity sweep (`-m policy=lru,lfu,least_stale,belady "
                   f"cache.fraction=0.05,0.1,0.25,0.5`, joblib, {sw['workers']} workers; run 0): "
                   f"{sw['wall_s']:.0f} s wall (vs LCS: {_x(sw['runs'] * lcs0 / sw['wall_s'])}, "
                   "its 16 replays of the stream per wall second over libCacheSim's per CPU "
                   "second)"
                   + (f"; peak RSS {sw['main_peak_rss_mb']:.0f} MB (sweep process), "
                      f"{sw['worker_peak_rss_mb']:.0f} MB (largest worker)."
                      if "worker_peak_rss_mb" in sw else "."))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(JSON))
    args = ap.parse_args()
    print(render(json.loads(Path(args.json).read_text())))


if __name__ == "__main__":
    main()
