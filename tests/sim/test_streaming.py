"""Streamed replay (``sim.stream``) gives the in-memory run's result, every counter.

The trace is read from its Parquet file in chunks of requests and the compiled kernel resumes
on each chunk; Belady's next uses come from a backward pass over the chunks; batches carry
their running requests across chunks; MoE-Infinity's EAMC and the cache resets carry too.
Compared here: the whole summary, the per-layer and per-request tables, on the embedded trace,
random small traces (hypothesis: lengths, prompts, partial rows, batches, prefill replay,
prefetchers, resets, chunk sizes down to one request, row batches that split requests) and a
real trace from ``../shared`` (skipped when absent). The prefetchers that read the future
routing: ``test_streaming_oracle.py``; those that read a prediction table:
``test_streaming_tables.py``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.sim import FixedCompute, FixedLink, SimulationError, simulate
from moesim.sim.stream import simulate_stream
from moesim.traces import load_trace, write_trace
from moesim.traces.trace import DECODE, PREFILL, RequestRouting, Trace, TraceMeta
from tests.traces.fixtures import require_shared

LINK = FixedLink(latency_s=1e-4, bandwidth_Bps=2e9)
COMPUTE = FixedCompute(attention_s=2e-5, router_s=1e-6, expert_s=3e-5, shared_s=1e-5)


def _kwargs(mode: str, capacity: int, warmup: int = 0) -> dict:
    kw: dict = dict(capacity=capacity, mode=mode, warmup_tokens=warmup)
    if mode == "timed":
        kw.update(link=LINK, compute=COMPUTE)
    else:
        kw["pin_layer"] = False
    return kw


def assert_same(a, b) -> None:
    """Every summary value (NaN equal to NaN), the per-layer and per-request tables, every
    float to the bit (``check_exact``: pandas compares floats to 1e-5 by default)."""
    assert list(a.summary) == list(b.summary)
    for key, x in a.summary.items():
        y = b.summary[key]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), key
        else:
            assert x == y, (key, x, y)
    pd.testing.assert_frame_equal(a.per_layer, b.per_layer, check_exact=True)
    pd.testing.assert_frame_equal(a.per_request, b.per_request, check_exact=True)


@pytest.fixture(scope="module")
def embedded() -> Path:
    from moesim.traces.collect.embedded import embedded_routing

    return embedded_routing()


@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("mode", ["timed", "zero_latency"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_embedded_trace(embedded: Path, policy: str, mode: str, chunk: int) -> None:
    trace = load_trace(embedded)
    kw = _kwargs(mode, capacity=30, warmup=2)
    ref = simulate(trace, policy, **kw)
    assert ref.summary["sim_engine"] == "compiled"
    assert_same(ref, simulate_stream(embedded, policy, chunk_requests=chunk, **kw))


@pytest.mark.parametrize("policy", ["fifo", "lfu", "least_stale", "fate_arc",
                                    "moe_infinity_lfu", "moe_infinity_priority"])
def test_other_evictions(embedded: Path, policy: str) -> None:
    trace = load_trace(embedded)
    kw = _kwargs("timed", capacity=40)
    if policy == "fate_arc":
        kw.update(partition="per_layer", capacity=60)
    assert_same(simulate(trace, policy, **kw),
                simulate_stream(embedded, policy, chunk_requests=7, **kw))


@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_random_prefill_per_layer_and_engines(embedded: Path, policy: str) -> None:
    """A randomly prefilled cache (the run's seeded draws), per-layer partitions, two copy
    engines: as in memory."""
    trace = load_trace(embedded)
    kw = {**_kwargs("timed", capacity=60), "prefill": "random", "seed": 3,
          "partition": "per_layer", "link": FixedLink(latency_s=1e-4, bandwidth_Bps=2e9,
                                                      copy_engines=2)}
    assert_same(simulate(trace, policy, **kw),
                simulate_stream(embedded, policy, chunk_requests=6, **kw))


def test_max_requests_and_card_bytes(embedded: Path) -> None:
    """``meta`` replaces the file's (the app passes the model card's expert bytes)."""
    trace = load_trace(embedded, max_requests=9)
    meta = replace(trace.meta, expert_bytes=trace.meta.expert_bytes * 3)
    kw = _kwargs("timed", capacity=25)
    ref = simulate(Trace(meta, trace.requests), "belady", **kw)
    got = simulate_stream(embedded, "belady", chunk_requests=4, meta=meta, max_requests=9, **kw)
    assert_same(ref, got)


@pytest.mark.parametrize(("policy", "kw", "words"), [
    ("lru", {"chunk_requests": 0}, "chunk_requests"),
    ("static", {}, "oracle"),
])
def test_refused_options_name_themselves(embedded: Path, policy: str, kw: dict,
                                         words: str) -> None:
    with pytest.raises(SimulationError, match=f"run.stream: .*{words}"):
        simulate_stream(embedded, policy, **{**_kwargs("timed", 30), **kw})


def test_errors_match_in_memory(embedded: Path) -> None:
    """A cache too small for a step stops both paths with the same message."""
    trace = load_trace(embedded)
    kw = _kwargs("timed", capacity=2)
    with pytest.raises(SimulationError) as ref:
        simulate(trace, "lru", **kw)
    with pytest.raises(SimulationError) as got:
        simulate_stream(embedded, "lru", chunk_requests=3, **kw)
    assert str(got.value) == str(ref.value)


def _random_trace(seed: int, n_req: int, layers: int, experts: int, top_k: int,
                  partial: bool, prompts: bool = False) -> Trace:
    """Random routing; ``prompts``: each request opens with a prompt of 0 to all its tokens
    (phase PREFILL), the rest decode."""
    rng = np.random.default_rng(seed)
    reqs = []
    for r in range(n_req):
        n = int(rng.integers(1, 12))
        ex = np.stack([np.stack([rng.choice(experts, top_k, replace=False)
                                 for _ in range(layers)]) for _ in range(n)]).astype(np.int16)
        if partial:  # whole rows unrecorded, at least one layer per token kept
            drop = rng.random((n, layers)) < 0.3
            drop[:, int(rng.integers(layers))] = False
            ex[drop] = -1
        phase = np.full(n, DECODE, np.uint8)
        if prompts:
            phase[:int(rng.integers(n + 1))] = PREFILL
        reqs.append(RequestRouting(3 * r + 1, ex, phase))
    meta = TraceMeta("synthetic", tuple(range(layers)), experts, top_k, expert_bytes=1000,
                     partial=partial)
    return Trace(meta, reqs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_req=st.integers(1, 9), layers=st.integers(1, 4),
       experts=st.integers(3, 8), top_k=st.integers(1, 3), partial=st.booleans(),
       policy=st.sampled_from(["lru", "belady", "fifo", "lfu"]),
       mode=st.sampled_from(["timed", "zero_latency"]), chunk=st.integers(1, 10),
       batch_rows=st.sampled_from([1, 3, 1 << 18]), spare=st.integers(0, 6),
       warmup=st.integers(0, 3))
def test_property_streamed_equals_in_memory(seed: int, n_req: int, layers: int, experts: int,
                                            top_k: int, partial: bool, policy: str, mode: str,
                                            chunk: int, batch_rows: int, spare: int,
                                            warmup: int) -> None:
    top_k = min(top_k, experts)
    trace = _random_trace(seed, n_req, layers, experts, top_k, partial)
    # a cache of at least a step's need (widest layer + one copy engine), at most every key
    capacity = min(top_k + 1 + spare, layers * experts)
    same_or_same_error(trace, policy, chunk, batch_rows, _kwargs(mode, capacity, warmup))


def same_or_same_error(trace: Trace, policy: str | dict, chunk: int, batch_rows: int,
                       kw: dict) -> None:
    """The trace written to a file and streamed: the in-memory result, or the same error
    (e.g. a cache too small: the streamed run stops alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_trace_file(Path(tmp), trace)
        try:
            ref = simulate(trace, policy, **kw)
        except SimulationError as err:
            with pytest.raises(SimulationError) as got_err:
                simulate_stream(path, policy, chunk_requests=chunk, batch_rows=batch_rows, **kw)
            assert str(got_err.value) == str(err)
            return
        assert ref.summary["sim_engine"] == "compiled"
        got = simulate_stream(path, policy, chunk_requests=chunk, batch_rows=batch_rows, **kw)
    assert_same(ref, got)


POLICIES = ["lru", "belady", "fifo", "lfu", "next_layer_all", "moe_infinity",
            {"name": "moe_infinity", "eviction": "moe_infinity_priority"},
            {"name": "next_layer_all", "eviction": "belady"}]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_req=st.integers(1, 9), layers=st.integers(1, 4),
       experts=st.integers(3, 8), top_k=st.integers(1, 3), partial=st.booleans(),
       policy=st.sampled_from(POLICIES), mode=st.sampled_from(["timed", "zero_latency"]),
       chunk=st.integers(1, 6), batch=st.integers(1, 4),
       replay=st.sampled_from(["decode", "prefill"]), prefill_chunk=st.integers(0, 3),
       reset=st.booleans(), prefill=st.sampled_from(["empty", "random"]),
       spare=st.integers(0, 8), warmup=st.integers(0, 3), extra_row=st.booleans())
