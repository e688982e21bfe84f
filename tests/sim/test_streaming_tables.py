"""Streamed replay of the prefetchers that read a prediction table (``prediction_prefetch``,
``moe_beyond_replay``): each chunk's prediction view is built from its requests' rows, read
from the table file row group by row group (``sim.predictions.PredictionFile``), and its
coverage counts are summed over the run (``sim.stream._PredictionChunks``). Compared with the
in-memory run (``traces.load_predictions``), every summary value, the per-layer and
per-request tables: the embedded trace (chunks of 1, 7 and all requests, batches), MoE-Beyond's
imported DeepSeek-V2-Lite test prompts with their own predictions (``../shared``, skipped when
absent), and random traces with partial tables and row groups that split requests
(hypothesis). Coverage below ``predictions.min_coverage``: the in-memory error, word for word,
or an earlier stop once no later chunk can reach it. The file's checks are
``load_predictions``'. Also MoE-Infinity's lazy match in a streamed batched run whose first
chunk has fewer live requests than its buffers hold (``sim.stream._mi_state``).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.sim import SimulationError, simulate
from moesim.sim import stream as stream_mod
from moesim.sim.predictions import PredictionFile
from moesim.sim.stream import StreamOptions, simulate_stream
from moesim.traces import load_predictions, load_trace
from moesim.traces.errors import TraceError
from moesim.traces.predictions import PredictionWriter, trace_identity
from moesim.traces.trace import Trace
from tests.helpers import noisy_predictions
from tests.sim.test_streaming import _kwargs, _random_trace, assert_same, write_trace_file
from tests.traces.fixtures import require_shared

TABLE_POLICIES = [
    "prediction_prefetch",
    {"name": "prediction_prefetch", "point": "demand_issued", "ahead": 1, "top": 3,
     "check_availability": False},
    "moe_beyond_replay",
    {"name": "moe_beyond_replay", "point": "pre_attention", "during_warmup": True,
     "eviction": "belady"},
]


def write_table(path: Path, trace: Trace, table: dict, row_group_rows: int) -> Path:
    """``table`` (request id -> [T, L, w]) as a prediction table file made for ``trace``."""
    pw = PredictionWriter(path, trace.meta.moe_layers, available_at="pre_attention:same_layer",
                          row_group_rows=row_group_rows, trace=trace_identity(trace.meta))
    for rid in sorted(table):
        pw.add(rid, table[rid])
    pw.close({"model": trace.meta.model})
    return path


def both(trace_path: Path, trace: Trace, table_path: Path, min_coverage: float = 0.99):
    """The table loaded whole (the in-memory run's) and opened for streaming."""
    layers = trace.meta.moe_layers
    return (load_predictions(table_path, layers, trace_meta=trace.meta, trace_path=trace_path,
                             min_coverage=min_coverage),
            PredictionFile(table_path, layers, trace_meta=trace.meta, trace_path=trace_path,
                           min_coverage=min_coverage))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trace, Path]:
    """The embedded trace, and a table for it (30 % of the slots wrong, 8 wide) in row groups
    of 500 rows (requests span row groups)."""
    from moesim.traces.collect.embedded import embedded_routing

    path = embedded_routing()
    trace = load_trace(path)
    table = noisy_predictions(trace, np.random.default_rng(0), 0.3, 8)
    out = tmp_path_factory.mktemp("tables") / "pred.parquet"
    return path, trace, write_table(out, trace, table, row_group_rows=500)


def test_file_rows_are_load_predictions(embedded: tuple[Path, Trace, Path]) -> None:
    """Any subset of requests read from the file: the arrays ``load_predictions`` gives them,
    with its attributes; requests the table lacks are absent."""
    path, trace, table = embedded
    whole, source = both(path, trace, table, 0.5)
    assert source._file.num_row_groups > 5
    ids = sorted(whole)
    for subset in (ids, ids[3:9], ids[::7], [ids[-1], 10**6]):
        got = source.rows(subset)
        assert sorted(got) == sorted(r for r in subset if r in whole)
        for rid, arr in got.items():
            assert arr.dtype == whole[rid].dtype
            np.testing.assert_array_equal(arr, whole[rid])
        for attr in ("path", "available_at", "trace_path", "min_coverage", "meta"):
            assert getattr(got, attr) == getattr(whole, attr)
    # the row groups read stay cached only while asked for
    source.rows(ids[:1])
    assert len(source._cache) == 1


