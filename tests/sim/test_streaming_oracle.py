"""Streamed replay of the prefetchers that read the future routing (``oracle_prefetch``,
``speculative_prefetch``): each chunk's oracle table is its own steps and a look-ahead window
of the next ``(L - 1 + lookahead) // L`` steps, read from as many following chunks as they
span (``sim.stream._oracle_tables``); the run's end cuts it short as in memory. Compared with
the in-memory run, every counter and float to the bit: the embedded trace (chunks of 1, 5 and
all requests, batches, Belady eviction, the speculative table's draws) and random traces of
short requests whose look-ahead crosses several chunk boundaries (hypothesis). The window
itself is checked against the whole run's keys, and it reads no further ahead than it needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies.speculative_prefetch import SpeculativePrefetch
from moesim.sim import build_workload, simulate
from moesim.sim.stream import _oracle_tables, _window_steps, simulate_stream
from moesim.traces import load_trace
from moesim.traces.trace import RequestRouting, Trace
from tests.sim.test_streaming import (
    _kwargs,
    _random_trace,
    assert_same,
    same_or_same_error,
)

ORACLES = [
    "oracle_prefetch",
    {"name": "oracle_prefetch", "point": "pre_attention", "lookahead": 0},  # no window
    {"name": "oracle_prefetch", "point": "routed", "lookahead": 60},  # 3 steps on (26 layers)
    {"name": "speculative_prefetch", "recall": 0.6},
    {"name": "oracle_prefetch", "eviction": "belady", "lookahead": 2},
    {"name": "speculative_prefetch", "eviction": "fifo", "lookahead": 27},
]


@pytest.fixture(scope="module")
def embedded() -> Path:
    from moesim.traces.collect.embedded import embedded_routing

    return embedded_routing()


@pytest.mark.parametrize("policy", ORACLES)
@pytest.mark.parametrize(("mode", "batch"), [("timed", 1), ("zero_latency", 1), ("timed", 4)])
def test_embedded_oracles(embedded: Path, policy: str | dict, mode: str, batch: int) -> None:
    """The embedded trace (64 requests), chunks of 1, 5 and every request (the last chunk
    included), as in memory; the prefetcher did prefetch."""
    trace = load_trace(embedded)
    kw = {**_kwargs(mode, capacity=60, warmup=2), "batch": batch}
    ref = simulate(trace, policy, **kw)
    assert ref.summary["sim_engine"] == "compiled"
    assert ref.summary["prefetch_transfers"] > 0
    for chunk in (1, 5, 1000):
        assert_same(ref, simulate_stream(embedded, policy, chunk_requests=chunk, **kw))


@pytest.mark.parametrize("extra", [{"reset_per_request": True},
                                   {"warmup_extra_row": True, "warmup_tokens": 3},
                                   {"replay": "prefill", "prefill_chunk": 16, "batch": 3},
                                   {"prefill": "random", "seed": 5, "partition": "per_layer",
                                    "capacity": 80}])
def test_embedded_oracle_with_options(embedded: Path, extra: dict) -> None:
    """Resets per request, MoE-Beyond's warm-up row, prefill replay in batches, a random
    prefill with per-layer partitions: the oracle streamed as in memory."""
    trace = load_trace(embedded)
    kw = {**_kwargs("timed", capacity=50), **extra}
    for policy in ("oracle_prefetch", "speculative_prefetch"):
        ref = simulate(trace, policy, **kw)
        assert ref.summary["sim_engine"] == "compiled"
        assert_same(ref, simulate_stream(embedded, policy, chunk_requests=3, **kw))


def _short_trace(seed: int, n_req: int, layers: int, experts: int, top_k: int) -> Trace:
    """Random routing whose requests are 1 to 3 tokens long (a look-ahead of a few steps
    crosses several one-request chunks)."""
    trace = _random_trace(seed, n_req, layers, experts, top_k, partial=True, prompts=True)
    reqs = []
    for i, r in enumerate(trace.requests):
        n = min(r.num_tokens, 1 + (seed + i) % 3)
        reqs.append(RequestRouting(r.request_id, r.experts[:n], r.phase[:n]))
    return Trace(trace.meta, reqs)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_req=st.integers(1, 12), layers=st.integers(1, 4),
       experts=st.integers(3, 8), top_k=st.integers(1, 3),
       name=st.sampled_from(["oracle_prefetch", "speculative_prefetch"]),
       eviction=st.sampled_from(["lru", "belady", "lfu"]), lookahead=st.integers(0, 12),
       point=st.sampled_from(["pre_attention", "routed", "demand_issued"]),
       mode=st.sampled_from(["timed", "zero_latency"]), chunk=st.integers(1, 6),
       batch=st.integers(1, 3), replay=st.sampled_from(["decode", "prefill"]),
       spare=st.integers(0, 6), warmup=st.integers(0, 2), reset=st.booleans())
def test_property_oracle_streamed_equals_in_memory(
        seed: int, n_req: int, layers: int, experts: int, top_k: int, name: str, eviction: str,
        lookahead: int, point: str, mode: str, chunk: int, batch: int, replay: str, spare: int,
        warmup: int, reset: bool) -> None:
    """Short requests, look-ahead up to 12 layers (up to 12 steps of one layer: across as
    many one-request chunks), chunks of 1 to 6 requests, batches and prefill replay, Belady
    eviction beside it, the speculative table's draws: streamed == in memory, or the same
    error."""
    top_k = min(top_k, experts)
    trace = _short_trace(seed, n_req, layers, experts, top_k)
    capacity = min(min(batch, n_req) * top_k + 1 + spare, layers * experts)
    policy = {"name": name, "eviction": eviction, "lookahead": lookahead, "point": point}
    if name == "speculative_prefetch":
        policy["recall"] = 0.5
    kw = {**_kwargs(mode, capacity, warmup), "batch": batch, "replay": replay,
          "prefill_chunk": 1, "seed": seed, "reset_per_request": reset and batch == 1}
    same_or_same_error(trace, policy, chunk, 3, kw)


class _Pulled:
    """The chunks of a list, counting how many were taken."""

    def __init__(self, chunks: list) -> None:
        self.chunks, self.taken = chunks, 0

    def __iter__(self):
        for c in self.chunks:
            self.taken += 1
            yield c


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n_req=st.integers(1, 12), layers=st.integers(1, 4),
       batch=st.integers(1, 3), lookahead=st.integers(0, 14), cut=st.integers(1, 4))
def test_window_is_the_whole_runs_next_steps(seed: int, n_req: int, layers: int, batch: int,
                                             lookahead: int, cut: int) -> None:
    """Each chunk's table is the whole run's keys from its first step to ``window`` steps
    past its last (fewer at the run's end), whatever the chunks' widths; the chunks are read
    no further ahead than the window needs (memory: the chunk and the window)."""
    from moesim.sim.stream import _batched_chunks

    trace = _short_trace(seed, n_req, layers, 6, 2)
    replay = "decode"
    ref = build_workload(trace, batch=batch)
    if batch == 1:
        parts = [(build_workload(Trace(trace.meta, trace.requests[i:i + cut])), np.zeros(0))
                 for i in range(0, n_req, cut)]
    else:
        parts = list(_batched_chunks([trace.requests[i:i + cut] for i in range(0, n_req, cut)],
                                     ref.shape, replay, batch, 0, 0))
    window = _window_steps(layers, lookahead)
    source = _Pulled(parts)
    s0 = 0
    for c, (w, _, table) in enumerate(_oracle_tables(source, window)):
        want = ref.keys[s0:min(s0 + w.num_steps + window, ref.num_steps)]
        width = max(want.shape[2], table.shape[2])
        pad = [np.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2])), constant_values=-1)
               for a in (table, want)]
        np.testing.assert_array_equal(pad[0], pad[1])
        # read ahead: the chunks after this one, all but the last needed to reach the window
        after = [p[0].num_steps for p in parts[c + 1:source.taken]]
        assert sum(after[:-1]) < window or not after
        s0 += w.num_steps
    assert s0 == ref.num_steps and source.taken == len(parts)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), cuts=st.lists(st.integers(1, 30)),
       recall=st.sampled_from([0.0, 0.3, 0.8, 1.0]))
def test_thinned_chunks_draw_as_the_whole_table(seed: int, n: int, cuts: list[int],
                                                recall: float) -> None:
    """Thinning chunk by chunk (narrower chunks included) keeps exactly the experts the
    in-memory table keeps: the same draws, step by step."""
    rng = np.random.default_rng(seed)
    width = 3
    valid = np.arange(width) < rng.integers(0, width + 1, (n, 2, 1))  # left-packed rows
    keys = np.where(valid, rng.integers(0, 9, (n, 2, width)), -1).astype(np.int32)
    drop = np.random.default_rng(seed + 1).random(keys.shape) >= recall
    want = np.where(drop, np.int32(-1), keys)
    chunk_rng = np.random.default_rng(seed + 1)

    def thin(part: np.ndarray) -> np.ndarray:
        return SpeculativePrefetch.thin(chunk_rng, recall, part, width=width)
    got, s = [], 0
    for cut in [*cuts, n]:
        part = keys[s:s + cut]
        w = max(1, int(valid[s:s + cut].sum(axis=2).max()))  # a chunk's own width
        thinned = thin(part[:, :, :w])
        got.append(np.pad(thinned, ((0, 0), (0, 0), (0, width - w)), constant_values=-1))
        s += part.shape[0]
        if s >= n:
            break
    np.testing.assert_array_equal(np.concatenate(got), want)


def test_real_trace_oracle(tmp_path: Path) -> None:
    """MoE-Beyond's DeepSeek-V2-Lite test prompts (100 requests), timed, 10 % of the
    experts: the oracle at batch 1 (chunks of 1 and 16 requests) and the speculative
    pre-loader at batch 8 (chunks of 5)."""
    from moesim.traces import import_trace
    from tests.traces.fixtures import require_shared

    src = require_shared("deepseek_v2_lite_moe-beyond/formatted_csvs")
    path = import_trace("moe-beyond-csv", src, tmp_path / "ds.parquet").out
    trace = load_trace(path)
    kw = _kwargs("timed", capacity=166)
    ref = simulate(trace, "oracle_prefetch", **kw)
    for chunk in (1, 16):
        assert_same(ref, simulate_stream(path, "oracle_prefetch", chunk_requests=chunk, **kw))
    kw["batch"] = 8
    ref = simulate(trace, "speculative_prefetch", **kw)
    assert_same(ref, simulate_stream(path, "speculative_prefetch", chunk_requests=5, **kw))