def test_property_batches_prefetchers_resets(
        seed: int, n_req: int, layers: int, experts: int, top_k: int, partial: bool,
        policy: str | dict, mode: str, chunk: int, batch: int, replay: str, prefill_chunk: int,
        reset: bool, prefill: str, spare: int, warmup: int, extra_row: bool) -> None:
    """Batches (continuous batching across chunk boundaries), prefill replay with prompts,
    the prefetchers that know only the past, per-request resets, random prefill, MoE-Beyond's
    warm-up row: streamed == in memory, or the same error (resets at batch 1 only: at batch
    > 1 both refuse them, ``test_reset_needs_batch_one_as_in_memory``)."""
    top_k = min(top_k, experts)
    trace = _random_trace(seed, n_req, layers, experts, top_k, partial, prompts=True)
    capacity = min(min(batch, n_req) * top_k + 1 + spare, layers * experts)
    kw = {**_kwargs(mode, capacity, warmup), "batch": batch, "replay": replay,
          "prefill_chunk": prefill_chunk, "reset_per_request": reset and batch == 1,
          "prefill": prefill,
          "seed": seed, "warmup_extra_row": extra_row and batch == 1 and replay == "decode"}
    same_or_same_error(trace, policy, chunk, 3, kw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_req=st.integers(2, 10), layers=st.integers(1, 4),
       experts=st.integers(3, 8), top_k=st.integers(1, 3),
       policy=st.sampled_from(POLICIES[5:7]), chunk=st.integers(1, 4), batch=st.integers(1, 4),
       replay=st.sampled_from(["decode", "prefill"]), spare=st.integers(0, 8),
       warmup=st.integers(0, 3), slots=st.sampled_from([2, 1000]))
