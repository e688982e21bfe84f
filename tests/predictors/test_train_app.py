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
    from moesim.predictors.registry import methods

    assert rc.method in methods()
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


PLUGIN_METHOD = '''
import numpy as np

from moesim.predictors.registry import Ranking, register_method


@register_method("reverse_id")
def reverse_id(cfg, data, train, val, log):
    """Every row ranks the experts by descending id: a method the project does not ship."""
    n, e = len(data.rows), data.trace.meta.num_experts
    ranked = np.tile(np.arange(e - 1, -1, -1, dtype=np.int16), (n, 1))
    return Ranking(ranked, "static:any_layer")
'''


def test_a_plugin_adds_a_training_method(tmp_path):
    """A module given as ``plugins=[...]`` registers a method that ``moesim-train`` runs and
    labels; an unknown method still names the known ones, the plugin's included."""
    import os

    from moesim.traces.collect.embedded import ensure_embedded_trace

    (tmp_path / "my_methods.py").write_text(PLUGIN_METHOD)
    trace = ensure_embedded_trace(limit=8)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def app(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moesim.predictors.train_app", *args],
                              capture_output=True, text=True, timeout=300, env=env,
                              cwd=Path(__file__).parents[2])

    out = tmp_path / "r"
    res = app("predictor=frequency", "predictor.method=reverse_id", "plugins=[my_methods]",
              f"trace.path={trace}", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr
    meta = read_predictions_meta(out / "predictions.parquet")
    assert meta["predictor"] == "reverse_id" and meta["available_at"] == "static:any_layer"
    bad = app("predictor=frequency", "predictor.method=nope", "plugins=[my_methods]",
              f"trace.path={trace}", f"hydra.run.dir={tmp_path / 'b'}")
    assert bad.returncode == 2
    line, = bad.stderr.strip().splitlines()
    assert "unknown predictor 'nope'" in line and "reverse_id" in line
