"""Fate next-gate predictor (predictors/fate.py): known answers, real trace, table, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.predictors.fate import (
    AVAILABLE_AT,
    Accuracy,
    fate_predictions,
    gate_topk,
    main,
    next_gate_predict,
    run_fate,
)
from moesim.predictors.metrics import MetricSpec, evaluate
from moesim.traces.collect.collector import load_routers, routers_path
from moesim.traces.errors import TraceError
from moesim.traces.predictions import load_predictions, read_predictions_meta
from moesim.traces.store import FeatureSpec, TraceWriter, atomic_path, load_features, load_trace
from moesim.traces.trace import RequestRouting, TraceMeta

E = 4
LAYERS = (0, 1, 2)
# weights[j][e] = one-hot(PERM[j][e]): logit of expert e at layer j is x[PERM[j][e]]
PERM = {0: [0, 1, 2, 3], 1: [3, 2, 1, 0], 2: [1, 0, 3, 2]}
ROUTERS = {lid: np.eye(E, dtype=np.float32)[PERM[lid]] for lid in LAYERS}


def _own_topk(x: np.ndarray, lid: int, k: int = 2) -> np.ndarray:
    return np.argsort(-(x @ ROUTERS[lid].T), axis=-1, kind="stable")[..., :k]


def _hand_trace(path: Path, *, with_feature: bool = True, routers: bool = True) -> np.ndarray:
    """Two requests whose routing is each layer's own gate on distinct-valued router inputs."""
    rng = np.random.default_rng(0)
    meta = TraceMeta(model="hand", moe_layers=LAYERS, num_experts=E, top_k=2, expert_bytes=8)
    feats = {"router_in": FeatureSpec(E)} if with_feature else {"other": FeatureSpec(E)}
    xs = []
    with atomic_path(path) as tmp:
        w = TraceWriter(tmp, meta, features=feats)
        for rid, n in ((0, 3), (5, 4)):
            # a random permutation of well-separated values per row: no near-ties in fp16
            x = np.stack([rng.permutation(4) for _ in range(n * 3)]).reshape(n, 3, E) * 1.0
            ex = np.stack([_own_topk(x[:, j], lid) for j, lid in enumerate(LAYERS)], axis=1)
            w.add(
                RequestRouting(rid, ex.astype(np.int16), np.zeros(n, np.uint8)),
                features={next(iter(feats)): x},
            )
            xs.append(x)
        w.close()
    if routers:
        with routers_path(path).open("wb") as fh:
            np.savez(fh, **{f"layer_{lid}": m for lid, m in ROUTERS.items()})
    return np.concatenate(xs)


# ---------------------------------------------------------------------------------------------
# (a) known answers


def test_gate_topk_known_answer_and_ties() -> None:
    x = np.array([[0.1, 3.0, 2.0, -1.0]], dtype=np.float32)
    assert gate_topk(x, ROUTERS[0], 2).tolist() == [[1, 2]]
    # layer 1's gate reverses the inputs: logits [-1, 2, 3, 0.1]
    assert gate_topk(x, ROUTERS[1], 2).tolist() == [[2, 1]]
    assert gate_topk(x, ROUTERS[1], 3).tolist() == [[2, 1, 3]]
    # exact tie: lower expert id first
    assert gate_topk(np.ones((1, 4), np.float32), ROUTERS[2], 2).tolist() == [[0, 1]]


def test_next_gate_predict_uses_next_layers_router_on_previous_input() -> None:
    x = np.zeros((1, 3, E), dtype=np.float32)
    x[0, 0] = [0.1, 3.0, 2.0, -1.0]  # layer 0 input -> layer 1's gate: [2, 1]
    x[0, 1] = [5.0, 4.0, 0.0, 1.0]  # layer 1 input -> layer 2's gate (logits [4, 5, 1, 0])
    x[0, 2] = [9.0, 9.0, 9.0, 9.0]  # last layer's input predicts nothing
    pred = next_gate_predict(x, [ROUTERS[j] for j in LAYERS], 2, np.ones((1, 3), bool))
    assert pred.tolist() == [[[-1, -1], [2, 1], [1, 0]]]
    # an unrecorded source row gives no prediction for the next layer
    rec = np.array([[True, False, True]])
    pred = next_gate_predict(x, [ROUTERS[j] for j in LAYERS], 2, rec)
    assert pred[0, 2].tolist() == [-1, -1] and pred[0, 1].tolist() == [2, 1]