def test_property_moe_infinity(seed: int, n_req: int, layers: int, experts: int, top_k: int,
                               policy: str | dict, chunk: int, batch: int, replay: str,
                               spare: int, warmup: int, slots: int) -> None:
    """MoE-Infinity's state across chunks (EAMC, live EAMs and their dot products, suffix
    sums, candidates), timed, with requests running on from chunk to chunk; an EAMC of 2
    slots replaces its entries."""
    top_k = min(top_k, experts)
    trace = _random_trace(seed, n_req, layers, experts, top_k, True, prompts=True)
    capacity = min(min(batch, n_req) * top_k + 1 + spare, layers * experts)
    pol = {"name": policy, "eamc_capacity": slots} if isinstance(policy, str) else {
        **policy, "eamc_capacity": slots}
    kw = {**_kwargs("timed", capacity, warmup), "batch": batch, "replay": replay,
          "prefill_chunk": 2, "seed": seed}
    same_or_same_error(trace, pol, chunk, 3, kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n_req=st.integers(1, 12), batch=st.integers(1, 5),
       replay=st.sampled_from(["decode", "prefill"]), prefill_chunk=st.integers(0, 3),
       warmup=st.integers(0, 3), chunk=st.integers(1, 5), pad=st.integers(0, 2))
def test_batched_chunks_are_the_in_memory_schedule(seed: int, n_req: int, batch: int,
                                                   replay: str, prefill_chunk: int,
                                                   warmup: int, chunk: int, pad: int) -> None:
    """The streamed scheduler's chunks, put end to end, are ``build_workload``'s steps: keys
    (padded to the given width), counts, pairs, tokens, contexts, counted flags, the
    step->request map, units and joins (step numbers shifted by the chunk's start); the
    requests running on from one chunk into the next are named."""
    from moesim.sim.stream import _batched_chunks
    from moesim.sim.workload import build_workload

    if replay == "decode":  # batch 1 decode is build_workload's one-token path, not this
        batch = max(batch, 2)
    trace = _random_trace(seed, n_req, 3, 6, 2, partial=True, prompts=True)
    ref = build_workload(trace, replay=replay, batch=batch, prefill_chunk=prefill_chunk,
                         warmup_tokens=warmup)
    width = ref.keys.shape[2] + pad
    parts = [trace.requests[i:i + chunk] for i in range(0, n_req, chunk)]
    got = list(_batched_chunks(parts, ref.shape, replay, batch, prefill_chunk, warmup, width))
    ws = [w for w, _ in got]
    cat = {name: np.concatenate([getattr(w, name) for w in ws]) for name in (
        "keys", "counts", "pairs", "tokens", "out_tokens", "context", "counted", "req_ids",
        "token_start", "token_end", "req_out")}
    padded = np.full((*ref.keys.shape[:2], width), -1, np.int32)
    padded[:, :, :ref.keys.shape[2]] = ref.keys
    np.testing.assert_array_equal(cat["keys"], padded)
    np.testing.assert_array_equal(cat["counts"][:, :, :ref.keys.shape[2]], ref.counts)
    assert not cat["counts"][:, :, ref.keys.shape[2]:].any()
    for name in ("pairs", "tokens", "out_tokens", "context", "counted", "req_ids",
                 "token_start", "token_end", "req_out"):
        np.testing.assert_array_equal(cat[name], getattr(ref, name), err_msg=name)
    assert np.concatenate([np.diff(w.req_offsets) for w in ws]).tolist() == np.diff(
        ref.req_offsets).tolist()
    joins, start = {}, 0
    for w, running in got:  # the requests of a chunk's last step that run on are carried
        joins.update({start + s: r for s, r in w.joins.items()})
        start += w.num_steps
        if start < ref.num_steps:
            on = set(w.requests_of(w.num_steps - 1)) & set(ref.requests_of(start))
            assert on <= set(running.tolist())
        else:
            assert not len(running)
    assert joins == ref.joins


