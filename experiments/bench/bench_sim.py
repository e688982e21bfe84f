"""Benchmark: simulator speed on MoE-Beyond's DeepSeek-V2-Lite training trace.

Reports token-layers/s of timed runs (v100_pcie, 10 % cache) and zero-latency accesses/s beside
libCacheSim's C replay of the same request stream. Not a test: run it by hand and copy the
figures into the README.

    python -m experiments.bench.bench_sim [--traces DIR] [--max-requests N]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from experiments.inputs import trace_file
from hw_profiles import load_profile
from sim import build_workload, capacity_slots, dense_layers_before, simulate
from traces import load_trace
from traces.model_card import load_card


def _lcs_replay(stream: np.ndarray, capacity: int, tmp: Path) -> tuple[float, float]:
    import libcachesim as lcs

    n = len(stream)
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("sz", "<u4"), ("nx", "<i8")])
    rec["t"] = np.arange(n) % (1 << 32)
    rec["id"] = stream + 1
    rec["sz"] = 1
    rec["nx"] = -1
    path = tmp / "stream.oracleGeneral"
    rec.tofile(path)
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    cache = lcs.LRU(cache_size=capacity, hashpower=16)
    t = time.perf_counter()
    miss_ratio, _ = cache.process_trace(reader)
    return time.perf_counter() - t, 1 - miss_ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="../shared/traces")
    ap.add_argument("--max-requests", type=int, default=None)
    args = ap.parse_args()
    src = Path(args.traces) / "deepseek_v2_lite_moe-beyond" / "training_data_eamc"
    t = time.perf_counter()
    trace = load_trace(trace_file(str(src), "moe-beyond-csv"), max_requests=args.max_requests)
    print(f"load: {time.perf_counter() - t:.1f} s, {len(trace)} requests, "
          f"{trace.num_tokens:,} tokens, {trace.num_rows:,} token-layers")
    card = load_card("deepseek_v2_lite")
    cap = capacity_slots(1664, card.expert_bytes, fraction=0.1)
    prof = load_profile("v100_pcie")
    link, comp = prof.expert_link(), prof.compute_model(card)
    rows = trace.num_rows
    dense = dense_layers_before(trace.meta.moe_layers, 27)
    simulate(trace.subset(2, 4), "lru", capacity=cap, mode="timed", link=link, compute=comp)
    for policy, engine in (("lru", "auto"), ("lru", "python"), ("belady", "python"),
                           ("next_layer_all", "python")):
        t = time.perf_counter()
        r = simulate(trace, policy, capacity=cap, mode="timed", link=link, compute=comp,
                     dense_before=dense, engine=engine)
        dt = time.perf_counter() - t
        print(f"timed {policy:15s} {r.summary['sim_engine']:8s} {dt:6.2f} s  "
              f"{rows / dt / 1e3:7.0f} k token-layers/s  hit_rate {r.summary['hit_rate']:.4f}")
    keys = build_workload(trace).keys
    stream = keys[keys >= 0].astype(np.int64)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _lcs_replay(stream, cap, Path(tmp))  # warm-up, as the anchors note advises
        lt, hit = min(_lcs_replay(stream, cap, Path(tmp)) for _ in range(3))
    print(f"libcachesim LRU (C)          {lt:6.2f} s  {len(stream) / lt / 1e6:.1f} M accesses/s"
          f"  hit_rate {hit:.4f}")
    for engine in ("auto", "python"):
        best = float("inf")
        for _ in range(3 if engine == "auto" else 1):
            t = time.perf_counter()
            r = simulate(trace, "lru", capacity=cap, mode="zero_latency", pin_layer=False,
                         engine=engine)
            best = min(best, time.perf_counter() - t)
        acc = r.summary["accesses"]
        print(f"zero-latency lru {r.summary['sim_engine']:8s}  {best:6.2f} s  "
              f"{acc / best / 1e6:.1f} M accesses/s  hit_rate {r.summary['hit_rate']:.4f}  "
              f"ratio to libcachesim {lt / best:.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