@pytest.mark.parametrize("policy", TABLE_POLICIES)
@pytest.mark.parametrize(("mode", "batch"), [("timed", 1), ("zero_latency", 1), ("timed", 4)])
def test_embedded_tables(embedded: tuple[Path, Trace, Path], policy: str | dict, mode: str,
                         batch: int) -> None:
    """The embedded trace (64 requests) streamed in chunks of 1, 7 and every request with
    its table read from the file: the in-memory run's result; the prefetcher did prefetch."""
    path, trace, table = embedded
    whole, source = both(path, trace, table)
    kw = {**_kwargs(mode, capacity=60, warmup=2), "batch": batch}
    ref = simulate(trace, policy, predictions=whole, **kw)
    assert ref.summary["sim_engine"] == "compiled"
    assert ref.summary["prefetch_transfers"] > 0
    for chunk in (1, 7, 1000):
        assert_same(ref, simulate_stream(path, policy, chunk_requests=chunk,
                                         predictions=source, **kw))
    # an in-memory table streams too (the same rows, taken from the mapping)
    assert_same(ref, simulate_stream(path, policy, chunk_requests=5, predictions=whole, **kw))


def test_run_stream_option_hands_the_table_on(embedded: tuple[Path, Trace, Path]) -> None:
    """``simulate(..., stream=StreamOptions(True, n), predictions=file)``: the streamed run
    of the table, as in memory (MoE-Beyond's warm-up row and prefill replay too)."""
    path, trace, table = embedded
    whole, source = both(path, trace, table)
    for extra in ({"warmup_extra_row": True, "warmup_tokens": 3},
                  {"replay": "prefill", "prefill_chunk": 4, "batch": 3}):
        kw = {**_kwargs("timed", capacity=50), **extra}
        ref = simulate(trace, "moe_beyond_replay", predictions=whole, **kw)
        got = simulate(str(path), "moe_beyond_replay", predictions=source,
                       stream=StreamOptions(True, 6), **kw)
        assert_same(ref, got)
    # none handed on: refused by name
    with pytest.raises(SimulationError, match=r"^run\.stream: policy 'moe_beyond_replay' "
                       r"prefetches from a prediction table, and none was handed"):
        simulate(str(path), "moe_beyond_replay", stream=StreamOptions(True, 6),
                 **_kwargs("timed", capacity=50))


def test_moesim_sim_streams_its_table(embedded: tuple[Path, Trace, Path]) -> None:
    """``moesim-sim run.stream=true`` with ``predictions.path``: the app opens the table as a
    ``PredictionFile`` and the run equals the in-memory one; a predictor's held-out subset
    (``requests=held_out``) stays refused by name."""
    from hydra import compose, initialize_config_dir

    from moesim.experiments.configs import CONF_DIR, register_configs
    from moesim.experiments.sim_app import run

    register_configs()
    path, _, table = embedded
    base = ["trace=file", f"trace.path={path}", "policy=moe_beyond_replay", "progress=false",
            f"predictions.path={table}", "predictions.min_coverage=0.5", "max_requests=12"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = [compose("config", overrides=[*base, *extra]) for extra in
                ([], ["run.stream=true", "run.chunk_requests=5"],
                 ["run.stream=true", "requests=held_out"])]
    (ref, ref_row), (streamed, row) = run(cfgs[0]), run(cfgs[1])
    assert not ref_row["run.stream"] and row["run.stream"] and row["run.chunk_requests"] == 5
    assert_same(ref, streamed)
    assert streamed.summary["prefetch_transfers"] > 0
    with pytest.raises(SimulationError, match=r"run\.stream: requests=held_out replays a subset"):
        run(cfgs[2])


def _partial_table(trace: Trace, seed: int, keep: float) -> dict:
    """A noisy table lacking some requests, some tokens' rows and the tail of some requests."""
    rng = np.random.default_rng(seed)
    full = noisy_predictions(trace, rng, 0.4, int(rng.integers(1, trace.meta.num_experts + 1)))
    out = {}
    for rid, pred in full.items():
        if rng.random() > keep:
            continue
        pred = pred.copy()
        pred[rng.random(pred.shape[:2]) > keep] = -1
        cut = int(rng.integers(1, len(pred) + 1))
        if (pred[:cut] >= 0).any():
            out[rid] = pred[:cut]
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_req=st.integers(1, 9), layers=st.integers(1, 4),
       experts=st.integers(3, 8), top_k=st.integers(1, 3), partial=st.booleans(),
       policy=st.sampled_from(TABLE_POLICIES), chunk=st.integers(1, 10),
       batch=st.integers(1, 4), row_group=st.sampled_from([1, 3, 7, 1 << 18]),
       keep=st.sampled_from([0.5, 0.9, 1.0]), spare=st.integers(0, 6),
       warmup=st.integers(0, 3), min_cov=st.sampled_from([0.0, 0.0, 0.6]))