@pytest.mark.parametrize("policy", ["lru", "belady", "next_layer_all", "moe_infinity"])
@pytest.mark.parametrize(("batch", "replay"), [(4, "decode"), (8, "decode"), (1, "prefill"),
                                               (3, "prefill")])
def test_embedded_batches_and_prefill(embedded: Path, policy: str, batch: int,
                                      replay: str) -> None:
    """The embedded trace (64 requests with prompts) in batches and with prefill replay,
    timed, chunks of 1 and 5 requests."""
    trace = load_trace(embedded)
    kw = {**_kwargs("timed", capacity=60, warmup=2), "batch": batch, "replay": replay,
          "prefill_chunk": 16}
    ref = simulate(trace, policy, **kw)
    assert ref.summary["sim_engine"] == "compiled"
    for chunk in (1, 5):
        assert_same(ref, simulate_stream(embedded, policy, chunk_requests=chunk, **kw))


@pytest.mark.parametrize("policy", [
    "next_layer_all", "moe_infinity",
    {"name": "moe_infinity", "eviction": "moe_infinity_priority"},
    {"name": "moe_infinity", "order": "max", "horizon": 2,
     "prefetch_width": 3, "eamc_capacity": 5}])
@pytest.mark.parametrize("extra", [{}, {"reset_per_request": True},
                                   {"warmup_extra_row": True, "warmup_tokens": 3},
                                   {"mode": "zero_latency", "pin_layer": False}])
