"""Inter-layer speculation predictor: context rows, tags, training/cache, the prediction table
(tiny models on the first 8 requests of the embedded trace)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesim.predictors.data import PredictorError  # noqa: E402
from moesim.predictors.pipeline import RunConfig, run  # noqa: E402
from moesim.predictors.speculation import (  # noqa: E402
    SpeculationConfig,
    SpeculationNet,
    available_at,
    build_inputs,
    context_rows,
)
from moesim.traces.collect.embedded import ensure_embedded_trace  # noqa: E402
from moesim.traces.predictions import load_predictions, read_predictions_meta  # noqa: E402
from moesim.traces.store import load_trace  # noqa: E402

TINY_MODEL = {"d_model": 16, "heads": 2, "ff": 32}
TINY_TRAIN = {"epochs": 2, "batch_size": 256}


@pytest.fixture(scope="module")
def small_trace():
    return ensure_embedded_trace(limit=8)


def test_available_at_tags():
    assert available_at(1) == "routed:prev_layer"
    assert available_at(2) == "routed:minus2_layer"
    assert available_at(3) == "routed:minus3_layer"
    with pytest.raises(ValueError):
        available_at(0)


def test_context_rows_and_inputs():
    # one request, 2 tokens x 4 layers (token-major), token 1 lacks layer 1
    request = np.zeros(7, dtype=np.int64)
    token = np.array([0, 0, 0, 0, 1, 1, 1])
    layer = np.array([0, 1, 2, 3, 0, 2, 3])
    ctx, has = context_rows(request, token, layer, 4, context=2, horizon=2)
    # layer t reads layers t-3, t-2 of the same token
    assert ctx.tolist() == [[-1, -1], [-1, -1], [-1, 0], [0, 1],
                            [-1, -1], [-1, 4], [4, -1]]
    assert has.tolist() == [False, False, True, True, False, True, True]
    experts = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [1, 0], [3, 2], [5, 4]], dtype=np.int16)
    inp = build_inputs(experts, layer, ctx, np.array([3, 6]), 8)
    assert inp.target.tolist() == [3, 3]
    assert inp.ctx_layer.tolist() == [[0, 1], [0, -1]]
    assert np.flatnonzero(inp.hot[0, 0]).tolist() == [0, 1]
    assert np.flatnonzero(inp.hot[0, 1]).tolist() == [2, 3]
    assert np.flatnonzero(inp.hot[1, 0]).tolist() == [0, 1] and not inp.hot[1, 1].any()
    # horizon 1 reads the layer right before
    ctx1, has1 = context_rows(request, token, layer, 4, context=1, horizon=1)
    assert ctx1[:, 0].tolist() == [-1, 0, 1, 2, -1, -1, 5]
    assert has1.tolist() == [False, True, True, True, False, False, True]


def test_padding_does_not_leak():
    torch.manual_seed(0)
    net = SpeculationNet(4, 8, SpeculationConfig(context=2, d_model=16, heads=2, ff=16))
    net.eval()
    hot = torch.zeros(2, 2, 8)
    hot[:, 1, :2] = 1
    hot[1, 0, 5:] = 1  # junk in a padded slot must be ignored
    lay = torch.tensor([[-1, 1], [-1, 1]])
    out = net(hot, lay, torch.tensor([3, 3]))
    assert torch.allclose(out[0], out[1], atol=1e-6)


def _run(trace, tmp_path, **kw):
    base = dict(trace=trace, method="speculation", model=TINY_MODEL, train=TINY_TRAIN,
                cache_dir=tmp_path / "cache", progress=False)
    base.update(kw)
    return run(RunConfig(**base), log=lambda _msg: None)


def test_train_cache_and_table(small_trace, tmp_path):
    pred = tmp_path / "pred.parquet"
    a = _run(small_trace, tmp_path, predictions=pred)
    assert not a.cached and a.model_path.is_file()
    assert a.available_at == "routed:minus2_layer"
    trace = load_trace(small_trace)
    layers = trace.meta.moe_layers
    m = a.metrics
    # only the predicted layers (>= horizon) are scored
    assert set(m.layer) == {str(lid) for lid in layers[2:]} | {"all"}
    test_all = m[(m.split == "test") & (m.layer == "all")].iloc[0]
    assert 0 <= test_all["exact_match"] <= test_all["recall@2"] <= 1
    meta = read_predictions_meta(pred)
    assert meta["available_at"] == "routed:minus2_layer" and meta["width"] == 2
    table = load_predictions(pred, layers)
    assert sorted(table) == [r.request_id for r in trace.requests]
    for r in trace.requests:
        t = table[r.request_id]
        assert t.shape[:2] == r.experts.shape[:2]
        assert (t[:, :2] == -1).all()  # no layer t - 2 before the third layer
        assert ((t[:, 2:] >= 0) == (r.experts[:, 2:] >= 0)).all()
    # same config + data: loaded; same seed in a fresh cache: identical results
    b = _run(small_trace, tmp_path)
    assert b.cached and b.model_path == a.model_path
    assert b.metrics["exact_match"].tolist() == m["exact_match"].tolist()
    c = _run(small_trace, tmp_path, cache_dir=tmp_path / "other")
    assert not c.cached and c.metrics["exact_match"].tolist() == m["exact_match"].tolist()
    # horizon 1: another model, tagged routed:prev_layer, predicts from the second layer on
    d = _run(small_trace, tmp_path, model={**TINY_MODEL, "horizon": 1, "context": 2},
             eval_parts=("test",))
    assert not d.cached and d.model_path != a.model_path
    assert d.available_at == "routed:prev_layer"
    assert set(d.metrics.layer) == {str(lid) for lid in layers[1:]} | {"all"}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"model": {"nope": 1}}, "unknown predictor.model"),
        ({"model": {"horizon": 0}}, "horizon must be >= 1"),
        ({"model": {"d_model": 10, "heads": 4}}, "multiple of heads"),
        ({"train": {"epochs": 0}}, "epochs >= 1"),
        ({"model": {"horizon": 6}}, "no train rows"),
    ],
)
def test_bad_config_is_a_predictor_error(small_trace, tmp_path, kw, match):
    with pytest.raises(PredictorError, match=match):
        _run(small_trace, tmp_path, **kw)
