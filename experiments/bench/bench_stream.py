"""Benchmark: streamed replay (``sim.stream``) of traces larger than memory.

The N-x DeepSeek training trace is N renumbered copies of MoE-Beyond's DeepSeek-V2-Lite
training trace (999 requests, 2.45 M token-layers each), written once by the project's
streaming trace writer (``traces.store.write_trace`` from a generator: never in memory) under
``--scratch`` (never committed). Each run is a child process: CPU seconds (user + system, by
``os.wait4``) and peak RSS (the child's own VmHWM, read at its exit) of the whole command:
imports, reading the Parquet file, building each chunk, the replay. Timed, v100_pcie, 10 %
cache, batch 1 (``--batch``), LRU and Belady, as ``bench_sim``. At 1x the in-memory path runs
too, and every summary value of the streamed run must equal it.

The anchor of every ratio is libCacheSim's LRU replay of the same access stream (the N-x
stream is the 1x stream N times), measured in this run as ``bench_sim`` measures it.

    python -m moesim.experiments.bench.bench_stream [--scales 1,8,64] [--lcs-scales 1,8]
    python -m moesim.experiments.bench.bench_stream --report   # the table from the JSON
    python -m moesim.experiments.bench.bench_stream --batch 8 --scales 1,8 --lcs-scales 1
        # batches of 8: results/bench_stream_b8.json (the batch-1 file is the docs' figures)
    python -m moesim.experiments.bench.bench_stream --policies oracle_prefetch --scales 1,8 \
        --lcs-scales 1,8 --out experiments/bench/results/bench_stream_oracle.json
        # the oracle prefetcher, streamed with its look-ahead window
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moesim.experiments.bench.bench_sim import _conditions, _cpu, _stream

ROOT = Path(__file__).resolve().parents[2]
JSON = ROOT / "experiments/bench/results/bench_stream.json"
# the oracle prefetcher's rows (--policies oracle_prefetch --out <this>): its own file, measured
# in its own run beside its own libCacheSim anchor
ORACLE_JSON = JSON.with_name("bench_stream_oracle.json")

# One run in a child: argv = out.json trace.parquet policy chunk (0: in memory) batch. It writes the
# summary and its own peak RSS (VmHWM: a child's ru_maxrss on Linux may carry the parent's).
_CHILD = """
import json, math, re, sys
out, path, policy, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
batch = int(sys.argv[5])
from dataclasses import replace
from moesim.hw_profiles import load_profile
from moesim.sim import capacity_slots, dense_layers_before, simulate
from moesim.sim.stream import simulate_stream
from moesim.traces import load_trace, read_meta
from moesim.traces.model_card import load_card
card = load_card("deepseek_v2_lite")
prof = load_profile("v100_pcie")
meta = replace(read_meta(path), expert_bytes=card.expert_bytes)
kw = dict(capacity=capacity_slots(meta.num_moe_layers * meta.num_experts, card.expert_bytes,
                                  fraction=0.1),
          mode="timed", link=prof.expert_link(), compute=prof.compute_model(card),
          dense_before=dense_layers_before(meta.moe_layers, card.num_layers), batch=batch)
if chunk:
    res = simulate_stream(path, policy, chunk_requests=chunk, meta=meta, **kw)
else:
    from moesim.traces.trace import Trace
    trace = load_trace(path)
    res = simulate(Trace(meta, trace.requests), policy, **kw)