def test_embedded_prefetchers_and_resets(embedded: Path, policy: str | dict,
                                         extra: dict) -> None:
    """Prefetchers that know only the past at batch 1, with per-request resets and
    MoE-Beyond's warm-up row (MoE-Infinity's EAMC fills and evicts across chunks: 5 slots)."""
    trace = load_trace(embedded)
    kw = {**_kwargs(extra.get("mode", "timed"), capacity=50), **extra}
    ref = simulate(trace, policy, **kw)
    assert ref.summary["sim_engine"] == "compiled"
    assert_same(ref, simulate_stream(embedded, policy, chunk_requests=3, **kw))


def test_per_request_times_across_chunks_with_batches() -> None:
    """A request whose rows a chunk's finished requests hold alone: summed as that frame
    comes, pandas took ``np.add.reduceat`` there (ids never decrease) and its compensated sum
    in memory (requests interleave), one bit apart in its time per output token."""
    trace = _random_trace(2, 4, 4, 6, 1, partial=False, prompts=True)
    kw = {**_kwargs("timed", 6), "batch": 4, "replay": "prefill", "prefill_chunk": 2}
    same_or_same_error(trace, "lru", 1, 3, kw)


@pytest.mark.parametrize("steps", [
    [[1], [10], [10]],  # ids never decrease: pandas sums by np.add.reduceat (...995)
    [[1, 10], [1, 10]],  # ids decrease: its compensated sum, row by row (...996)
])
def test_request_rows_sum_as_the_whole_frame(steps: list[list[int]]) -> None:
    """``_RequestRows`` at batch > 1: request 10 runs on from the first chunk into the second
    (two more steps); its four times sum to 0.006544499999999995 by ``np.add.reduceat`` and
    to ...996 by pandas' compensated sum, and the table must be the whole frame's."""
    from types import SimpleNamespace

    from moesim.sim.metrics import per_request_table
    from moesim.sim.stream import _RequestRows

    v = [0.0021134999999999995, 0.0015104999999999997, 0.0015104999999999984,
         0.001409999999999998]
    chunks = [steps, [[10], [10]]]
    times = iter([1e-3, *v] if len(steps) == 3 else [1e-3, v[0], 2e-3, v[1], v[2], v[3]])

    def chunk(ids: list[list[int]]) -> tuple[SimpleNamespace, np.ndarray]:
        per = np.array([len(r) for r in ids])
        w = SimpleNamespace(num_steps=len(ids), req_offsets=np.concatenate([[0], per.cumsum()]),
                            req_ids=np.array([i for r in ids for i in r], np.int32),
                            req_out=np.ones(int(per.sum()), bool),
                            counted=np.ones(len(ids), bool))
        return w, np.array([next(times) for _ in range(int(per.sum()))])

    rows = _RequestRows(per_chunk=False)
    whole_ids, whole_t = [], []
    for c, ids in enumerate(chunks):
        w, t = chunk([[i] for r in ids for i in r])  # one row per step: times per row
        rows.add(w, t, np.array([10] if c == 0 else [], np.int64))
        whole_ids.append(w.req_ids)
        whole_t.append(t)
    ids = np.concatenate(whole_ids)
    n = len(ids)
    whole = SimpleNamespace(num_steps=n, req_offsets=np.arange(n + 1), req_ids=ids,
                            req_out=np.ones(n, bool), counted=np.ones(n, bool))
    want = per_request_table(whole, np.concatenate(whole_t))
    pd.testing.assert_frame_equal(rows.table(), want, check_exact=True)
    assert want["time_s"].iloc[-1] == (0.006544499999999995 if len(steps) == 3 else
                                       0.006544499999999996)


