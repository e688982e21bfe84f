"""Issue 25: a valid prediction table in another row order, with a repeated (request, token,
layer) row, or covering only some layers, used to run with a wrong hit rate and 100 %
coverage. Rows are sorted on load, a repeated key is an error naming both rows, and coverage
is counted per MoE layer (the worst layer is reported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.sim import SimulationError, simulate
from moesim.sim.predictions import PredictionView, unpredictable_layers
from moesim.sim.workload import build_workload
from moesim.traces.errors import TraceError
from moesim.traces.predictions import PredictionWriter, load_predictions, trace_identity
from tests.helpers import noisy_predictions, random_trace

TRACE = random_trace(num_requests=3, tokens=6, layers=4, experts=8, top_k=2, seed=5)


def _written(path: Path, wrong: float = 0.3, available_at: str = "routed:same_layer") -> Path:
    table = noisy_predictions(TRACE, np.random.default_rng(1), wrong, 2)
    w = PredictionWriter(path, TRACE.meta.moe_layers, available_at=available_at,
                         trace=trace_identity(TRACE.meta))
    for rid, pred in table.items():
        w.add(rid, pred)
    w.close({"model": TRACE.meta.model, "source": "test"})
    return path


def _rewrite(src: Path, dst: Path, order: np.ndarray) -> Path:
    """The same rows (and metadata) in another order."""
    t = pq.read_table(src)
    with pq.ParquetWriter(str(dst), t.schema) as w:
        w.write_table(t.take(pa.array(order)))
        w.add_key_value_metadata(pq.read_metadata(src).metadata)
    return dst


def _load(path: Path):
    return load_predictions(path, TRACE.meta.moe_layers, trace_meta=TRACE.meta)


def _hit_rate(table) -> float:
    return simulate(TRACE, "moe_beyond_replay", capacity=8, mode="zero_latency",
                    predictions=table).summary["hit_rate"]


def test_rows_in_another_order_load_and_run_the_same(tmp_path: Path) -> None:
    src = _written(tmp_path / "p.parquet")
    rows = pq.read_metadata(src).num_rows
    layer = pq.read_table(src).column("layer").to_numpy()
    by_layer = np.argsort(layer, kind="stable")  # layer first
    moved = np.r_[np.arange(1, rows), 0]  # one row of request 0 moved to the end
    want = _load(src)
    for name, order in (("by_layer", by_layer), ("moved", moved)):
        got = _load(_rewrite(src, tmp_path / f"{name}.parquet", order))
        assert sorted(got) == sorted(want), name
        for rid in want:
            np.testing.assert_array_equal(got[rid], want[rid], err_msg=name)
        assert _hit_rate(got) == _hit_rate(want), name


def test_a_repeated_request_token_layer_row_is_an_error_naming_both_rows(tmp_path: Path) -> None:
    src = _written(tmp_path / "p.parquet")
    rows = pq.read_metadata(src).num_rows
    dup = _rewrite(src, tmp_path / "dup.parquet", np.r_[np.arange(rows), 5])
    with pytest.raises(TraceError, match=r"appears twice \(rows 5 and \d+\)") as err:
        _load(dup)
    assert err.value.file == str(dup)


def test_coverage_is_per_layer_and_names_the_worst_layer(tmp_path: Path) -> None:
    table = noisy_predictions(TRACE, np.random.default_rng(1), 0.0, 2)
    for pred in table.values():
        pred[:, 1:] = -1  # only the first of 4 MoE layers has rows
    w = build_workload(TRACE)
    with pytest.raises(SimulationError, match=r"at MoE layer index 1, its worst layer \(0.0%"):
        PredictionView(w, table, min_coverage=0.99)
    view = PredictionView(w, table, min_coverage=0.0)
    assert view.coverage == 0.0 and view.worst_layer == 1
    full = noisy_predictions(TRACE, np.random.default_rng(1), 0.0, 2)
    full[0][2, 3] = -1  # one (token, layer) missing: that layer is the worst
    view = PredictionView(w, full, min_coverage=0.0)
    assert view.worst_layer == 3 and view.coverage == pytest.approx(17 / 18)


def test_layers_a_table_cannot_predict_are_left_out() -> None:
    """Fate's table (made one layer ahead) has no row for the first MoE layer by design."""
    assert [unpredictable_layers(t) for t in ("routed:prev_layer", "routed:minus3_layer",
                                              "routed:same_layer", None)] == [1, 3, 0, 0]
    table = noisy_predictions(TRACE, np.random.default_rng(1), 0.0, 2)
    for pred in table.values():
        pred[:, 0] = -1
    w = build_workload(TRACE)
    assert PredictionView(w, table, "routed:prev_layer").coverage == 1.0
    with pytest.raises(SimulationError, match="MoE layer index 0"):
        PredictionView(w, table, "routed:same_layer")
