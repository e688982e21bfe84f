"""Streaming replay: a trace larger than memory, replayed from its Parquet file chunk by chunk.

The in-memory path (:func:`sim.run.simulate`) builds the workload of the whole trace (~81 B per
token-layer for LRU, ~130 B for Belady). Here the trace is read ``chunk_requests`` requests at a
time (``traces.store.iter_request_chunks``), each chunk becomes a workload of its own, and the
compiled kernel (``sim.compiled.kernel.replay``) resumes on it from the state (``S``, ``F``,
layer counters) the previous chunk left: the kernel's rules are the in-memory run's, so every
counter is identical (``tests/sim/test_streaming.py``). Memory is one chunk plus the per-step
figures the exact totals need (a step's time, counted flag and token counts: 17 B per step,
twice that while they are summed at the end; a step is L token-layers).

Positions (the key slots that Belady ranks by next use) count from the chunk's start. Between
chunks the carried positions move by the chunk's length: each key's next-use cursor is set to
its first position at or after the new chunk's start, and Belady's stored next uses shift by
the same amount (a uniform shift keeps every heap order). Next uses that lie in later chunks
come from a backward pass: a first pass over the file records every chunk's first position of
each key (one row of ``num_keys`` integers per chunk, in a temporary file), a backward sweep
over those rows gives each chunk the first position of each key after it, and the replay pass
links a chunk's positions from its own keys and that row: exact, never a look-ahead window.

Supported: batch 1, ``replay=decode``, the compiled engine's evictions without a prefetch
policy (``lru`` and ``belady`` among them), timed or zero-latency. Anything else is refused with
one error naming the option (never an in-memory fallback).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from moesim.policies.base import Knowledge, NoPrefetch
from moesim.policies.belady import Belady
from moesim.policies.moe_infinity import MoEInfinityLFU
from moesim.policies.registry import PolicySpec, as_spec
from moesim.sim.cache import SimulationError
from moesim.sim.engine import CacheOptions, Mode, RunOptions, Simulation
from moesim.sim.hardware import ComputeTimes, TransferModel
from moesim.sim.link import NO_RULES
from moesim.sim.metrics import (
    RunResult,
    build_result,
    per_request_table,
    phase_times,
    tpot_percentiles,
)
from moesim.sim.workload import Workload, build_workload
from moesim.traces.store import iter_request_chunks, read_meta
from moesim.traces.trace import Trace, TraceMeta

DEFAULT_CHUNK_REQUESTS = 256
NO_USE = 1 << 62  # as sim.compiled.layout.NO_USE


@dataclass(frozen=True)
class StreamOptions:
    """``run.stream``: replay the trace file in chunks of ``chunk_requests`` requests."""

    enabled: bool = False
    chunk_requests: int = DEFAULT_CHUNK_REQUESTS


def _chunk_links(flat: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``heaps.next_occurrences`` of one chunk's keys, seeded with ``after`` (each key's first
    position after the chunk, chunk-relative, NO_USE if none): the next position of every
    position's key, and each key's first position from the chunk's start on."""
    from moesim.sim.compiled.heaps import next_occurrences_after

    return next_occurrences_after(flat, after)


@numba.njit(cache=True, nogil=True)
def _first_positions(flat: np.ndarray, num_keys: int) -> np.ndarray:
    """Each key's first position in ``flat`` (NO_USE if absent)."""
    first = np.full(num_keys, NO_USE, np.int64)
    for pos in range(flat.shape[0] - 1, -1, -1):
        k = flat[pos]
        if k >= 0:
            first[k] = pos
    return first


@numba.njit(cache=True, nogil=True)
def _rebase(S: np.ndarray, row_s1: int, row_cursor: int, first: np.ndarray,
            delta: int) -> None:
    """Belady's carried positions onto the next chunk: cursors to each key's first position
    from the chunk's start on, the stored next uses (``-next``, in ``row_s1``) shifted by the
    length of the chunk just replayed."""
    for k in range(first.shape[0]):
        S[row_cursor, k] = first[k]
        if S[row_s1, k] != -NO_USE:
            S[row_s1, k] += delta


def _refuse(why: str) -> SimulationError:
    return SimulationError(f"run.stream: {why}")