def test_property_tables_streamed_equal_in_memory(
        seed: int, n_req: int, layers: int, experts: int, top_k: int, partial: bool,
        policy: str | dict, chunk: int, batch: int, row_group: int, keep: float, spare: int,
        warmup: int, min_cov: float) -> None:
    """Random traces and partial tables in row groups of 1 row to all rows, any chunk size
    and batch: the in-memory result (coverage included), or an error where the in-memory run
    fails (its own where only the whole run decides: a cache too small, the coverage)."""
    top_k = min(top_k, experts)
    trace = _random_trace(seed, n_req, layers, experts, top_k, partial)
    capacity = min(min(batch, n_req) * top_k + 1 + spare, layers * experts)
    kw = {**_kwargs("timed", capacity, warmup), "batch": batch}
    table = _partial_table(trace, seed, keep)
    if not table:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_trace_file(Path(tmp), trace)
        whole, source = both(path, trace, write_table(Path(tmp) / "p.parquet", trace, table,
                                                      row_group), min_cov)
        try:
            ref = simulate(trace, policy, predictions=whole, **kw)
        except SimulationError as err:
            with pytest.raises(SimulationError) as got:
                simulate_stream(path, policy, chunk_requests=chunk, predictions=source, **kw)
            if "cannot cover" not in str(got.value):  # else: stopped early, knowing it fails
                assert str(got.value) == str(err)
            return
        assert_same(ref, simulate_stream(path, policy, chunk_requests=chunk,
                                         predictions=source, **kw))


def test_coverage_errors(embedded: tuple[Path, Trace, Path], tmp_path: Path) -> None:
    """A table lacking requests: where only the whole run decides (the last request
    missing), the in-memory error word for word, naming the table, the trace, the layer and
    the first request without a prediction; where an early chunk already decides (every
    other request missing), the streamed run stops there with an error naming the table,
    the trace and the first missing request."""
    path, trace, table = embedded
    whole = load_predictions(table, trace.meta.moe_layers)
    ids = sorted(whole)
    kw = _kwargs("timed", capacity=60)
    # the last request missing: 98.8 % of the pairs covered, below 0.99
    last = write_table(tmp_path / "last.parquet", trace,
                       {r: whole[r] for r in ids[:-1]}, 500)
    mem, source = both(path, trace, last)
    with pytest.raises(SimulationError) as ref:
        simulate(trace, "prediction_prefetch", predictions=mem, **kw)
    with pytest.raises(SimulationError) as got:
        simulate_stream(path, "prediction_prefetch", chunk_requests=7, predictions=source,
                        **kw)
    assert str(got.value) == str(ref.value)
    assert f"prediction table {last}" in str(ref.value)
    assert f"without a prediction row there: {ids[-1]})" in str(ref.value)
    # every other request missing: certain after the first chunk of 4 requests
    half = write_table(tmp_path / "half.parquet", trace,
                       {r: whole[r] for r in ids[::2]}, 500)
    mem, source = both(path, trace, half)
    with pytest.raises(SimulationError, match=r"covers .* \(request, token\) pairs"):
        simulate(trace, "prediction_prefetch", predictions=mem, **kw)
    replayed = []
    real = stream_mod._replay

    def counting(sim, chunks, *args):
        return real(sim, (replayed.append(c) or c for c in chunks), *args)

    stream_mod._replay = counting
    try:
        with pytest.raises(SimulationError) as early:
            simulate_stream(path, "prediction_prefetch", chunk_requests=4,
                            predictions=source, **kw)
    finally:
        stream_mod._replay = real
    msg = str(early.value)
    assert "\n" not in msg and f"prediction table {half}" in msg and str(path) in msg
    assert f"the first replayed request without one: {ids[1]}" in msg
    assert "min_coverage=0.99" in msg
    assert len(replayed) == 0  # stopped before the first chunk was replayed
    # no table at all: the in-memory error
    with pytest.raises(SimulationError) as ref:
        simulate(trace, "moe_beyond_replay", **kw)
    with pytest.raises(SimulationError) as got:
        simulate_stream(path, "moe_beyond_replay", chunk_requests=7, **kw)
    assert str(got.value) == str(ref.value)


