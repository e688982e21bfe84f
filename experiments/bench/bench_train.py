"""Benchmark: train every predictor from scratch on one trace with its default config (the
issue's budget: <= 10 minutes each on the CPU) and print the training time and test accuracy.

    python experiments/bench/bench_train.py [--trace PATH] [--predictors a,b,...] [--threads N]

TRACE defaults to the embedded trace. Models go to a temporary cache, so nothing cached is
reused and the real cache is untouched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # allow running as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from moesim.predictors.pipeline import run  # noqa: E402
from moesim.predictors.tables import run_config  # noqa: E402

DEFAULT = (
    "pre_attention,pre_attention_silu,speculation,moe_beyond,moe_beyond_causal,moe_beyond_text"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=None, help="default: the embedded trace")
    p.add_argument("--predictors", default=DEFAULT)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    trace = args.trace
    if trace is None:
        from moesim.traces.collect.embedded import ensure_embedded_trace

        trace = ensure_embedded_trace()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.predictors.split(","):
            t0 = time.perf_counter()
            out = run(run_config(name, trace, eval_parts=("test",), cache_dir=Path(tmp),
                                 progress=True, threads=args.threads), log=lambda _m: None)
            wall = time.perf_counter() - t0
            m = out.metrics.query("layer == 'all'").iloc[0]
            k = next(c for c in out.metrics.columns if c.startswith("recall@"))
            rows.append((name, out.train_seconds, wall, m["exact_match"], m[k]))
            print(f"{name:20s} train {out.train_seconds:7.1f} s  (wall {wall:7.1f} s)  "
                  f"exact {m['exact_match']:.3f}  {k} {m[k]:.3f}", flush=True)
    worst = max(r[1] for r in rows)
    print(f"slowest training: {worst:.1f} s ({worst / 60:.1f} min; budget 10 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
