"""Benchmark: import the whole DeepSeek-V2-Lite training set (999 CSVs, 2,448,290 rows), then
load it the way the simulator does. Prints wall times and peak RSS (targets: import < 60 s and
< 2 GB; load a few seconds).

    python experiments/bench/bench_traces.py [--src DIR] [--out FILE] [--workers N]

SRC defaults to $MOESIM_SHARED_TRACES or ../shared/traces next to the repository.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # allow running as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from moesim.traces import import_trace, load_trace  # noqa: E402


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_src() -> Path:
    shared = os.environ.get("MOESIM_SHARED_TRACES") or ROOT.parent / "shared" / "traces"
    return Path(shared) / "deepseek_v2_lite_moe-beyond" / "training_data_eamc"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=default_src())
    p.add_argument("--out", type=Path, default=None, help="keep the trace here")
    p.add_argument("--workers", type=int, default=None, help="CSV parser threads")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        print(f"error: {args.src} not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "deepseek_train.parquet"
        t0 = time.perf_counter()
        res = import_trace("moe-beyond-csv", args.src, out, workers=args.workers)
        t_import = time.perf_counter() - t0
        rss_import = _peak_rss_mb()
        t0 = time.perf_counter()
        trace = load_trace(out)
        t_load = time.perf_counter() - t0
        rss_load = _peak_rss_mb()
        size = out.stat().st_size
    print(f"source          {args.src}")
    print(f"imported        {res.requests:,} requests, {res.tokens:,} tokens, {res.rows:,} rows")
    print(f"import wall     {t_import:.2f} s")
    print(f"peak RSS        {rss_import:.0f} MB after import")
    print(f"parquet size    {size / 1e6:.1f} MB")
    print(f"load_trace wall {t_load:.2f} s ({len(trace):,} requests, {trace.num_rows:,} rows)")
    print(f"peak RSS        {rss_load:.0f} MB after load_trace")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
