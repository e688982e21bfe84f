"""``moesim-train`` (predictors/train_app.py): configs compose, a run writes its tables, bad
input gives one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from moesim.predictors.train_app import CONF_DIR, run_config
from moesim.traces.predictions import read_predictions_meta

PREDICTORS = sorted(p.stem for p in (CONF_DIR / "predictor").glob("*.yaml"))


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("name", PREDICTORS)
def test_every_predictor_config_composes(name, tmp_path):
    trace = tmp_path / "t.parquet"
    trace.write_bytes(b"")
    cfg = _cfg([f"predictor={name}", f"trace.path={trace}"])
    rc = run_config(cfg, tmp_path)
    from moesim.predictors.pipeline import METHODS

    assert rc.method in METHODS
    assert rc.predictions == tmp_path / "predictions.parquet"
    if name == "pre_attention_silu":
        assert rc.model["arch"] == "silu" and rc.model["hidden"] == 2048


def _app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moesim.predictors.train_app", *args],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
    )


def test_app_writes_metrics_and_predictions(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "run"
    res = _app("predictor=pre_attention", "trace.path=embedded", "trace.limit=8",
               "predictor.model.hidden=16", "predictor.train.epochs=1", "progress=false",
               f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr
    assert "zero_bit_acc" in res.stdout and "exact_match" in res.stdout
    df = pd.read_parquet(out / "metrics.parquet")
    assert set(df["split"]) == {"val", "test"} and "all" in set(df["layer"])
    assert read_predictions_meta(out / "predictions.parquet")["available_at"] == (
        "pre_attention:same_layer"
    )


def test_app_baseline_and_bad_input(tmp_path):
    from moesim.traces.collect.embedded import ensure_embedded_trace

    trace = ensure_embedded_trace(limit=8)  # a plain path: the app then needs no torch import
    res = _app("predictor=recency", f"trace.path={trace}",
               "predictions.write=false", f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 0, res.stderr
    assert "previous_token:same_layer" in res.stdout
    assert not (tmp_path / "r" / "predictions.parquet").exists()
    bad = _app(f"trace.path={tmp_path / 'missing.parquet'}", f"hydra.run.dir={tmp_path / 'b'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: trace.path: {tmp_path / 'missing.parquet'} does not exist"
    ]
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    bad = _app(f"trace.path={junk}", "predictor=frequency", f"hydra.run.dir={tmp_path / 'c'}")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
