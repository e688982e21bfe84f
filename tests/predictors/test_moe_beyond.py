"""MoE-Beyond's transformer predictor: what a row may see (causal mask vs their unmasked
encoder), sequences and windows, tags, training/cache and the prediction table (tiny models on
the first 8 requests of the embedded trace)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesim.policies.prediction_prefetch import available  # noqa: E402
from moesim.predictors.data import PredictorError  # noqa: E402
from moesim.predictors.moe_beyond import (  # noqa: E402
    MoEBeyondConfig,
    MoEBeyondNet,
    available_at,
    make_batch,
    sequences,
    text_vocab,
    windows,
)
from moesim.predictors.pipeline import RunConfig, run  # noqa: E402
from moesim.traces.collect.embedded import ensure_embedded_trace  # noqa: E402
from moesim.traces.predictions import read_predictions_meta  # noqa: E402

TINY_MODEL = {"d_model": 16, "heads": 2, "layers": 1, "ff": 32, "head_hidden": 16,
              "layer_embed": 8, "text_embed": 8}
TINY_TRAIN = {"epochs": 2, "batch_size": 2, "lr": 3e-3}


@pytest.fixture(scope="module")
def small_trace():
    return ensure_embedded_trace(limit=8)


def _rows(tokens: int, layers: int):
    token = np.repeat(np.arange(tokens), layers)
    layer = np.tile(np.arange(layers), tokens)
    return token, layer


@pytest.mark.parametrize("context", ["causal", "prompt"])
def test_a_row_sees_only_what_its_context_allows(context):
    """Perturbing rows a causal row may not see leaves its logits unchanged; the unmasked
    (published) encoder does change: it reads later tokens and layers."""
    cfg = MoEBeyondConfig(**{**TINY_MODEL, "dropout": 0.0, "context": context})
    torch.manual_seed(0)
    net = MoEBeyondNet(6, 0, 3, 8, cfg).eval()
    token, layer = _rows(4, 3)
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(len(token), 6)).astype(np.float32)
    seq = [np.arange(len(token))]
    target = 5  # token 1, layer 2
    later = (token > token[target]) | ((token == token[target]) & (layer > layer[target]))
    assert later.any()
    bumped = vec.copy()
    bumped[later] += rng.normal(size=(int(later.sum()), 6)).astype(np.float32)
    with torch.no_grad():
        out = []
        for v in (vec, bumped):
            b = make_batch(seq, v, layer, token, causal=context == "causal")
            out.append(net(b.vec, b.layer, b.pad, b.block)[0, target].numpy())
    same = np.allclose(out[0], out[1], atol=1e-5)
    assert same == (context == "causal")


def test_padding_does_not_change_a_sequence():
    cfg = MoEBeyondConfig(**{**TINY_MODEL, "dropout": 0.0, "context": "causal"})
    torch.manual_seed(1)
    net = MoEBeyondNet(6, 0, 3, 8, cfg).eval()
    token, layer = _rows(3, 3)
    vec = np.random.default_rng(1).normal(size=(len(token), 6)).astype(np.float32)
    with torch.no_grad():
        alone = make_batch([np.arange(4)], vec, layer, token, True)
        a = net(alone.vec, alone.layer, alone.pad, alone.block)[0, :4]
        both = make_batch([np.arange(4), np.arange(9)], vec, layer, token, True)
        b = net(both.vec, both.layer, both.pad, both.block)[0, :4]
    assert torch.allclose(a, b, atol=1e-5)


def test_sequences_truncate_and_windows_cover_every_row_once():
    request = np.array([0] * 6 + [1] * 4)
    token = np.array([0, 0, 1, 1, 2, 2, 0, 0, 1, 1])
    rows = np.arange(10)
    seqs = sequences(request, token, rows, max_tokens=2)
    assert [s.tolist() for s in seqs.rows] == [[0, 1, 2, 3], [6, 7, 8, 9]]
    win = windows(request, token, rows, size=2)
    assert sorted(np.concatenate(win.rows).tolist()) == list(range(10))
    assert [s.tolist() for s in win.rows] == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]


def test_tags_and_what_prediction_prefetch_accepts():
    assert available_at("prompt", "router_in") == "prompt:complete"
    assert available_at("causal", "router_in") == "routed:same_layer"
    assert available_at("causal", "pre_attn") == "pre_attention:same_layer"
    assert available_at("causal", "text") == "token_start:any_layer"
    assert not available("prompt:complete", "routed", 0)
    assert available("token_start:any_layer", "pre_attention", 2)
    assert text_vocab(["b", "a", None, "b", "a", "c"]) == {"a": 1, "b": 2}  # c: once -> OOV
    assert text_vocab(["b", "a", "c"], min_count=1) == {"a": 1, "b": 2, "c": 3}


def test_prediction_batches_respect_the_attention_budget():
    from moesim.predictors.moe_beyond import _budget_batches

    groups = _budget_batches([10, 3, 30, 4, 10], budget=250)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    lengths = [10, 3, 30, 4, 10]
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * longest**2 <= 250


def test_config_errors():
    with pytest.raises(ValueError):
        MoEBeyondConfig(d_model=10, heads=3).check()
    with pytest.raises(ValueError):
        MoEBeyondConfig(context="future").check()
    with pytest.raises(ValueError):
        MoEBeyondConfig(token_vector="gate").check()


def _run(trace, tmp_path, **kw):
    model = {**TINY_MODEL, **kw.pop("model", {})}
    return run(RunConfig(trace=trace, method="moe_beyond", feature="", model=model,
                         train=dict(TINY_TRAIN), cache_dir=tmp_path / "cache", progress=False,
                         **kw), log=lambda _m: None)


@pytest.mark.parametrize(
    ("vector", "context", "tag"),
    [("auto", "prompt", "prompt:complete"), ("text", "causal", "token_start:any_layer"),
     ("pre_attn", "causal", "pre_attention:same_layer")],
)
def test_pipeline_trains_caches_and_writes_a_tagged_table(small_trace, tmp_path, vector,
                                                          context, tag):
    out = _run(small_trace, tmp_path, model={"token_vector": vector, "context": context},
               predictions=tmp_path / "p.parquet")
    assert out.available_at == tag and not out.cached
    assert read_predictions_meta(tmp_path / "p.parquet")["available_at"] == tag
    m = out.metrics
    assert set(m["split"]) == {"val", "test"}
    assert ((m["exact_match"] >= 0) & (m["exact_match"] <= 1)).all()
    again = _run(small_trace, tmp_path, model={"token_vector": vector, "context": context})
    assert again.cached
    pd_a = m.drop(columns=["cached_model", "train_seconds"]).reset_index(drop=True)
    pd_b = again.metrics.drop(columns=["cached_model", "train_seconds"]).reset_index(drop=True)
    assert pd_a.equals(pd_b)  # the cached model predicts the same


def test_router_in_unmasked_learns_the_router(small_trace, tmp_path):
    """With the row's own router input in view the model can learn the linear router: a short
    training beats the frequency baseline's exact-match on held-out requests."""
    out = run(RunConfig(trace=small_trace, method="moe_beyond", feature="",
                        model={**TINY_MODEL, "token_vector": "router_in", "d_model": 32,
                               "ff": 64, "head_hidden": 32},
                        train={"epochs": 20, "batch_size": 1, "lr": 3e-3},
                        cache_dir=tmp_path / "cache", progress=False, eval_parts=("test",)),
              log=lambda _m: None)
    freq = run(RunConfig(trace=small_trace, method="frequency", feature="", progress=False,
                         eval_parts=("test",)), log=lambda _m: None)

    def exact(o):
        return float(o.metrics.query("layer == 'all'")["exact_match"].iloc[0])

    assert exact(out) > exact(freq) + 0.05


def test_text_vector_needs_token_texts(tmp_path):
    from moesim.traces import write_trace
    from tests.helpers import random_trace

    tr = random_trace(num_requests=4, tokens=3, layers=2, experts=8, top_k=2, seed=0)
    path = tmp_path / "t.parquet"
    write_trace(path, tr.meta, tr.requests)
    with pytest.raises(PredictorError, match="token texts"):
        _run(path, tmp_path, model={"token_vector": "auto"})