summary = {k: (None if isinstance(v, float) and math.isnan(v) else v)
           for k, v in res.summary.items()}
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
json.dump({"summary": summary, "peak_rss_kb": hwm}, open(out, "w"))
"""


def build_scaled(src: Path, scale: int, out: Path) -> float:
    """Write the ``scale``-x trace (``scale`` copies of ``src``, request ids renumbered past
    the previous copy's) with the streaming writer; CPU seconds."""
    from moesim.traces import read_meta, write_trace
    from moesim.traces.store import iter_requests
    from moesim.traces.trace import RequestRouting

    meta = read_meta(src)

    def copies() -> Iterator[RequestRouting]:
        stride = 0
        for c in range(scale):
            top = 0
            for req in iter_requests(src):
                rid = stride + int(req.request_id)
                top = max(top, rid)
                yield RequestRouting(rid, req.experts, req.phase, req.scores, req.tokens,
                                     req.label)
            stride = top + 1
            print(f"  copy {c + 1}/{scale}", file=sys.stderr, flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    dt, _ = _cpu(lambda: write_trace(out, meta, copies()))
    return dt


def measure(path: Path, policy: str, chunk: int, tmp: Path, batch: int = 1) -> dict[str, Any]:
    """One child run: CPU seconds, peak RSS, its summary."""
    out = tmp / "child.json"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(path), policy,
                             str(chunk), str(batch)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"{policy} chunk={chunk} on {path} failed: {err[-2000:]}")
    data = json.loads(out.read_text())
    return {"cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": data["peak_rss_kb"] / 1024, "summary": data["summary"]}


def lcs_lru(stream: np.ndarray, copies: int, capacity: int, tmp: Path) -> float:
    """libCacheSim's LRU replay (oracleGeneral, as ``bench_sim._lcs``) of ``stream`` repeated
    ``copies`` times, written to disk a copy at a time; CPU seconds of ``process_trace``."""
    import libcachesim as lcs

    n = len(stream)
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("sz", "<u4"), ("nx", "<i8")])
    rec["id"] = stream + 1
    rec["sz"] = 1
    rec["nx"] = -1  # next access: read by Belady only
    path = tmp / "stream.oracleGeneral"
    with path.open("wb") as f:
        for c in range(copies):
            rec["t"] = (np.arange(n) + c * n) % (1 << 32)
            rec.tofile(f)
    try:
        reader = lcs.TraceReader(  # pyright: ignore[reportAbstractUsage]
            str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
        cache = lcs.LRU(cache_size=capacity, hashpower=16)
        dt, _ = _cpu(lambda: cache.process_trace(reader))
    finally:
        path.unlink(missing_ok=True)
    return dt


def add_lcs(args: argparse.Namespace) -> None:
    """libCacheSim's LRU replay at more scales, added to an existing result (a 64x stream is a
    22 GB file: measured in its own invocation, its rows dated and marked as such)."""
    import time

    from moesim.experiments.inputs import trace_file
    from moesim.traces import load_trace

    res = json.loads(Path(args.out).read_text())
    src = trace_file(str(Path(args.traces) / "deepseek_v2_lite_moe-beyond" /
                         "training_data_eamc"), "moe-beyond-csv")
    stream = _stream(load_trace(src))
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmpdir:
        for scale in [int(x) for x in args.lcs_scales.split(",") if x]:
            best = min(lcs_lru(stream, scale, res["config"]["capacity"], Path(tmpdir))
                       for _ in range(args.lcs_reps))
            row = {"scale": scale, "accesses": len(stream) * scale, "cpu_s": best,
                   "separate_run_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                   "load_avg_1m_before": load}
            print(json.dumps(row), flush=True)
            res["libcachesim_lru"] = [r for r in res["libcachesim_lru"]
                                      if r["scale"] != scale] + [row]
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(render(res))


def _same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Summary keys whose values differ (None stands for NaN)."""
    return [k for k in a if k != "sim_engine" and a[k] != b.get(k)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--scratch", default="/tmp/moesim-stream")
    ap.add_argument("--scales", default="1,8,64")
    ap.add_argument("--lcs-scales", default="1,8")
    ap.add_argument("--policies", default="lru,belady")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lcs-reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: results/bench_stream.json at batch "
                    "1, results/bench_stream_b<batch>.json otherwise")
    ap.add_argument("--report", action="store_true", help="print the table of --out")
    ap.add_argument("--lcs-only", action="store_true", help="measure libCacheSim's LRU at "
                    "--lcs-scales only and add those rows to --out (with their own date)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(JSON if args.batch == 1 else
                       JSON.with_name(f"bench_stream_b{args.batch}.json"))
    if args.report:
        print(render(json.loads(Path(args.out).read_text())))
        return
    if args.lcs_only:
        add_lcs(args)
        return
    from moesim.experiments.inputs import trace_file
    from moesim.sim import capacity_slots
    from moesim.traces import load_trace
    from moesim.traces.model_card import load_card

    load0 = os.getloadavg()
    src = trace_file(str(Path(args.traces) / "deepseek_v2_lite_moe-beyond" /
                         "training_data_eamc"), "moe-beyond-csv")
    scratch = Path(args.scratch)
    scales = [int(x) for x in args.scales.split(",")]
    policies = args.policies.split(",")
    trace1 = load_trace(src)
    stream = _stream(trace1)
    token_layers = trace1.num_rows
    del trace1
    cap = capacity_slots(1664, load_card("deepseek_v2_lite").expert_bytes, fraction=0.1)
    result: dict[str, Any] = {
        "trace": {"source": "deepseek_v2_lite_moe-beyond/training_data_eamc",
                  "token_layers_1x": token_layers, "accesses_1x": len(stream)},
        "config": {"hw": "v100_pcie", "cache_fraction": 0.1, "capacity": cap, "mode": "timed",
                   "batch": args.batch, "chunk_requests": args.chunk},
        "builds": [], "runs": [], "libcachesim_lru": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for scale in [int(x) for x in args.lcs_scales.split(",") if x]:
            best = min(lcs_lru(stream, scale, cap, tmp) for _ in range(args.lcs_reps))
            row = {"scale": scale, "accesses": len(stream) * scale, "cpu_s": best}
            print(json.dumps(row), flush=True)
            result["libcachesim_lru"].append(row)
        for scale in scales:
            path = src if scale == 1 else scratch / f"deepseek_train_x{scale}.parquet"
            if not path.exists():
                dt = build_scaled(src, scale, path)
                result["builds"].append({"scale": scale, "cpu_s": dt,
                                         "file_mb": path.stat().st_size / 2**20})
            for policy in policies:
                for chunk in ([args.chunk, 0] if scale == 1 else [args.chunk]):
                    m = measure(path, policy, chunk, tmp, args.batch)
                    row = {"scale": scale, "policy": policy,
                           "path": "streamed" if chunk else "in_memory",
                           "token_layers": token_layers * scale, "cpu_s": m["cpu_s"],
                           "peak_rss_mb": m["peak_rss_mb"],
                           "hit_rate": m["summary"]["hit_rate"],
                           "accesses": m["summary"]["accesses"]}
                    row["summary"] = m["summary"] if scale == 1 else None
                    print(json.dumps({k: v for k, v in row.items() if k != "summary"}),
                          flush=True)
                    result["runs"].append(row)
    for policy in policies:  # the streamed 1x run equals the in-memory one, every value
        one = [r for r in result["runs"] if r["scale"] == 1 and r["policy"] == policy]
        if len(one) == 2:
            result.setdefault("equal_1x", {})[policy] = _same(one[0]["summary"],
                                                              one[1]["summary"]) or True
    for r in result["runs"]:
        r.pop("summary", None)
    result["conditions"] = _conditions(load0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    print(f"wrote {args.out}")


def render(res: dict[str, Any]) -> str:
    """Markdown: per scale and policy, CPU-s, peak RSS, CPU-s per M token-layers and the ratio
    to libCacheSim's LRU replay of the same stream (where measured at that scale)."""
    lcs = {r["scale"]: r["cpu_s"] for r in res["libcachesim_lru"]}
    lines = ["| scale | token-layers | policy | path | CPU s | peak RSS MB | CPU s / M token-"
             "layers | x libCacheSim LRU |", "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ratio = r["cpu_s"] / lcs[r["scale"]] if r["scale"] in lcs else math.nan
        lines.append(
            f"| {r['scale']}x | {r['token_layers'] / 1e6:.1f} M | {r['policy']} | {r['path']} "
            f"| {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['cpu_s'] / (r['token_layers'] / 1e6):.2f} | "
            + ("-" if math.isnan(ratio) else f"{ratio:.1f}") + " |")
    c = res["conditions"]
    later = [f"{r['scale']}x measured separately at {r['separate_run_utc']} UTC"
             for r in res["libcachesim_lru"] if "separate_run_utc" in r]
    lines += ["", "libCacheSim LRU replay of the same stream: " + ", ".join(
        f"{s}x {t:.1f} CPU-s" for s, t in sorted(lcs.items()))
        + (f" ({'; '.join(later)})" if later else "") + f". Measured {c['date_utc']} "
        f"UTC at {c['commit']} on {c['cpus']} CPUs ({c.get('processor', '?')}), load "
        f"{c['load_avg_1m_before']:.1f} -> {c['load_avg_1m_after']:.1f}; chunks of "
        f"{res['config']['chunk_requests']} requests."]
    eq = res.get("equal_1x") or {}
    if eq:
        lines.append("Streamed = in-memory at 1x (every summary value): " + ", ".join(
            f"{p}: {'yes' if v is True else 'NO ' + str(v)}" for p, v in eq.items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
