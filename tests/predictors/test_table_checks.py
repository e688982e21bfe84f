"""A prediction table is checked against the trace it is replayed on (issue 12): identity,
layers, expert ids per layer, width, dtypes. Each failure is one ``TraceError`` naming the file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.traces.errors import TraceError
from moesim.traces.predictions import (
    PRED_META_KEY,
    PredictionWriter,
    load_predictions,
    read_predictions_meta,
    trace_identity,
)
from moesim.traces.trace import TraceMeta

META = TraceMeta("tiny", (1, 2, 3), num_experts=8, top_k=2)


def _write(path: Path, pred: dict[int, np.ndarray], meta: TraceMeta = META,
           digest: str | None = "abc") -> Path:
    w = PredictionWriter(path, meta.moe_layers, trace=trace_identity(meta, digest))
    for rid, p in pred.items():
        w.add(rid, p)
    w.close({"model": meta.model, "source": "test"})
    return path


def _table(rng: np.random.Generator, tokens: int = 4, width: int = 2) -> np.ndarray:
    return np.stack([
        np.stack([rng.choice(8, size=width, replace=False) for _ in range(3)])
        for _ in range(tokens)
    ]).astype(np.int16)


def test_the_writer_records_the_trace_and_a_matching_trace_loads(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.parquet", {0: _table(np.random.default_rng(0))})
    meta = read_predictions_meta(path)
    assert meta["layer_ids"] == [1, 2, 3]
    assert meta["trace"] == {"model": "tiny", "moe_layers": [1, 2, 3], "num_experts": 8,
                             "top_k": 2, "digest": "abc"}
    table = load_predictions(path, META.moe_layers, trace_meta=META, trace_digest="abc",
                             trace_path=tmp_path / "t.parquet", min_coverage=0.5)
    assert table[0].shape == (4, 3, 2) and table.available_at == "routed:same_layer"
    assert table.path == path and table.min_coverage == 0.5


@pytest.mark.parametrize("other, field", [
    (replace(META, model="other"), "trace.model"),
    (replace(META, moe_layers=(0, 1, 2)), "trace.moe_layers"),
    (replace(META, num_experts=16), "trace.num_experts"),
    (replace(META, top_k=4), "trace.top_k"),
])
def test_a_table_for_another_trace_is_refused(tmp_path: Path, other, field) -> None:
    path = _write(tmp_path / "p.parquet", {0: _table(np.random.default_rng(1))})
    with pytest.raises(TraceError) as err:
        load_predictions(path, other.moe_layers, trace_meta=other,
                         trace_path=tmp_path / "trace.parquet")
    assert err.value.field == field and err.value.file == str(path)
    assert "trace.parquet" in str(err.value)


def test_another_trace_with_the_same_shape_is_refused_by_digest(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.parquet", {0: _table(np.random.default_rng(2))})
    with pytest.raises(TraceError, match="content digest"):
        load_predictions(path, META.moe_layers, trace_meta=META, trace_digest="xyz")
    load_predictions(path, META.moe_layers, trace_meta=META)  # digest unknown: not checked


def test_expert_ids_must_be_in_range_for_their_layer(tmp_path: Path) -> None:
    small = replace(META, num_experts=4)  # the table's ids go up to 7
    pred = np.zeros((2, 3, 2), dtype=np.int16)
    pred[..., 1] = 1
    pred[1, 2] = [3, 6]
    path = _write(tmp_path / "p.parquet", {0: pred}, meta=small)
    with pytest.raises(TraceError, match=r"expert id 6 at layer 3 is outside \[0, 4\)") as err:
        load_predictions(path, small.moe_layers, trace_meta=small)
    assert err.value.row == 5  # (token 1, layer index 2) is the sixth row


def test_width_beyond_the_experts_and_repeated_ids_are_refused(tmp_path: Path) -> None:
    rep = np.zeros((1, 3, 2), dtype=np.int16)
    path = _write(tmp_path / "rep.parquet", {0: rep})
    with pytest.raises(TraceError, match="repeat"):
        load_predictions(path, META.moe_layers, trace_meta=META)
    narrow = replace(META, num_experts=2, top_k=1)
    wide = np.tile(np.arange(3, dtype=np.int16), (1, 3, 1))
    path = _write(tmp_path / "wide.parquet", {0: wide}, meta=narrow)
    with pytest.raises(TraceError, match="width 3 exceeds"):
        load_predictions(path, narrow.moe_layers, num_experts=2)


def test_columns_must_have_the_schema_types(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.parquet", {0: _table(np.random.default_rng(3))})
    table = pq.read_table(path)
    bad = table.set_column(0, "request_id", table.column("request_id").cast(pa.int64()))
    kv = pq.read_metadata(path).metadata
    with pq.ParquetWriter(tmp_path / "bad.parquet", bad.schema) as w:
        w.write_table(bad)
        w.add_key_value_metadata({PRED_META_KEY: kv[PRED_META_KEY]})
    with pytest.raises(TraceError, match="int64") as err:
        load_predictions(tmp_path / "bad.parquet", META.moe_layers, trace_meta=META)
    assert err.value.field == "request_id"


def test_layers_outside_the_trace_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.parquet", {0: _table(np.random.default_rng(4))})
    with pytest.raises(TraceError, match="not in the trace's MoE layers"):
        load_predictions(path, (1, 2, 4))


def test_the_digest_writers_record_is_the_one_runs_compare(tmp_path: Path) -> None:
    from moesim.predictors.data import file_digest
    from moesim.traces.predictions import content_digest

    path = _write(tmp_path / "p.parquet", {0: _table(np.random.default_rng(5))})
    assert content_digest(path) == file_digest(path)
