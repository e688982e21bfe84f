"""``predictions.path=predictor:<name>``: predictor configs, cached tables, held-out replay."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.sim_app import run
from moesim.predictors.data import PredictorError
from moesim.predictors.tables import (
    held_out_requests,
    parse_spec,
    predictor_config,
    predictor_names,
    table_for,
)
from moesim.traces.collect.embedded import ensure_embedded_trace
from moesim.traces.predictions import read_predictions_meta
from moesim.traces.store import load_trace

register_configs()


@pytest.fixture(scope="module")
def small_trace():
    return ensure_embedded_trace(limit=8)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_spec_parsing_and_names():
    assert parse_spec("predictor:fate") == "fate"
    assert parse_spec("/some/table.parquet") is None and parse_spec(None) is None
    with pytest.raises(PredictorError):
        parse_spec("predictor:")
    names = predictor_names()
    assert {"fate", "pre_attention", "moe_beyond", "moe_beyond_causal", "frequency"} <= set(names)


def test_config_defaults_chain_is_merged():
    silu = predictor_config("pre_attention_silu")
    assert silu.name == "pre_attention_silu" and silu.model.arch == "silu"
    assert silu.model.hidden == 2048  # from the base config
    causal = predictor_config("moe_beyond_causal")
    assert causal.model.context == "causal" and causal.model.layers == 4
    with pytest.raises(PredictorError, match="unknown predictor 'nope'"):
        predictor_config("nope")


def test_table_built_once_and_reused(small_trace, cache):
    logs: list[str] = []
    first = table_for(small_trace, "frequency", log=logs.append, progress=False)
    assert first.is_file() and first.parent == cache / "predictions"
    assert read_predictions_meta(first)["available_at"] == "static:any_layer"
    mtime = first.stat().st_mtime_ns
    assert table_for(small_trace, "frequency", log=logs.append) == first
    assert first.stat().st_mtime_ns == mtime
    assert sum("building" in m for m in logs) == 1
    fate = table_for(small_trace, "fate", log=logs.append)
    assert fate != first and read_predictions_meta(fate)["available_at"] == "routed:prev_layer"


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_sim_replays_only_held_out_requests(small_trace, cache):
    base = [f"trace.path={small_trace}", "trace.format=parquet", "mode=zero_latency",
            "progress=false", "predictions.path=predictor:recency",
            "policy=prediction_prefetch"]
    ids = [r.request_id for r in load_trace(small_trace).requests]
    test_ids = held_out_requests(ids)
    assert 0 < len(test_ids) < len(ids)
    _, row = run(_cfg(base))
    assert row["trace.requests"] == len(test_ids)
    _, row_lru = run(_cfg([*base[:-1], "policy=lru"]))  # baselines replay the same requests
    assert row_lru["trace.requests"] == len(test_ids)
    _, row_all = run(_cfg([*base, "requests=all"]))
    assert row_all["trace.requests"] == len(ids)


def test_unknown_predictor_is_a_user_error(small_trace, cache):
    cfg = _cfg([f"trace.path={small_trace}", "trace.format=parquet", "progress=false",
                "predictions.path=predictor:nope", "policy=prediction_prefetch"])
    with pytest.raises(PredictorError, match="unknown predictor"):
        run(cfg)


def test_auto_replays_the_test_requests_a_table_file_names(small_trace, tmp_path, cache):
    from moesim.predictors.pipeline import RunConfig
    from moesim.predictors.pipeline import run as train_run

    table = tmp_path / "recency.parquet"
    out = train_run(RunConfig(trace=small_trace, method="recency", feature="", predictions=table,
                              progress=False), log=lambda _m: None)
    base = [f"trace.path={small_trace}", "trace.format=parquet", "mode=zero_latency",
            "progress=false", f"predictions.path={table}", "policy=prediction_prefetch"]
    _, row = run(_cfg(base))
    assert row["trace.requests"] == len(out.split["test"])
    _, row_all = run(_cfg([*base, "requests=all"]))
    assert row_all["trace.requests"] == len(load_trace(small_trace).requests)