def test_accuracy_counts() -> None:
    acc = Accuracy(num_layers=2, top_k=2, width=3)
    true = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], dtype=np.int16)  # [T=2, L=2, k]
    pred = np.array([[[-1] * 3, [3, 2, 0]], [[-1] * 3, [2, 0, 3]]], dtype=np.int16)
    acc.add(pred, true)
    layer1 = acc.per_layer()[1]
    assert acc.per_layer()[0]["rows"] == 0
    # token 0: first k {3,2} == {2,3} exact, both hit; token 1: {2,0} not exact, both hit @3
    assert layer1 == {"rows": 2, "exact": 0.5, "recall": 1.0, "top1": 1.0}
    assert acc.overall() == layer1


def test_top1_is_the_first_choice_being_a_true_expert() -> None:
    """One top-1 for every report: Fate's CLI and ``predictors.evaluate`` agree row by row,
    also where the first choice is a true expert but not the router's own first one."""
    true = np.array([[[0, 1]], [[0, 1]], [[0, 1]]], dtype=np.int16)  # router ranks 0 first
    pred = np.array([[[1, 3, 2]], [[2, 0, 3]], [[0, 3, 2]]], dtype=np.int16)
    acc = Accuracy(num_layers=1, top_k=2, width=3)
    acc.add(pred, true)
    # row 0: first choice 1 is true; row 1: first choice 2 is not (0 only later); row 2: yes
    assert acc.overall()["top1"] == pytest.approx(2 / 3)
    rows = evaluate(pred[:, 0].astype(np.int64), true[:, 0].astype(np.int64), np.zeros(3, int),
                    MetricSpec(num_experts=4, top_k=2))
    assert rows[-1]["top1_acc"] == pytest.approx(acc.overall()["top1"])


def test_run_fate_on_hand_trace(tmp_path: Path) -> None:
    trace = tmp_path / "hand.parquet"
    _hand_trace(trace)
    out = fate_predictions(trace, tmp_path / "pred.parquet")
    feats = load_features(trace, "router_in").astype(np.float32).reshape(-1, 3, E)
    expected = np.full((len(feats), 3, 2), -1)
    for j in (1, 2):
        expected[:, j] = _own_topk(feats[:, j - 1], LAYERS[j])
    preds = load_predictions(out, LAYERS)
    assert sorted(preds) == [0, 5]
    assert np.array_equal(np.concatenate([preds[0], preds[5]]), expected)
    # over-provisioned width: the first k agree with width k
    res = run_fate(trace, tmp_path / "w3.parquet", width=3)
    p3 = load_predictions(res.path, LAYERS)
    assert np.array_equal(p3[5][:, 1:, :2], preds[5][:, 1:])
    assert res.own_gate.mismatch.sum() == 0


# ---------------------------------------------------------------------------------------------
# (b) the embedded trace


@pytest.fixture(scope="module")
def embedded() -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moesim.traces.collect.embedded import MODEL_DIR, ensure_embedded_trace

    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("embedded model not trained yet")
    return ensure_embedded_trace(limit=4)


def test_own_router_reproduces_recorded_routing(embedded: Path) -> None:
    """Features, router weights and layer alignment agree with what the model routed."""
    trace = load_trace(embedded)
    k, n_layers = trace.meta.top_k, trace.meta.num_moe_layers
    routers = load_routers(routers_path(embedded))
    x = load_features(embedded, "router_in").astype(np.float32).reshape(-1, n_layers, 128)
    true = np.concatenate([r.experts for r in trace.requests]).astype(np.int64)
    assert len(true) == len(x)
    mismatched = 0
    for j, lid in enumerate(trace.meta.moe_layers):
        logits = x[:, j] @ routers[lid].T
        got = np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)
        bad = (got != np.sort(true[:, j], axis=1)).any(axis=1)
        # a mismatch may only be an fp16 near-tie: recorded experts within 0.01 logits of ours
        kth = np.sort(logits[bad], axis=1)[:, -k]
        recorded = np.take_along_axis(logits[bad], true[bad, j], axis=1).min(axis=1)
        assert (kth - recorded <= 1e-2).all()
        mismatched += int(bad.sum())
    assert mismatched <= 0.001 * true.shape[0] * n_layers