def test_moe_infinity_suffix_sums_across_chunks() -> None:
    """MoE-Infinity keeps, per live request, the step its suffix sums were taken at; steps
    count from a chunk's start, so a request running on into a chunk whose step of the same
    number came next reused stale sums (7 hits for 8) until the stream marked them stale."""
    trace = _random_trace(29080, 7, 3, 7, 1, partial=True, prompts=True)
    kw = {**_kwargs("timed", 7, 3), "batch": 4, "replay": "prefill", "seed": 29080}
    for chunk in (2, 3):
        same_or_same_error(trace, "moe_infinity", chunk, 3, kw)


def test_warm_eamc_and_batches(embedded: Path) -> None:
    """MoE-Infinity with a warm EAMC (the paper's offline collection: persistent slots) at
    batch 3, 8 slots so that finished requests replace the non-persistent ones, and Belady at
    the same batch: as in memory."""
    trace = load_trace(embedded)
    warm = Trace(trace.meta, trace.requests[-5:])
    with tempfile.TemporaryDirectory() as tmp:
        warm_path = write_trace_file(Path(tmp), warm)
        policy = {"name": "moe_infinity", "warm_eamc_path": str(warm_path),
                  "eamc_capacity": 8}
        kw = {**_kwargs("timed", capacity=60), "batch": 3}
        ref = simulate(trace, policy, **kw)
        assert ref.summary["sim_engine"] == "compiled"
        assert_same(ref, simulate_stream(embedded, policy, chunk_requests=4, **kw))


def test_exact_widths_when_the_bound_is_too_wide(tmp_path: Path) -> None:
    """Every token routes to experts 0 and 1: a step demands 2 experts per layer, while the
    bound (top-k per token of a batch of 4) says 6. A cache of 3 slots fails the size check
    with the bound, so the first pass finds the exact widths and the run goes on; 2 slots fail
    with the in-memory run's words."""
    reqs = [RequestRouting(r, np.tile(np.array([[0, 1], [1, 0]], np.int16), (5 + r, 1, 1)),
                           np.full(5 + r, DECODE, np.uint8)) for r in range(6)]
    trace = Trace(TraceMeta("synthetic", (0, 1), 6, 2, expert_bytes=1000), reqs)
    path = write_trace_file(tmp_path, trace)
    kw = {**_kwargs("timed", capacity=3), "batch": 4}
    assert_same(simulate(trace, "lru", **kw),
                simulate_stream(path, "lru", chunk_requests=2, **kw))
    kw["capacity"] = 2
    with pytest.raises(SimulationError) as ref:
        simulate(trace, "lru", **kw)
    with pytest.raises(SimulationError) as got:
        simulate_stream(path, "lru", chunk_requests=2, **kw)
    assert str(got.value) == str(ref.value)


def test_moe_infinity_beyond_batch_64(embedded: Path) -> None:
    """At batch 80 MoE-Infinity's live buffers are sized by the first pass (the most
    requests in one step: the embedded trace's 64)."""
    trace = load_trace(embedded)
    kw = {**_kwargs("timed", capacity=60), "batch": 80}
    ref = simulate(trace, "moe_infinity", **kw)
    assert ref.summary["sim_engine"] == "compiled"
    assert_same(ref, simulate_stream(embedded, "moe_infinity", chunk_requests=9, **kw))


def test_reset_needs_batch_one_as_in_memory(embedded: Path) -> None:
    trace = load_trace(embedded, max_requests=5)
    kw = {**_kwargs("timed", 60), "batch": 2, "reset_per_request": True}
    with pytest.raises(SimulationError) as ref:
        simulate(trace, "lru", **kw)
    with pytest.raises(SimulationError) as got:
        simulate_stream(embedded, "lru", chunk_requests=2, max_requests=5, **kw)
    assert str(got.value) == str(ref.value) == "cache.reset_per_request needs batch size 1"


def write_trace_file(folder: Path, trace: Trace) -> Path:
    path = folder / "t.parquet"
    write_trace(path, trace.meta, trace.requests, row_group_rows=5)
    return path