def _facade(meta: TraceMeta, widths: np.ndarray) -> Workload:
    """A workload of no steps for :class:`Simulation`'s construction: the run's shape and the
    widest step per layer (cache sizing) of the whole trace, nothing per step."""
    from moesim.policies.base import ModelShape

    shape = ModelShape(meta.num_moe_layers, meta.num_experts, meta.top_k, meta.expert_bytes)
    z = np.zeros(0, np.int32)
    return Workload(
        shape=shape, keys=np.zeros((0, shape.num_layers, shape.top_k), np.int32), counts=None,
        pairs=np.zeros((0, shape.num_layers), np.int32), tokens=z, out_tokens=z, context=z,
        counted=np.zeros(0, bool), req_offsets=np.zeros(1, np.int64), req_ids=z, joins={},
        token_start=z, token_end=z, _max_width=widths,
    )


@dataclass(frozen=True)
class TraceOutline:
    """What a run needs to know of a trace file before a streamed replay, without its
    routing: metadata, number of requests and tokens, the longest request (the first
    ``max_requests`` requests when given)."""

    path: Path
    meta: TraceMeta
    lengths: np.ndarray  # tokens per replayed request, file order
    max_requests: int | None = None

    @classmethod
    def read(cls, path: str | Path, max_requests: int | None = None) -> TraceOutline:
        from moesim.traces.store import request_lengths

        lengths = request_lengths(path)
        if max_requests is not None:
            lengths = lengths[:max(0, int(max_requests))]
        return cls(Path(path), read_meta(path), lengths, max_requests)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def longest(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0


class _Steps:
    """The whole run's per-step figures that ``metrics.phase_times`` reads (17 B per step)."""

    def __init__(self, counted: np.ndarray, out_tokens: np.ndarray, tokens: np.ndarray) -> None:
        self.counted = counted
        self.out_tokens = out_tokens
        self.tokens = tokens
        self.num_steps = len(counted)


def simulate_stream(
    path: str | Path,
    policy: str | Mapping[str, Any] | PolicySpec,
    *,
    capacity: int,
    chunk_requests: int = DEFAULT_CHUNK_REQUESTS,
    meta: TraceMeta | None = None,
    max_requests: int | None = None,
    mode: Mode = "timed",
    link: TransferModel | None = None,
    compute: ComputeTimes | None = None,
    partition: str = "global",
    pin_layer: bool = True,
    prefill: str = "empty",
    warmup_tokens: int = 0,
    seed: int = 0,
    dense_before: Sequence[int] | None = None,
    batch_rows: int | None = None,
) -> RunResult:
    """:func:`sim.run.simulate` of the trace file ``path`` (batch 1, decode replay), read and
    replayed ``chunk_requests`` requests at a time; the same result, every counter.

    ``meta``: the trace's metadata to use (e.g. with the model card's expert bytes), default
    the file's; ``max_requests``: only the first that many requests."""
    from moesim.sim import compiled
    from moesim.sim.compiled import kernel
    from moesim.sim.compiled import layout as K
    from moesim.sim.compiled.stamp import compile_notice

    if chunk_requests < 1:
        raise _refuse(f"chunk_requests must be >= 1, got {chunk_requests}")
    spec = as_spec(policy)
    if spec.prefetch is not NoPrefetch:
        raise _refuse(f"policy {spec.name!r} prefetches ({spec.prefetch.__qualname__}); a "
                      "streamed run replays eviction-only policies (prefetch none)")
    if spec.eviction not in compiled.EVICTION:
        raise _refuse(f"eviction {spec.eviction.__qualname__} has no compiled twin")
    if spec.needs(Knowledge.ORACLE) and spec.eviction is not Belady:
        raise _refuse(f"eviction {spec.eviction.name!r} reads the whole run's routing up front "
                      "(oracle); of the oracle policies a streamed run replays belady")
    meta = meta or read_meta(path)
    chunk_kw: dict[str, Any] = {"max_requests": max_requests}
    if batch_rows is not None:
        chunk_kw["batch_rows"] = batch_rows

    def chunks() -> Iterator[Workload]:
        for reqs in iter_request_chunks(path, chunk_requests, **chunk_kw):
            yield build_workload(Trace(meta, reqs), warmup_tokens=warmup_tokens)

    belady = compiled.EVICTION[spec.eviction] == K.EV_BELADY
    num_l, num_e, width = meta.num_moe_layers, meta.num_experts, meta.top_k
    num_k = num_l * num_e
    widths = np.full(num_l, width, np.int64)
    with tempfile.TemporaryFile(prefix="moesim-stream-") as after_file:
        if belady or meta.partial:  # the first pass: widths, each chunk's first positions
            widths, n_chunks = _first_pass(chunks(), num_k, after_file)
            if belady:
                _backward(after_file, n_chunks, num_k)
        sim = Simulation(
            _facade(meta, widths), spec,
            CacheOptions(capacity, partition, pin_layer, prefill, False, 0),
            RunOptions(mode, seed, False, 0, False, "compiled"),
            link_model=link, compute=compute, labels={"layer_ids": list(meta.moe_layers)},
            dense_before=dense_before,
        )
        reason = compiled.why_not(sim)
        if reason is not None:
            raise _refuse(reason)
        if getattr(sim, "rules", None) not in (None, NO_RULES):
            raise _refuse("a runtime's copy rules (swap, compute stream, host_s, fifo, sync) "
                          "are not streamed")
        return _replay(sim, chunks(), after_file if belady else None, compile_notice, kernel)


def simulate_streamed(trace: str | Path | TraceOutline, spec: PolicySpec,
                      stream: StreamOptions, *, replay: str = "decode", batch: int = 1,
                      prefill_chunk: int = 0, reset_per_request: bool = False,
                      warmup_extra_row: bool = False, record_transfers: bool = False,
                      timeline_steps: int = 0, predictions: Any = None, engine: str = "auto",
                      placement: Any = None, host: Any = None, staging: int = 0,
                      **kwargs: Any) -> RunResult:
    """``simulate(..., stream=...)``: the options of :func:`simulate` that a streamed run
    replays go to :func:`simulate_stream`; any other one set is refused by name."""
    asked = {
        "replay": (replay, "decode"), "batch": (batch, 1),
        "cache.reset_per_request": (reset_per_request, False),
        "warmup_extra_row": (warmup_extra_row, False),
        "output.transfers": (record_transfers, False),
        "output.timeline_steps": (timeline_steps, 0), "predictions": (predictions, None),
        "runtime staging buffers": (staging, 0),
    }
    for name, (value, default) in asked.items():
        if value != default:
            raise _refuse(f"{name}={value!r} is not streamed (streamed runs replay batch 1, "
                          f"replay=decode, {name}={default!r})")
    if engine == "python":
        raise _refuse("engine=python: a streamed run is the compiled engine's")
    if placement is not None and not getattr(placement, "is_default", True):
        raise _refuse(f"placement {placement.name!r} is not streamed (only fetch)")
    if not isinstance(trace, TraceOutline):
        if isinstance(trace, Trace):
            raise _refuse("the trace is already in memory; stream it from its file")
        trace = TraceOutline.read(trace)
    return simulate_stream(trace.path, spec, chunk_requests=stream.chunk_requests,
                           meta=trace.meta, max_requests=trace.max_requests, **kwargs)


def _first_pass(chunks: Iterator[Workload], num_k: int,
                out: Any) -> tuple[np.ndarray, int]:
    """Write each chunk's start and first position of every key (global positions) as one
    row; return the widest step per layer over the whole trace and the number of chunks."""
    widths: np.ndarray | None = None
    start = 0
    n = 0
    for w in chunks:
        flat = w.keys.reshape(-1)
        first = _first_positions(flat, num_k)
        first[first != NO_USE] += start
        out.write(first.tobytes())
        start += flat.shape[0]
        mw = w.max_width()
        widths = mw if widths is None else np.maximum(widths, mw)
        n += 1
    if widths is None:
        raise _refuse("the trace has no requests")
    return widths.astype(np.int64), n


def _backward(f: Any, n_chunks: int, num_k: int) -> None:
    """Rewrite each chunk's row (first positions in it) as the first position of every key
    after it: one backward sweep over the rows, carrying the "next seen" map."""
    row = num_k * 8
    seen = np.full(num_k, NO_USE, np.int64)
    for c in range(n_chunks - 1, -1, -1):
        f.seek(c * row)
        first = np.frombuffer(f.read(row), np.int64)
        f.seek(c * row)
        f.write(seen.tobytes())
        seen = np.where(first != NO_USE, first, seen)


def _replay(sim: Simulation, chunks: Iterator[Workload], after_file: Any,
            compile_notice: Any, kernel: Any) -> RunResult:
    from moesim.sim import compiled
    from moesim.sim.compiled import layout as K

    ev_code = compiled.EVICTION[sim.spec.eviction]
    if ev_code == K.EV_VISITS_MIN and sim.spec.eviction is MoEInfinityLFU and (
            sim.spec.eviction_params.get("order") == "max"):
        ev_code = K.EV_VISITS_MAX
    belady = ev_code == K.EV_BELADY
    duration, engines = compiled.link_args(sim)
    pf_code, point, hooks, ahead, top, wrap, warm, table = compiled._prefetch_args(sim)
    hot = np.zeros(sim.shape.num_keys, np.bool_)
    for ev in sim.cache.evictors:
        for k in getattr(ev, "_hot", ()):
            hot[k] = True
    order = compiled._install_order(sim.cache)
    inst_off = np.array([0, len(order)], np.int64)
    inst_keys = np.array(order, dtype=np.int64)
    mi = compiled.mi_arrays(None)
    touch = bool(sim.spec.eviction_params.get("prefetch_touch", True))
    dense_n = np.asarray(sim.dense_before, dtype=np.int64)
    part = np.asarray(sim._part_of_layer, dtype=np.int64)
    caps = np.asarray(sim._caps, dtype=np.int64)
    num_k = sim.shape.num_keys
    dummy_counts = np.zeros((1, 1, 1), np.int32)
    state = compiled.FRESH
    out = None
    steps = tokens = out_tokens = pairs = 0
    counted_parts: list[np.ndarray] = []
    out_parts: list[np.ndarray] = []
    tok_parts: list[np.ndarray] = []
    time_parts: list[np.ndarray] = []
    per_request = []
    compile_notice(kernel.replay)
    start = prev_len = 0  # the chunk's first position in the whole run; the last one's length
    for c, w in enumerate(chunks):
        keys = w.keys
        flat = keys.reshape(-1)
        if belady:
            after_file.seek(c * num_k * 8)
            after = np.frombuffer(after_file.read(num_k * 8), np.int64).copy()
            after[after != NO_USE] -= start
            nocc, cursor = _chunk_links(flat, after)
            if state is not compiled.FRESH:
                _rebase(state[0], K.K_S1, K.K_CURSOR, cursor, prev_len)
        else:
            nocc = cursor = np.zeros(1, np.int64)
        attn, shared, dense_step, cost = compiled._layer_arrays(sim, w)
        resets = np.zeros(w.num_steps, np.bool_)
        iv, fv, layer_counts, layer_stall, step_t, S, F = kernel.replay(
            keys, dummy_counts, False, w.counted, attn, shared, dense_step, dense_n, part, caps,
            sim.shape.num_experts, sim.timed, sim.copts.pin_layer, engines, duration, cost,
            ev_code, hot, touch, pf_code, point, hooks, ahead, top, wrap, warm, table, resets,
            inst_off, inst_keys, nocc, cursor, mi, state,
            compiled.runtime_arrays(sim, cost, w),
        )
        if iv[K.I_ERROR] != 0:  # the error the in-memory run stops with
            compiled.store_counters(sim, iv, fv, layer_counts, layer_stall, engines)
        state = (S, F, layer_counts, layer_stall)
        out = (iv, fv, layer_counts, layer_stall)
        prev_len = flat.shape[0]
        start += prev_len
        mask = w.counted
        steps += int(mask.sum())
        out_tokens += int(w.out_tokens[mask].sum())
        tokens += int(w.tokens[mask].sum())
        pairs += int(w.pairs[mask].sum())
        counted_parts.append(mask)
        out_parts.append(w.out_tokens)
        tok_parts.append(w.tokens)
        if sim.timed:
            time_parts.append(step_t)
        per_request.append(per_request_table(w, step_t if sim.timed else None))
        del w, keys, flat, nocc
    if out is None:
        raise _refuse("the trace has no requests")
    iv, fv, layer_counts, layer_stall = out
    compiled.store_counters(sim, iv, fv, layer_counts, layer_stall, engines)
    sim.engine_used = "compiled"
    c = sim.c
    c.steps, c.out_tokens, c.tokens, c.pairs = steps, out_tokens, tokens, pairs
    c.step_times = None
    result = build_result(sim)  # per-step figures of the facade: none; filled in below
    whole = _Steps(np.concatenate(counted_parts), np.concatenate(out_parts),
                   np.concatenate(tok_parts))
    times = np.concatenate(time_parts) if sim.timed else None
    result.summary.update(phase_times(whole, times))
    import pandas as pd

    table = pd.concat(per_request, ignore_index=True)
    result.summary.update(tpot_percentiles(table))
    result.per_request = table
    return result
