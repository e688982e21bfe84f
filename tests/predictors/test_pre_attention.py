"""Pre-attention predictor: loss definition, seeded training, the model cache, prediction tables
(tiny models on the first 8 requests of the embedded trace)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from moesim.predictors.data import PredictorError  # noqa: E402
from moesim.predictors.pipeline import RunConfig, run  # noqa: E402
from moesim.predictors.pre_attention import (  # noqa: E402
    PreAttentionConfig,
    band_sizes,
    rank_matrix,
    ranking_loss,
)
from moesim.traces.collect.embedded import ensure_embedded_trace  # noqa: E402
from moesim.traces.predictions import load_predictions, read_predictions_meta  # noqa: E402
from moesim.traces.store import load_trace  # noqa: E402

TINY_MODEL = {"hidden": 32}
TINY_TRAIN = {"epochs": 2, "batch_size": 128}


@pytest.fixture(scope="module")
def small_trace():
    return ensure_embedded_trace(limit=8)


def test_band_sizes_scale_with_experts():
    cfg = PreAttentionConfig()
    assert band_sizes(cfg, 64, 6) == (10, 30)  # the paper's bands
    assert band_sizes(cfg, 16, 2) == (3, 8)
    assert band_sizes(cfg, 8, 4) == (4, 4)  # the first band holds at least top-k
    assert band_sizes(PreAttentionConfig(bands=(2, 5)), 16, 1) == (2, 5)


def test_rank_matrix_topk_and_full():
    ids = torch.tensor([[3, 1]])
    r = rank_matrix(ids, 5)
    assert r.tolist() == [[5, 1, 5, 0, 5]]  # unknown ranks = E
    full = rank_matrix(ids, 5, torch.tensor([[0.1, 0.5, 0.3, 0.9, -1.0]]))
    assert full.tolist() == [[3, 1, 2, 0, 4]]


def test_loss_matches_definition():
    cfg = PreAttentionConfig(hinge_weight=0.3, margin=0.1)
    logits = torch.tensor([[2.0, 1.95, -1.0, 0.0]])
    ranks = rank_matrix(torch.tensor([[0, 1]]), 4)  # top-2 known only: bands reduce to 3.0/0.5
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    weight = torch.tensor([[3.0, 3.0, 0.5, 0.5]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight)
    # pairs (i in top band, j ranked below i): (0,1) (0,2) (0,3) (1,2) (1,3)
    diffs = torch.tensor([0.05, 3.0, 2.0, 2.95, 1.95])
    hinge = torch.relu(0.1 - diffs).mean()
    got = ranking_loss(logits, ranks, 2, cfg)
    assert got.item() == pytest.approx((bce + 0.3 * hinge).item(), rel=1e-6)
    within = ranking_loss(logits, ranks, 2, PreAttentionConfig(hinge_pairs="within"))
    assert within.item() == pytest.approx((bce + 0.3 * 0.05).item(), rel=1e-6)
    assert ranking_loss(logits, ranks, 2, PreAttentionConfig(hinge_weight=0)).item() == (
        pytest.approx(bce.item(), rel=1e-6)
    )


def _run(trace, tmp_path, **kw):
    base = dict(trace=trace, model=TINY_MODEL, train=TINY_TRAIN, cache_dir=tmp_path / "cache",
                progress=False)
    base.update(kw)
    return run(RunConfig(**base), log=lambda _msg: None)


def test_train_cache_determinism_and_table(small_trace, tmp_path):
    pred = tmp_path / "pred.parquet"
    a = _run(small_trace, tmp_path, predictions=pred)
    assert not a.cached and a.model_path.is_file()
    test_all = a.metrics[(a.metrics.split == "test") & (a.metrics.layer == "all")].iloc[0]
    assert 0 <= test_all["exact_match"] <= test_all["recall@2"] <= 1
    assert test_all["zero_bit_acc"] == pytest.approx(1 - 2 / 16)
    # the table: every row of every request, available before attention
    trace = load_trace(small_trace)
    meta = read_predictions_meta(pred)
    assert meta["available_at"] == "pre_attention:same_layer" and meta["width"] == 2
    table = load_predictions(pred, trace.meta.moe_layers)
    assert sorted(table) == [r.request_id for r in trace.requests]
    for r in trace.requests:
        assert table[r.request_id].shape == r.experts.shape
    # same config + data: loaded, not retrained, same predictions
    b = _run(small_trace, tmp_path, predictions=tmp_path / "b.parquet")
    assert b.cached and b.model_path == a.model_path
    assert b.metrics["exact_match"].tolist() == a.metrics["exact_match"].tolist()
    # same seed in a fresh cache: same weights (bit-identical results on the CPU)
    c = _run(small_trace, tmp_path, cache_dir=tmp_path / "other")
    assert not c.cached and c.metrics["exact_match"].tolist() == a.metrics["exact_match"].tolist()
    # a changed config never reuses the stale model; retrain=True trains again
    d = _run(small_trace, tmp_path, model={"hidden": 16, "arch": "silu"})
    assert not d.cached and d.model_path != a.model_path
    e = _run(small_trace, tmp_path, retrain=True)
    assert not e.cached and e.model_path == a.model_path
    # a different split is different training data
    f = _run(small_trace, tmp_path, split_seed=1)
    assert not f.cached and f.model_path != a.model_path


def test_test_only_table_shared_model_and_routers_ranking(small_trace, tmp_path):
    pred = tmp_path / "t.parquet"
    out = _run(small_trace, tmp_path, predictions=pred, predict_requests="test", width=4,
               model={"hidden": 16, "per_layer": False, "ranking": "routers"})
    table = load_predictions(pred, load_trace(small_trace).meta.moe_layers)
    assert tuple(sorted(table)) == out.split["test"]
    assert next(iter(table.values())).shape[2] == 4


def test_router_in_feature_is_marked_routed(small_trace, tmp_path):
    out = _run(small_trace, tmp_path, feature="router_in", eval_parts=("test",))
    assert out.available_at == "routed:same_layer"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"model": {"nope": 1}}, "unknown predictor.model"),
        ({"model": {"arch": "relu"}}, "arch must be"),
        ({"train": {"epochs": 0}}, "epochs >= 1"),
        ({"model": {"band_weights": [3.0, 0.5]}}, "band_weights"),
        ({"feature": "token_id"}, "supports"),
        ({"method": "magic"}, "unknown predictor"),
        ({"method": "frequency"}, "takes no model"),
        ({"width": 99, "predictions": "x"}, "width"),
    ],
)
def test_bad_config_is_a_predictor_error(small_trace, tmp_path, kw, match):
    if "predictions" in kw:
        kw["predictions"] = tmp_path / "x.parquet"
    with pytest.raises(PredictorError, match=match):
        _run(small_trace, tmp_path, **kw)