def test_real_trace(tmp_path: Path) -> None:
    """MoE-Beyond's DeepSeek-V2-Lite test prompts (100 requests, 1,543 tokens), timed, LRU
    and Belady at 10 % of the experts, chunks of 1 and 16 requests; batch 8 with Belady and
    MoE-Infinity, chunks of 5."""
    from moesim.traces import import_trace

    src = require_shared("deepseek_v2_lite_moe-beyond/formatted_csvs")
    path = import_trace("moe-beyond-csv", src, tmp_path / "ds.parquet").out
    trace = load_trace(path)
    kw = _kwargs("timed", capacity=166)
    for policy in ("lru", "belady"):
        ref = simulate(trace, policy, **kw)
        for chunk in (1, 16):
            assert_same(ref, simulate_stream(path, policy, chunk_requests=chunk, **kw))
    # batches of 8 (requests running across chunks) with Belady and MoE-Infinity's prefetcher
    kw["batch"] = 8
    for policy in ("belady", "moe_infinity"):
        ref = simulate(trace, policy, **kw)
        assert_same(ref, simulate_stream(path, policy, chunk_requests=5, **kw))


def _app_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from moesim.experiments.configs import CONF_DIR, register_configs
    from moesim.experiments.schema import check

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["trace=embedded", "progress=false", *overrides])
    assert check(cfg) == []
    return cfg


@pytest.mark.parametrize("policy", ["lru", "belady", "oracle_prefetch"])
def test_app_option_streams_and_says_so(policy: str) -> None:
    """``run.stream=true`` gives the same tables; the row records that the run streamed."""
    from moesim.experiments import sim_app

    over = [f"policy={policy}", "warmup_tokens=1", "max_requests=20"]
    ref, ref_row = sim_app.run(_app_cfg(*over))
    got, row = sim_app.run(_app_cfg(*over, "run.stream=true", "run.chunk_requests=3"))
    assert_same(ref, got)
    assert (ref_row["run.stream"], row["run.stream"], row["run.chunk_requests"]) == (
        False, True, 3)
    for key in ("trace.requests", "trace.tokens", "cache.slots", "expert_bytes"):
        assert row[key] == ref_row[key], key


@pytest.mark.parametrize("policy", ["moe_infinity", "belady"])
def test_app_streams_batches(policy: str) -> None:
    """``batch=4`` with a prefetcher (and Belady), streamed through the app: the same tables."""
    from moesim.experiments import sim_app

    over = [f"policy={policy}", "batch=4", "warmup_tokens=1", "max_requests=20"]
    ref, _ = sim_app.run(_app_cfg(*over))
    got, row = sim_app.run(_app_cfg(*over, "run.stream=true", "run.chunk_requests=3"))
    assert_same(ref, got)
    assert (row["run.stream"], row["batch"]) == (True, 4)


@pytest.mark.parametrize(("overrides", "words"), [
    (["policy=prediction_prefetch"], "prefetches from a prediction table"),
    (["max_tokens=3"], "max_tokens"),
    (["output.transfers=true"], "output.transfers=True is not streamed"),
    (["engine=python"], "engine=python"),
])
def test_app_refuses_what_it_cannot_stream(overrides: list[str], words: str) -> None:
    from moesim.experiments import sim_app

    with pytest.raises(SimulationError, match=f"^run.stream: .*{words}"):
        sim_app.run(_app_cfg("run.stream=true", *overrides))


def test_request_lengths_across_row_batches(tmp_path: Path) -> None:
    """The outline's request lengths (key columns only) match the decoded requests, also
    when row groups split requests."""
    from moesim.traces.store import request_lengths

    trace = _random_trace(5, 7, 3, 6, 2, partial=True)
    path = write_trace_file(tmp_path, trace)
    want = [r.num_tokens for r in trace.requests]
    for rows in (1, 2, 3, 7, 1 << 18):
        assert request_lengths(path, batch_rows=rows).tolist() == want, rows
