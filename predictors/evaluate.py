"""Score any prediction table against the routing it predicts.

    python -m moesim.predictors.evaluate TRACE TABLE [--out metrics.parquet]

Works for tables written by ``moesim-train``, by ``predictors.fate`` and by importers of
published predictions (MoE-Beyond's ``predicted_csvs``), so every method is scored by the same
code (:mod:`predictors.metrics`). Rows without a prediction are left out and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.predictors.metrics import MetricSpec, evaluate, format_table
from moesim.traces import TraceError, load_predictions, load_trace
from moesim.traces.predictions import content_digest, read_predictions_meta


def score(trace_path: Path, table_path: Path) -> tuple[list[dict], int, dict]:
    """Metric rows over every (token, layer) that has both a prediction and true routing."""
    trace = load_trace(trace_path)
    meta = read_predictions_meta(table_path)
    # Checked against this trace (identity, layers, ids in range, width, dtypes): scoring a
    # table made for another trace would give a meaningless number.
    preds = load_predictions(table_path, trace.meta.moe_layers, trace_meta=trace.meta,
                             trace_path=trace_path, trace_digest=content_digest(trace_path))
    ranked, true, layer = [], [], []
    missing = 0
    num_l, k = trace.meta.num_moe_layers, trace.meta.top_k
    for req in trace.requests:
        pred = preds.get(req.request_id)
        if pred is None:
            missing += req.num_tokens * num_l
            continue
        n = min(pred.shape[0], req.num_tokens)
        p = pred[:n].reshape(-1, pred.shape[2])
        t = req.experts[:n].reshape(-1, k)
        ok = (p[:, 0] >= 0) & (t[:, 0] >= 0)
        missing += int((~ok).sum()) + (req.num_tokens - n) * num_l
        ranked.append(p[ok])
        true.append(t[ok])
        layer.append(np.tile(np.arange(num_l), n)[ok])
    if not ranked:
        raise TraceError("no (token, layer) row has both a prediction and routing", file=table_path)
    width = max(r.shape[1] for r in ranked)
    if width < k:
        ranked = [np.pad(r, ((0, 0), (0, k - r.shape[1])), constant_values=-1) for r in ranked]
    spec = MetricSpec(trace.meta.num_experts, k)
    rows = evaluate(np.concatenate(ranked), np.concatenate(true), np.concatenate(layer), spec,
                    layer_ids=trace.meta.moe_layers)
    return rows, missing, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moesim.predictors.evaluate", description=__doc__)
    ap.add_argument("trace", type=Path)
    ap.add_argument("table", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write the metric rows as parquet")
    args = ap.parse_args(argv)
    try:
        rows, missing, meta = score(args.trace, args.table)
    except (TraceError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"table: {args.table} (available_at {meta.get('available_at')}); "
          f"rows without a prediction: {missing:,}")
    print(format_table(rows))
    if args.out is not None:
        pd.DataFrame(rows).to_parquet(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