def test_next_gate_beats_random_on_embedded(
    embedded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = run_fate(embedded, tmp_path / "fate.parquet")
    k, e = 2, res.num_experts
    per_layer = res.accuracy.per_layer()
    assert per_layer[0]["rows"] == 0  # the first MoE layer has no prediction
    with capsys.disabled():
        print(
            "\nFate next-gate on embedded (limit=4): recall@k per layer",
            [round(r["recall"], 3) for r in per_layer[1:]],
            f"random {k / e:.3f}",
        )
    for r in per_layer[1:]:
        assert r["rows"] > 0 and r["recall"] > k / e
    assert res.accuracy.overall()["recall"] > 2 * k / e
    assert res.own_gate.mismatch.sum() == res.own_gate.near_tie.sum()


# ---------------------------------------------------------------------------------------------
# (c) the table


def test_table_loads_with_available_at(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    trace = tmp_path / "hand.parquet"
    _hand_trace(trace)
    out = fate_predictions(trace, tmp_path / "pred.parquet", width=3)
    meta = read_predictions_meta(out)
    assert meta["available_at"] == AVAILABLE_AT == "routed:prev_layer"
    assert meta["width"] == 3 and meta["predictor"] == "fate_next_gate"
    assert meta["counts"]["rows"] == 7 * 2  # 7 tokens x layers 1, 2
    table = pq.read_table(out)
    assert set(table.column("available_at").to_pylist()) == {AVAILABLE_AT}
    assert set(table.column("layer").to_pylist()) == {1, 2}
    preds = load_predictions(out, LAYERS)
    assert preds[0].shape == (3, 3, 3) and (preds[0][:, 0] == -1).all()


# ---------------------------------------------------------------------------------------------
# (d) bad input


def _no_temp_left(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]


def test_errors(tmp_path: Path) -> None:
    trace = tmp_path / "hand.parquet"
    _hand_trace(trace)
    out = tmp_path / "p.parquet"
    with pytest.raises(TraceError, match="does not exist"):
        run_fate(tmp_path / "missing.parquet", out)
    with pytest.raises(ValueError, match="width"):
        run_fate(trace, out, width=0)
    with pytest.raises(ValueError, match="width"):
        run_fate(trace, out, width=E + 1)
    with pytest.raises(ValueError, match="trace itself"):
        run_fate(trace, trace)

    nofeat = tmp_path / "nofeat.parquet"
    _hand_trace(nofeat, with_feature=False)
    with pytest.raises(TraceError, match=r"no feat\.router_in"):
        run_fate(nofeat, out)

    norouters = tmp_path / "norouters.parquet"
    _hand_trace(norouters, routers=False)
    with pytest.raises(TraceError, match="router weights side file"):
        run_fate(norouters, out)

    with routers_path(norouters).open("wb") as fh:  # wrong shape for layer 2
        np.savez(fh, layer_0=ROUTERS[0], layer_1=ROUTERS[1], layer_2=np.zeros((E, E + 1)))
    with pytest.raises(TraceError, match=r"router of layer 2 is \(4, 5\)"):
        run_fate(norouters, out)

    assert not out.exists() and _no_temp_left(tmp_path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "hand.parquet"
    _hand_trace(trace)
    assert main([str(trace), str(tmp_path / "p.parquet"), "--width", "3"]) == 0
    assert "recall@3" in capsys.readouterr().out
    assert main([str(tmp_path / "nope.parquet"), str(tmp_path / "q.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "q.parquet").exists()