def test_file_checks_are_load_predictions(embedded: tuple[Path, Trace, Path],
                                          tmp_path: Path) -> None:
    """An expert id out of range, a repeated (request, token, layer) row, a layer the trace
    does not have, another trace's table: the error ``load_predictions`` gives (the same file
    row), the out-of-range id and the layer found when the file is opened."""
    _, trace, table = embedded
    rows = pq.read_table(table)
    meta = pq.read_metadata(table).metadata

    def rewritten(name: str, t: pa.Table) -> Path:
        out = tmp_path / name
        pq.write_table(t.replace_schema_metadata(meta), out, row_group_size=300)
        return out

    pred = rows.column("predicted").to_pylist()
    pred[777] = [99, *pred[777][1:]]
    bad_id = rewritten("id.parquet", rows.set_column(3, "predicted",
                                                     pa.array(pred, pa.list_(pa.int16()))))
    dup = rewritten("dup.parquet", pa.concat_tables([rows.slice(0, 1000), rows.slice(10, 1),
                                                     rows.slice(1000)]))
    layer = rows.column("layer").to_numpy().copy()
    layer[1234] = 99
    bad_layer = rewritten("layer.parquet", rows.set_column(2, "layer", pa.array(layer)))
    for bad in (bad_id, dup, bad_layer):
        with pytest.raises(TraceError) as ref:
            load_predictions(bad, trace.meta.moe_layers, trace_meta=trace.meta)
        with pytest.raises(TraceError) as got:
            PredictionFile(bad, trace.meta.moe_layers, trace_meta=trace.meta).rows(
                [r.request_id for r in trace.requests])
        assert str(got.value) == str(ref.value)
        assert got.value.row == ref.value.row
    other = replace(trace.meta, num_experts=99)
    with pytest.raises(TraceError) as ref:
        load_predictions(table, trace.meta.moe_layers, trace_meta=other)
    with pytest.raises(TraceError) as got:
        PredictionFile(table, trace.meta.moe_layers, trace_meta=other)
    assert str(got.value) == str(ref.value)


def test_real_trace_with_its_predictions(tmp_path: Path) -> None:
    """MoE-Beyond's DeepSeek-V2-Lite test prompts (100 requests) with the predictions its
    repository ships, imported beside the trace: their replay protocol (zero latency, 10
    warm-up tokens and the extra warm-up row) and prediction_prefetch (at routing, when the
    table's predictions exist) timed in batches of 8,
    streamed in chunks of 16 requests: the in-memory results."""
    from moesim.traces import import_trace

    src = require_shared("deepseek_v2_lite_moe-beyond/predicted_csvs")
    out = tmp_path / "ds.parquet"
    import_trace("moe-beyond-csv", src, out)
    trace = load_trace(out)
    whole, source = both(out, trace, out.with_suffix(".predictions.parquet"))
    runs = [("moe_beyond_replay", {**_kwargs("zero_latency", capacity=166, warmup=10),
                                   "warmup_extra_row": True}),
            ({"name": "prediction_prefetch", "point": "routed"},
             {**_kwargs("timed", capacity=166), "batch": 8})]
    for policy, kw in runs:
        ref = simulate(trace, policy, predictions=whole, **kw)
        assert ref.summary["prediction_coverage"] > 0.9
        assert_same(ref, simulate_stream(out, policy, chunk_requests=16, predictions=source,
                                         **kw))


def test_moe_infinity_lazy_match_with_spare_live_buffers(tmp_path: Path) -> None:
    """A streamed batched MoE-Infinity run whose live buffers hold more requests than its
    first chunk runs (batch 8 over 5 requests: the buffers are sized by the batch): the
    lazy match's per-request tables have as many rows, so the kernel's lazy path runs to the
    run's last step (its ring row, ``G_STEP``, is the last step's), as in memory."""
    from moesim.sim.compiled.eamc import G_LAZY, G_NS, G_OFF, G_STEP
    from moesim.traces.collect.embedded import embedded_routing

    path = embedded_routing()
    trace = load_trace(path, max_requests=5)
    kw = {**_kwargs("timed", capacity=60, warmup=2), "batch": 8}
    ref = simulate(trace, "moe_infinity", **kw)
    seen = []
    real = stream_mod._mi_state

    def spy(sim, w, most):
        seen.append(real(sim, w, most))
        return seen[-1]

    stream_mod._mi_state = spy
    try:
        got = simulate_stream(path, "moe_infinity", chunk_requests=2, max_requests=5, **kw)
    finally:
        stream_mod._mi_state = real
    assert_same(ref, got)
    (mi,) = seen
    mt, lrid = mi[1], mi[4]
    assert lrid.shape[0] == 8 > 5
    assert mt[7].shape[0] >= lrid.shape[0]
    g = mt[6]
    assert g[G_LAZY] == 1 and g[G_STEP] == g[G_OFF] + g[G_NS] - 1

