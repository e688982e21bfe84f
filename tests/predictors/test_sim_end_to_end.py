"""A table written by predictors/ replays in the simulator (prediction_prefetch)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.sim_app import run as sim_run
from moesim.predictors.pipeline import RunConfig, run
from moesim.traces.collect.embedded import ensure_embedded_trace


def _sim(trace, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "trace=file", f"trace.path={trace}", "cache.fraction=0.25", "progress=false",
            "mode=zero_latency", *overrides,
        ])
    return sim_run(cfg)[0].summary


def test_recency_table_replays(tmp_path):
    trace = ensure_embedded_trace(limit=8)
    table = tmp_path / "recency.parquet"
    run(RunConfig(trace, method="recency", predictions=table, progress=False), log=lambda _: None)
    pred = _sim(trace, ["policy=prediction_prefetch", "policy.point=pre_attention",
                        "policy.ahead=0", f"predictions.path={table}"])
    # the same held-out requests: the oracle run names the table too (requests=auto)
    oracle = _sim(trace, ["policy=oracle_prefetch", "policy.point=pre_attention",
                          "policy.lookahead=0", f"predictions.path={table}"])
    assert pred["accesses"] == oracle["accesses"] > 0
    every = _sim(trace, ["policy=lru", f"predictions.path={table}", "requests=all"])
    assert every["accesses"] > pred["accesses"]  # the training requests are left out
    parts = ("hits", "late_hits", "promoted", "misses")
    assert sum(pred[k] for k in parts) == pred["accesses"]
    assert oracle["hit_rate"] == pytest.approx(1.0)
    assert pred["hit_rate"] <= oracle["hit_rate"]
