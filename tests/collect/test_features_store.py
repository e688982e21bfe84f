"""``feat.<name>`` columns in the trace writer/reader (traces.store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.traces.errors import TraceError
from moesim.traces.store import (
    FeatureSpec,
    TraceWriter,
    atomic_path,
    feature_specs,
    iter_requests,
    load_features,
    read_header,
    validate_trace,
    write_trace,
)
from moesim.traces.trace import RequestRouting, TraceMeta

META = TraceMeta(model="m", moe_layers=(1, 3), num_experts=4, top_k=2, partial=True)


def _req(rid: int, n_tok: int, rng: np.random.Generator) -> RequestRouting:
    ex = np.stack([rng.permutation(4)[:2] for _ in range(n_tok * 2)]).reshape(n_tok, 2, 2)
    ex = ex.astype(np.int16)
    ex[0, 1] = -1  # one unrecorded (token, layer) row
    return RequestRouting(rid, ex, np.zeros(n_tok, np.uint8))


def _write(path: Path) -> tuple[list[RequestRouting], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    reqs, feats = [], []
    with atomic_path(path) as tmp:
        w = TraceWriter(
            tmp,
            META,
            features={"h": FeatureSpec(3), "tid": FeatureSpec(1, "int32")},
            row_group_rows=4,
        )
        for rid, n in ((0, 3), (2, 5)):
            req = _req(rid, n, rng)
            h = rng.standard_normal((n, 2, 3)).astype(np.float32)
            w.add(req, features={"h": h, "tid": np.full((n, 2, 1), rid)})
            reqs.append(req)
            feats.append(h)
        w.close()
    return reqs, feats


def test_features_round_trip_in_row_order(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    reqs, feats = _write(path)
    validate_trace(path)
    assert feature_specs(path)["h"] == FeatureSpec(3, "float16")
    assert read_header(path)["features"]["tid"]["dtype"] == "int32"
    h = load_features(path, "h")
    want = np.concatenate([f[r.experts[:, :, 0] >= 0] for r, f in zip(reqs, feats, strict=True)])
    assert h.dtype == np.float16 and h.shape == want.shape
    np.testing.assert_allclose(h.astype(np.float32), want, rtol=1e-3, atol=1e-3)
    tid = load_features(path, "tid")
    assert tid.dtype == np.int32 and tid[:5, 0].tolist() == [0] * 5
    back = list(iter_requests(path))  # version-1 readers ignore the feature columns
    assert [r.request_id for r in back] == [0, 2]
    np.testing.assert_array_equal(back[1].experts, reqs[1].experts)


def test_feature_errors(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    w = TraceWriter(path, META, features={"h": FeatureSpec(3)})
    req = _req(0, 2, np.random.default_rng(1))
    with pytest.raises(TraceError, match="missing"):
        w.add(req)
    with pytest.raises(TraceError, match="shape"):
        w.add(req, features={"h": np.zeros((2, 2, 4))})
    with pytest.raises(TraceError, match="undeclared"):
        w.add(req, features={"h": np.zeros((2, 2, 3)), "x": np.zeros((2, 2, 1))})
    w.abort()
    with pytest.raises(TraceError, match="dtype"):
        TraceWriter(tmp_path / "g.parquet", META, features={"h": FeatureSpec(3, "int8")})


def test_plain_trace_has_no_features(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    write_trace(path, META, [_req(0, 2, np.random.default_rng(2))])
    assert feature_specs(path) == {}
    assert read_header(path)["features"] == {}
    with pytest.raises(TraceError, match="no feature 'h'"):
        load_features(path, "h")
