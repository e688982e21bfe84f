"""Streaming replay: a trace larger than memory, replayed from its Parquet file chunk by chunk.

The in-memory path (:func:`sim.run.simulate`) builds the workload of the whole trace (~81 B per
token-layer for LRU, ~130 B for Belady). Here the trace is read ``chunk_requests`` requests at a
time (``traces.store.iter_request_chunks``), each chunk becomes a workload of its own, and the
compiled kernel (``sim.compiled.kernel.replay``) resumes on it from the state (``S``, ``F``,
layer counters) the previous chunk left: the kernel's rules are the in-memory run's, so every
counter is identical (``tests/sim/test_streaming.py``). Memory is one chunk plus the per-step
figures the exact totals need (a step's time, counted flag and token counts: 17 B per step,
twice that while they are summed at the end; a step is L token-layers) and the per-request
table (a row per request).

Positions (the key slots that Belady ranks by next use) count from the chunk's start. Between
chunks the carried positions move by the chunk's length: each key's next-use cursor is set to
its first position at or after the new chunk's start, and Belady's stored next uses shift by
the same amount (a uniform shift keeps every heap order). Next uses that lie in later chunks
come from a backward pass: a first pass over the file records every chunk's first position of
each key (one row of ``num_keys`` integers per chunk, in a temporary file), a backward sweep
over those rows gives each chunk the first position of each key after it, and the replay pass
links a chunk's positions from its own keys and that row: exact, never a look-ahead window.

Batches (``batch`` > 1) and ``replay=prefill``: the steps are scheduled as ``sim.workload``
schedules them (continuous batching: a request joins when one finishes), by a scheduler that
carries the running requests across chunks (:func:`_batched_chunks`); a chunk of steps ends
where the requests read so far have all joined, its keys are padded to the whole run's widest
step for Belady (found by the first pass) so that positions are the in-memory run's; a
request's row of the per-request table is summed when it finishes (:class:`_RequestRows`).
The first pass (a second read of the file) runs only where it is needed: Belady, Fate's
per-layer split (each layer's widest step), MoE-Infinity beyond batch 64 (its live-request
buffers), and a cache-size check that fails with a bound on the widest step. Prefetchers that
know only the past (``next_layer_all``; ``moe_infinity``, whose EAMC and live requests' EAMs
are arrays the kernel updates in place, handed on from chunk to chunk, the step its suffix
sums were taken at marked stale) and ``cache.reset_per_request`` (a fresh cache drawn per
joining request, in the run's order) are streamed too.

The prefetchers that read the future routing (``oracle_prefetch``, ``speculative_prefetch``)
look a bounded distance ahead: at layer j of step s, layer-step ``s * L + j + lookahead``,
at most ``(L - 1 + lookahead) // L`` steps on. Each chunk is replayed with a table of its own
steps' keys and that many steps after it (:func:`_oracle_tables`: the following chunks are
read ahead, as many as the window spans, and held until replayed); the window stops short
only where the run ends, and the kernel asks for nothing past the table's last row, as the
in-memory run does past its last step. ``speculative_prefetch`` thins each chunk's keys with
its own generator's draws in the in-memory table's order (``SpeculativePrefetch.thin``).

The prefetchers that read a prediction table (``prediction_prefetch``, ``moe_beyond_replay``)
replay each chunk with its own prediction view (:class:`_PredictionChunks`): the union over
each step's tokens of their predicted experts, as in memory (a step's row never reads another
step's), from the chunk's requests' rows, read from the table file row group by row group
(``sim.predictions.PredictionFile``: memory bounded by the chunk's requests and the row groups
holding them) or taken from an in-memory table. The coverage counts per layer are summed over
the chunks: below ``predictions.min_coverage`` the in-memory error (the same function,
``sim.predictions.check_coverage``) once the last chunk is read; a run that cannot reach it
whatever its later chunks cover (at some layer, more pairs lack a prediction than the
threshold allows of an upper bound of the run's pairs: its tokens) stops before replaying
further, with an error naming the table, the trace and the first request lacking one.

Refused with one error naming the option (never an in-memory fallback): a prediction-table
prefetcher without a table handed on (``moesim-sim`` opens ``predictions.path`` as a
:class:`~moesim.sim.predictions.PredictionFile`), placements other than ``fetch``, a
runtime's copy rules, transfer records and timelines, the SimPy engine.
"""

from __future__ import annotations

import functools
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd

from moesim.policies.base import Knowledge, ModelShape
from moesim.policies.belady import Belady
from moesim.policies.moe_infinity import MoEInfinity
from moesim.policies.oracle_prefetch import OraclePrefetch
from moesim.policies.registry import PolicySpec, as_spec
from moesim.policies.speculative_prefetch import SpeculativePrefetch
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
from moesim.sim.workload import (
    Replay,
    Workload,
    build_workload,
    check_replay_options,
)
from moesim.traces.store import iter_request_chunks, read_meta
from moesim.traces.trace import RequestRouting, Trace, TraceMeta

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


@numba.njit(cache=True, nogil=True)
def _recode(pos: np.ndarray, step_from: int, width_from: int, step_to: int, width_to: int,
            num_l: int) -> None:
    """Positions ``((s - step_from) * L + j) * width_from + r`` rewritten in place as
    ``((s - step_to) * L + j) * width_to + r`` (NO_USE kept): between a chunk's own keys
    array and the first pass's whole-run numbering (width = the number of experts, an upper
    bound of any step's width, before the run's widest step is known). The order of
    positions is kept, so Belady's choices are."""
    for i in range(pos.shape[0]):
        p = pos[i]
        if p != NO_USE:
            row = p // width_from
            r = p - row * width_from
            s = row // num_l
            j = row - s * num_l
            pos[i] = ((s + step_from - step_to) * num_l + j) * width_to + r


def _refuse(why: str) -> SimulationError:
    return SimulationError(f"run.stream: {why}")


def _facade(shape: ModelShape, widths: np.ndarray, first_step_requests: int) -> Workload:
    """A workload of no steps for :class:`Simulation`'s construction: the run's shape and the
    widest step per layer (cache sizing) of the whole trace, and how many requests its first
    step runs (the check of ``cache.reset_per_request``), nothing per step."""
    z = np.zeros(0, np.int32)
    return Workload(
        shape=shape, keys=np.zeros((0, shape.num_layers, shape.top_k), np.int32), counts=None,
        pairs=np.zeros((0, shape.num_layers), np.int32), tokens=z, out_tokens=z, context=z,
        counted=np.zeros(0, bool), req_offsets=np.array([0, first_step_requests], np.int64),
        req_ids=z, joins={}, token_start=z, token_end=z, _max_width=widths,
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


class _Rows:
    """Request rows (one per request and step) as the one-step-per-row workload that
    ``metrics.per_request_table`` reads."""

    def __init__(self, req_ids: np.ndarray, req_out: np.ndarray, counted: np.ndarray) -> None:
        self.req_ids = req_ids
        self.req_out = req_out
        self.counted = counted
        self.num_steps = len(req_ids)
        self.req_offsets = np.arange(len(req_ids) + 1, dtype=np.int64)


class _RequestRows:
    """The per-request table of a streamed run, exactly the in-memory one, in memory bounded
    by the requests (not their rows).

    pandas sums a request's times with ``np.add.reduceat`` when the frame's request ids never
    decrease and no time is NaN, else with its compensated sum, row by row: per request either
    way, but the whole frame decides which. At batch 1 every chunk holds whole requests in file
    order (ascending ids), as the whole run's frame does, so each chunk's table is built as it
    ends. With batches a request's rows interleave with others' and may span chunks: the rows
    of the requests still running wait for the next chunk, and each finished request is summed
    both ways (its rows alone in ascending order, and behind a decreasing id), the whole run's
    order choosing one at the end."""

    def __init__(self, per_chunk: bool) -> None:
        self._per_chunk = per_chunk
        z = np.zeros(0)
        self._carry: tuple[np.ndarray, ...] = (z.astype(np.int32), z.astype(bool), z)
        self._ascending: list[pd.DataFrame] = []  # finished requests, summed by reduceat
        self._mixed: list[pd.DataFrame] = []  # the same, by the compensated sum
        self._monotonic = True  # the whole run's counted rows never decrease in id
        self._last = -1

    def add(self, w: Workload, step_t: np.ndarray | None, running: np.ndarray) -> None:
        if self._per_chunk:
            self._ascending.append(per_request_table(w, step_t))
            return
        step_of = np.repeat(np.arange(w.num_steps), np.diff(w.req_offsets))
        keep = np.asarray(w.counted, bool)[step_of]
        out = w.req_out if w.req_out is not None else np.ones(len(w.req_ids), bool)
        new = (np.asarray(w.req_ids)[keep], np.asarray(out)[keep],
               step_t[step_of[keep]] if step_t is not None else np.full(int(keep.sum()), np.nan))
        ids = new[0]
        if len(ids):
            if ids[0] < self._last or (np.diff(ids) < 0).any():
                self._monotonic = False
            self._last = int(ids[-1])
        rows = [np.concatenate(pair) for pair in zip(self._carry, new, strict=True)]
        wait = np.isin(rows[0], running)
        self._carry = tuple(r[wait] for r in rows)
        ids, out, times = (r[~wait] for r in rows)
        if not len(ids):
            return
        order = np.argsort(ids, kind="stable")  # each request's rows together, in step order
        ids, out, times = ids[order], out[order], times[order]
        timed = step_t is not None
        self._ascending.append(per_request_table(
            _Rows(ids, out, np.ones(len(ids), bool)), times if timed else None))
        top = int(ids.max()) + 1  # a first row of a larger id: the ids decrease after it
        mixed = per_request_table(
            _Rows(np.concatenate([[top], ids]).astype(np.int64), np.concatenate([[False], out]),
                  np.ones(len(ids) + 1, bool)),
            np.concatenate([[0.0], times]) if timed else None)
        self._mixed.append(mixed[mixed["request_id"] != top])

    def table(self) -> pd.DataFrame:
        parts = self._ascending if self._monotonic else self._mixed
        if not parts:  # no counted row at all
            z = np.zeros(0, np.int32)
            parts = [per_request_table(_Rows(z, z.astype(bool), z.astype(bool)), None)]
        table = pd.concat(parts, ignore_index=True)
        if self._per_chunk:
            return table
        return table.sort_values("request_id", kind="stable").reset_index(drop=True)


def _batched_chunks(chunks: Iterable[list[RequestRouting]], shape: ModelShape, replay: Replay,
                    batch: int, prefill_chunk: int, warmup: int, width: int = 0,
                    ) -> Iterator[tuple[Workload, np.ndarray]]:
    """``sim.workload``'s batched schedule (``_batched_steps``: continuous batching, a request
    joining as soon as one finishes, its units by ``_units``) over requests read chunk by
    chunk, the running requests carried from one chunk to the next: the steps of the whole
    run, cut into workloads where the requests read so far have all joined, each with the ids
    of the requests still running after it. ``width``: pad the keys to the run's widest step
    (so that positions number as in memory)."""
    from moesim.sim.compiled.steps import union_steps
    from moesim.sim.workload import _units

    source = iter(chunks)
    pending: deque[RequestRouting] = deque()
    running: list[list[Any]] = []  # [request, units, next unit, its row 0 in this chunk]
    exhausted = False
    steps = _StepLists()
    while True:
        joined = []
        while len(running) < batch:
            if not pending:
                if exhausted:
                    break
                if steps.num_steps:  # every request read so far has joined: cut here
                    yield (steps.workload(shape, union_steps, width),
                           np.array([e[0].request_id for e in running], np.int64))
                    steps = _StepLists()
                    for e in running:
                        e[3] = -1
                got = next(source, None)
                if got is None:
                    exhausted = True
                    break
                pending.extend(got)
                continue
            req = pending.popleft()
            running.append([req, _units(req.phase, replay, prefill_chunk), 0, -1])
            joined.append(req.request_id)
        if not running:
            break
        if joined:
            steps.joins[steps.num_steps] = joined
        n_tok, n_out, ctx, past_warmup = 0, 0, 0, False
        nxt = []
        for e in running:
            req, units, i = e[0], e[1], e[2]
            t0, t1, is_out = units[i]
            if e[3] < 0:  # its rows from this unit on join this chunk's experts
                steps.parts.append(req.experts[t0:])
                e[3] = steps.rows - t0
                steps.rows += req.num_tokens - t0
            steps.tok_idx.extend(range(e[3] + t0, e[3] + t1))
            n_tok += t1 - t0
            n_out += int(is_out)
            ctx = max(ctx, t1)
            past_warmup |= t0 >= warmup
            steps.req_ids.append(req.request_id)
            steps.t_start.append(t0)
            steps.t_end.append(t1)
            steps.is_output.append(is_out)
            if i + 1 < len(units):
                e[2] = i + 1
                nxt.append(e)
        running = nxt
        steps.end_step(n_tok, n_out, ctx, past_warmup)
    if steps.num_steps:
        yield steps.workload(shape, union_steps, width), np.zeros(0, np.int64)


class _StepLists:
    """One chunk's steps as ``sim.workload._batched_steps`` lists them."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.rows = 0
        self.tok_idx: list[int] = []
        self.step_off = [0]
        self.tokens: list[int] = []
        self.out_tokens: list[int] = []
        self.context: list[int] = []
        self.counted: list[bool] = []
        self.req_ids: list[int] = []
        self.req_off = [0]
        self.t_start: list[int] = []
        self.t_end: list[int] = []
        self.is_output: list[bool] = []
        self.joins: dict[int, list[int]] = {}

    @property
    def num_steps(self) -> int:
        return len(self.tokens)

    def end_step(self, n_tok: int, n_out: int, ctx: int, counted: bool) -> None:
        self.step_off.append(len(self.tok_idx))
        self.tokens.append(n_tok)
        self.out_tokens.append(n_out)
        self.context.append(ctx)
        self.counted.append(counted)
        self.req_off.append(len(self.req_ids))

    def workload(self, shape: ModelShape, union_steps: Any, width: int) -> Workload:
        experts = np.concatenate(self.parts)
        keys, counts, pairs = union_steps(experts, np.asarray(self.tok_idx, np.int64),
                                          np.asarray(self.step_off, np.int64),
                                          shape.num_experts)
        if width > keys.shape[2]:
            pad = ((0, 0), (0, 0), (0, width - keys.shape[2]))
            keys = np.pad(keys, pad, constant_values=-1)
            counts = np.pad(counts, pad)
        return Workload(
            shape=shape, keys=keys, counts=counts, pairs=pairs,
            tokens=np.asarray(self.tokens, np.int32),
            out_tokens=np.asarray(self.out_tokens, np.int32),
            context=np.asarray(self.context, np.int32),
            counted=np.asarray(self.counted, bool),
            req_offsets=np.asarray(self.req_off, np.int64),
            req_ids=np.asarray(self.req_ids, np.int32), joins=self.joins,
            token_start=np.asarray(self.t_start, np.int32),
            token_end=np.asarray(self.t_end, np.int32),
            req_out=np.asarray(self.is_output, bool),
        )


class _PredictionChunks:
    """Each chunk with its prediction view's table (``sim.predictions.PredictionView`` of the
    chunk's steps and its requests' rows, read from ``source``: a ``PredictionFile`` reads
    them from the file, an in-memory table gives them), its coverage counts summed over the
    run. A table indexed by the chunk's steps is the in-memory view's rows of those steps (a
    step's prediction is the union over its own tokens', never another step's).

    Coverage is checked as the in-memory view checks it, on the whole run's counts
    (``sim.predictions.check_coverage``, the same error) once the last chunk is read, before
    the result is built; and before each chunk is replayed, a run that can no longer reach
    ``min_coverage`` whatever the rest covers stops there: at some layer, more pairs lack a
    prediction than ``1 - min_coverage`` of an upper bound of the run's replayed pairs
    (``bound``: its tokens, plus one per request for MoE-Beyond's warm-up row)."""

    def __init__(self, source: Any, view: Any, num_l: int, bound: int) -> None:
        self.source = source
        self.view = view  # the run's (the facade's) view: its coverage is the run's, at the end
        self.bound = bound
        self.total = np.zeros(num_l, np.int64)
        self.covered = np.zeros(num_l, np.int64)
        self.first = np.full(num_l, -1, np.int64)

    def tables(self, chunks: Iterable[tuple[Workload, np.ndarray]],
               ) -> Iterator[tuple[Workload, np.ndarray, np.ndarray]]:
        from moesim.sim.predictions import PredictionView, check_coverage

        view = self.view
        min_cov = float(getattr(self.source, "min_coverage", 1.0))
        source = iter(chunks)
        got = next(source, None)
        while got is not None:
            w, running = got
            rows = self.source.rows(np.unique(w.req_ids).tolist())
            part = PredictionView(w, rows, view.available_at, min_coverage=0.0)
            self.total += part.per_layer_total
            self.covered += part.per_layer_covered
            self.first = np.where(self.first >= 0, self.first, part.first_uncovered)
            if self._certain_failure(min_cov):  # the last chunk: the in-memory error
                got = next(source, None)
                if got is not None:
                    self._early_error(min_cov)
                break
            yield w, running, part.table
            del part, rows, w, running
            got = next(source, None)
        view.coverage, view.worst_layer, view.replayed_tokens, view.covered_tokens = (
            check_coverage(self.total, self.covered, self.first, view.available_at, min_cov,
                           view._names))

    def _lacking(self) -> tuple[int, int]:
        """The layer with the most pairs lacking a prediction so far (of those coverage
        counts), and how many."""
        from moesim.sim.predictions import unpredictable_layers

        lacking = self.total - self.covered
        lacking[:unpredictable_layers(self.view.available_at)] = 0
        j = int(np.argmax(lacking))
        return j, int(lacking[j])

    def _certain_failure(self, min_cov: float) -> bool:
        _, n = self._lacking()
        return n > 0 and (self.bound - n) / max(self.bound, 1) < min_cov - 1e-12

    def _early_error(self, min_cov: float) -> None:
        j, n = self._lacking()
        most = (self.bound - n) / max(self.bound, 1)
        table_name, trace_name = self.view._names
        raise SimulationError(
            f"{table_name} cannot cover predictions.min_coverage={min_cov:g} of the "
            f"(request, token) pairs replayed from {trace_name}: at MoE layer index {j}, "
            f"{n:,} of at most {self.bound:,} have no prediction row (at most {most:.1%} "
            f"covered; the first replayed request without one: {int(self.first[j])}); the "
            "streamed run stopped before replaying past it (lower predictions.min_coverage "
            "to replay it anyway)")


class _InMemoryRows:
    """An in-memory prediction table (``traces.PredictionTable`` or any mapping of request
    id to ``[T, L, w]``) as a streamed run reads one: the rows of some requests."""

    def __init__(self, table: Mapping[int, np.ndarray]) -> None:
        self.table = table
        self.min_coverage = getattr(table, "min_coverage", None)
        if self.min_coverage is None:
            from moesim.sim.predictions import DEFAULT_MIN_COVERAGE

            self.min_coverage = DEFAULT_MIN_COVERAGE

    def rows(self, request_ids: Iterable[int]) -> dict[int, np.ndarray]:
        return {r: self.table[r] for r in request_ids if r in self.table}


def _window_steps(num_l: int, ahead: int) -> int:
    """How many steps after the one it runs in the oracle reads: at layer j of step s it asks
    for layer-step ``s * L + j + ahead``, at most ``(L - 1 + ahead) // L`` steps on."""
    return (num_l - 1 + ahead) // num_l


def _oracle_tables(chunks: Iterable[tuple[Workload, np.ndarray]], window: int,
                   thin: Callable[[np.ndarray], np.ndarray] | None = None,
                   ) -> Iterator[tuple[Workload, np.ndarray, np.ndarray]]:
    """Each chunk with the oracle's table for it: its own steps' keys and those of the next
    ``window`` steps (fewer only where the run ends), read ahead from as many following
    chunks as they span and held until replayed. ``thin(keys)``: the keys the prefetcher
    asks for (``speculative_prefetch``'s kept experts), applied once per chunk, in step
    order (its draws follow the run's steps as the in-memory table's do)."""
    source = iter(chunks)
    held: deque[tuple[Workload, np.ndarray, np.ndarray]] = deque()
    ahead = 0  # steps held after the first held chunk
    done = False
    while True:
        while not done and (not held or ahead < window):
            got = next(source, None)
            if got is None:
                done = True
                break
            w, running = got
            if held:
                ahead += w.num_steps
            held.append((w, running, thin(w.keys) if thin is not None else w.keys))
        if not held:
            return
        w, running, own = held.popleft()
        rows = [own]
        need = window
        for _, _, nxt in held:
            if need <= 0:
                break
            rows.append(nxt[:need])
            need -= rows[-1].shape[0]
        if held:
            ahead -= held[0][0].num_steps
        width = max(r.shape[2] for r in rows)
        if len(rows) == 1:
            table = own
        else:
            table = np.full((sum(r.shape[0] for r in rows), own.shape[1], width), -1, np.int32)
            s = 0
            for r in rows:
                table[s:s + r.shape[0], :, :r.shape[2]] = r
                s += r.shape[0]
        yield w, running, table


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
    reset_per_request: bool = False,
    replay: Replay = "decode",
    batch: int = 1,
    prefill_chunk: int = 0,
    warmup_tokens: int = 0,
    warmup_extra_row: bool = False,
    seed: int = 0,
    dense_before: Sequence[int] | None = None,
    batch_rows: int | None = None,
    predictions: Any = None,
    trace_outline: TraceOutline | None = None,
) -> RunResult:
    """:func:`sim.run.simulate` of the trace file ``path``, read and replayed
    ``chunk_requests`` requests at a time; the same result, every counter.

    ``meta``: the trace's metadata to use (e.g. with the model card's expert bytes), default
    the file's; ``max_requests``: only the first that many requests. ``predictions``: the
    prediction table of a prefetcher that reads one, a ``sim.predictions.PredictionFile``
    (read chunk by chunk) or an in-memory table (``traces.load_predictions``);
    ``trace_outline``: the file's :class:`TraceOutline` when the caller has it (a prediction
    table's early coverage check bounds the run's tokens with it; read here otherwise)."""
    from moesim.sim import compiled
    from moesim.sim.compiled import layout as K

    if chunk_requests < 1:
        raise _refuse(f"chunk_requests must be >= 1, got {chunk_requests}")
    spec = as_spec(policy)
    if spec.eviction not in compiled.EVICTION:
        raise _refuse(f"eviction {spec.eviction.__qualname__} has no compiled twin")
    if spec.eviction.knows is Knowledge.ORACLE and spec.eviction is not Belady:
        raise _refuse(f"eviction {spec.eviction.name!r} reads the whole run's routing up front "
                      "(oracle); of the oracle evictions a streamed run replays belady (and "
                      "the oracle prefetchers oracle_prefetch, speculative_prefetch)")
    check_replay_options(batch, warmup_tokens, replay, warmup_extra_row)  # as build_workload
    batched = not (batch == 1 and replay == "decode")
    meta = meta or read_meta(path)
    shape = ModelShape(meta.num_moe_layers, meta.num_experts, meta.top_k, meta.expert_bytes)
    chunk_kw: dict[str, Any] = {"max_requests": max_requests}
    if batch_rows is not None:
        chunk_kw["batch_rows"] = batch_rows

    def chunks(width: int = 0) -> Iterator[tuple[Workload, np.ndarray]]:
        reqs = iter_request_chunks(path, chunk_requests, **chunk_kw)
        if batched:
            yield from _batched_chunks(reqs, shape, replay, batch, prefill_chunk,
                                       warmup_tokens, width)
            return
        none = np.zeros(0, np.int64)  # whole requests: none runs on into the next chunk
        for got in reqs:
            yield build_workload(Trace(meta, got), warmup_tokens=warmup_tokens,
                                 warmup_extra_row=warmup_extra_row), none

    belady = compiled.EVICTION[spec.eviction] == K.EV_BELADY

    source = None  # where each chunk's prediction rows come from
    facade_table = None  # the facade's: no rows (a file), or the whole table (checked whole)
    if spec.needs(Knowledge.PREDICTIONS) and predictions is not None:
        from moesim.sim.predictions import PredictionFile

        if isinstance(predictions, PredictionFile):
            source, facade_table = predictions, predictions.rows(())
        else:
            source, facade_table = _InMemoryRows(predictions), predictions

    def build(outline: _Outline) -> Simulation:
        return Simulation(
            _facade(shape, outline.widths, outline.first_step_requests), spec,
            CacheOptions(capacity, partition, pin_layer, prefill, reset_per_request, 0),
            RunOptions(mode, seed, False, 0, False, "compiled"),
            link_model=link, compute=compute, labels={"layer_ids": list(meta.moe_layers)},
            dense_before=dense_before, predictions=facade_table,
        )

    # The first pass reads the whole file once more. Belady needs it (next uses), so do
    # Fate's per-layer split (each layer's widest step) and MoE-Infinity at a large batch
    # (its live-request buffers, sized by the most requests in one step). Otherwise the
    # widest step matters only to the cache-size check, which a bound on it (top-k experts
    # per token of a step) passes whenever the exact widths do; when it fails with the
    # bound, the first pass finds the exact widths and the check decides with them.
    # And speculative_prefetch in batches: its draws per step span the run's widest step.
    speculative = issubclass(spec.prefetch, SpeculativePrefetch)
    first_pass = (belady or getattr(spec.eviction, "layer_capacities", None) is not None
                  or (spec.prefetch is MoEInfinity and batch > _MI_LIVE_BOUND)
                  or (speculative and batched))
    sim = outline = None
    if not first_pass:
        first_step = 1 if batch == 1 or not reset_per_request else min(batch, len(next(
            iter_request_chunks(path, 2, **chunk_kw), [])))
        bound = _width_bound(shape, batch, replay, prefill_chunk)
        try:
            sim = build(_Outline(np.full(shape.num_layers, bound, np.int64), 0, batch,
                                 first_step))
        except SimulationError as err:
            if not str(err).startswith("cache too small"):
                raise
            first_pass = True
    with tempfile.TemporaryFile(prefix="moesim-stream-") as after_file:
        if first_pass:  # widths, the most requests in a step, Belady's first positions
            outline = _first_pass(chunks(), shape, after_file if belady else None)
            if belady:
                _backward(after_file, outline.chunks, shape.num_keys)
            sim = build(outline)
        assert sim is not None
        most = outline.most_requests if outline is not None else batch
        reason = compiled.why_not(sim)
        if reason is not None:
            raise _refuse(reason)
        if getattr(sim, "rules", None) not in (None, NO_RULES):
            raise _refuse("a runtime's copy rules (swap, compute stream, host_s, fifo, sync) "
                          "are not streamed")
        # Belady's positions number each chunk's keys with the whole run's width
        width = (max(1, int(outline.widths.max())) if batched and belady
                 and outline is not None else 0)
        steps: Iterator[tuple[Workload, np.ndarray, np.ndarray | None]]
        if isinstance(sim.prefetcher, OraclePrefetch):  # its table: chunk + look-ahead
            pf = sim.prefetcher
            thin = None
            if isinstance(pf, SpeculativePrefetch):
                # batch 1 decode: every chunk is as wide as the whole run (a token's k columns)
                widest = (max(1, int(outline.widths.max())) if batched and outline is not None
                          else None)
                thin = functools.partial(SpeculativePrefetch.thin, pf.setup.rng, pf.recall,
                                         width=widest)
            steps = _oracle_tables(chunks(width), _window_steps(shape.num_layers, pf._ahead),
                                   thin)
        elif source is not None:  # its prediction view's table, chunk by chunk
            lengths = trace_outline
            if lengths is None or lengths.path != Path(path):
                lengths = TraceOutline.read(path, max_requests)
            bound = lengths.num_tokens + (len(lengths) if warmup_extra_row else 0)
            steps = _PredictionChunks(source, sim.predictions, shape.num_layers,
                                      bound).tables(chunks(width))
        else:
            steps = ((w, running, None) for w, running in chunks(width))
        # every check passed: now the kernels (compiled under the lock where not cached)
        return _replay(sim, steps, after_file if belady else None, most, batch,
                       compiled.ensure_compiled())


_MI_LIVE_BOUND = 64  # up to this batch, MoE-Infinity's live buffers are sized by the batch


def _width_bound(shape: ModelShape, batch: int, replay: Replay, prefill_chunk: int) -> int:
    """The most experts one step can demand at one layer: top-k per token of the step (a
    prompt replayed whole has no bound but the number of experts)."""
    if replay == "prefill" and prefill_chunk <= 0:
        return shape.num_experts
    tokens = batch * (prefill_chunk if replay == "prefill" else 1)
    return min(shape.num_experts, tokens * shape.top_k)


def simulate_streamed(trace: str | Path | TraceOutline, spec: PolicySpec,
                      stream: StreamOptions, *, record_transfers: bool = False,
                      timeline_steps: int = 0, predictions: Any = None, engine: str = "auto",
                      placement: Any = None, host: Any = None, staging: int = 0,
                      **kwargs: Any) -> RunResult:
    """``simulate(..., stream=...)``: the options of :func:`simulate` that a streamed run
    replays go to :func:`simulate_stream`; any other one set is refused by name."""
    asked = {
        "output.transfers": (record_transfers, False),
        "output.timeline_steps": (timeline_steps, 0), "runtime staging buffers": (staging, 0),
    }
    for name, (value, default) in asked.items():
        if value != default:
            raise _refuse(f"{name}={value!r} is not streamed (streamed runs replay "
                          f"{name}={default!r})")
    if engine == "python":
        raise _refuse("engine=python: a streamed run is the compiled engine's")
    if placement is not None and not getattr(placement, "is_default", True):
        raise _refuse(f"placement {placement.name!r} is not streamed (only fetch)")
    if not isinstance(trace, TraceOutline):
        if isinstance(trace, Trace):
            raise _refuse("the trace is already in memory; stream it from its file")
        trace = TraceOutline.read(trace)
    if predictions is None and spec.needs(Knowledge.PREDICTIONS):
        raise _refuse(f"policy {spec.name!r} prefetches from a prediction table, and none was "
                      "handed to the streamed run (through the API, pass predictions="
                      "sim.predictions.PredictionFile(path, layer_ids, ...))")
    return simulate_stream(trace.path, spec, chunk_requests=stream.chunk_requests,
                           meta=trace.meta, max_requests=trace.max_requests,
                           predictions=predictions, trace_outline=trace, **kwargs)


@dataclass(frozen=True)
class _Outline:
    """What the first pass finds: the widest step per layer, the number of chunks, the most
    requests in one step (MoE-Infinity's live-request buffers) and in the first step."""

    widths: np.ndarray
    chunks: int
    most_requests: int
    first_step_requests: int


def _first_pass(chunks: Iterator[tuple[Workload, np.ndarray]], shape: ModelShape,
                out: Any) -> _Outline:
    """Walk the chunks once; with ``out`` (Belady) write each chunk's first position of
    every key (whole-run positions, numbered with the number of experts as width) as one
    row."""
    widths: np.ndarray | None = None
    step0 = n = 0
    most = first = 1
    for w, _ in chunks:
        keys = w.keys
        if out is not None:
            pos = _first_positions(keys.reshape(-1), shape.num_keys)
            _recode(pos, step0, keys.shape[2], 0, shape.num_experts, shape.num_layers)
            out.write(pos.tobytes())
        per_step = np.diff(w.req_offsets)
        if n == 0:
            first = int(per_step[0])
        most = max(most, int(per_step.max()))
        step0 += w.num_steps
        mw = w.max_width()
        widths = mw if widths is None else np.maximum(widths, mw)
        n += 1
    if widths is None:
        raise _refuse("the trace has no requests")
    return _Outline(widths.astype(np.int64), n, most, first)


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


def _mi_state(sim: Simulation, w: Workload, most: int) -> tuple[np.ndarray, ...]:
    """``compiled.mi_arrays`` of the run's prefetcher (its EAMC, a warm one included) with
    live-request buffers for ``most`` requests (the whole run's most in one step, an upper
    bound of the requests live at once), built on the first chunk; the kernel updates them in
    place, so later chunks hand them on. The lazy match's per-request tables (``mt``) get
    as many rows as the live buffers: with fewer, the kernel falls back to the eager match
    for the whole run (the same decisions, slower; ``sim/compiled/eamc.py``: ``_lazy``)."""
    from moesim.sim import compiled

    facade, sim.workload = sim.workload, w
    try:
        mi = list(compiled.mi_arrays(sim))
    finally:
        sim.workload = facade
    if mi[4].shape[0] < most:  # lrid, leam, lsq, lrsum, ldots: fresh rows as mi_arrays'
        cap = mi[0].shape[0]
        num_l, num_k = sim.shape.num_layers, sim.shape.num_keys
        lrsum = np.zeros((most, num_l + 1))
        lrsum[:, num_l] = -1.0
        mi[4:9] = (np.full(most, -1, np.int64), np.zeros((most, num_k)),
                   np.zeros((most, 2 * num_l)), lrsum, np.zeros((most, 2 * num_l, cap)))
        mi[1] = compiled._matcher_tables(sim.prefetcher.eamc, w, most)
    return tuple(mi)


def _replay(sim: Simulation,
            chunks: Iterator[tuple[Workload, np.ndarray, np.ndarray | None]], after_file: Any,
            most: int, batch: int, kernel: Any) -> RunResult:
    """Replay the chunks, each resuming from the state the previous one left, with its
    prefetcher's table for it when it has one (the oracle's, or the chunk's prediction
    view's); ``most``: the most requests live at once (MoE-Infinity's
    buffers)."""
    from moesim.sim import compiled
    from moesim.sim.compiled import layout as K
    ev_code = compiled.EVICTION[sim.spec.eviction]
    mi_pf = type(sim.prefetcher) is MoEInfinity
    if ev_code == K.EV_VISITS_MIN:  # as compiled.run
        order_max = sim.spec.eviction_params.get("order") == "max"
        if mi_pf:
            ev_code = K.EV_MI_MAX if order_max else K.EV_MI_MIN
        elif order_max:
            ev_code = K.EV_VISITS_MAX
    belady = ev_code == K.EV_BELADY
    duration, engines = compiled.link_args(sim)
    pf_code, point, hooks, ahead, top, wrap, warm, table = compiled._prefetch_args(sim)
    hot = np.zeros(sim.shape.num_keys, np.bool_)
    for ev in sim.cache.evictors:
        for k in getattr(ev, "_hot", ()):
            hot[k] = True
    mi = compiled.mi_arrays(None)
    touch = bool(sim.spec.eviction_params.get("prefetch_touch", True))
    dense_n = np.asarray(sim.dense_before, dtype=np.int64)
    part = np.asarray(sim._part_of_layer, dtype=np.int64)
    caps = np.asarray(sim._caps, dtype=np.int64)
    num_k, num_l, num_e = sim.shape.num_keys, sim.shape.num_layers, sim.shape.num_experts
    dummy_counts = np.zeros((1, 1, 1), np.int32)
    state = compiled.FRESH
    out = None
    steps = tokens = out_tokens = pairs = 0
    counted_parts: list[np.ndarray] = []
    out_parts: list[np.ndarray] = []
    tok_parts: list[np.ndarray] = []
    time_parts: list[np.ndarray] = []
    requests = _RequestRows(per_chunk=batch == 1)
    step0 = prev_len = 0  # the chunk's first step in the whole run; the last one's length
    for c, (w, running, own) in enumerate(chunks):
        keys = w.keys
        flat = keys.reshape(-1)
        if belady:
            after_file.seek(c * num_k * 8)
            after = np.frombuffer(after_file.read(num_k * 8), np.int64).copy()
            _recode(after, 0, num_e, step0, keys.shape[2], num_l)
            nocc, cursor = _chunk_links(flat, after)
            if state is not compiled.FRESH:
                _rebase(state[0], K.K_S1, K.K_CURSOR, cursor, prev_len)
        else:
            nocc = cursor = np.zeros(1, np.int64)
        if mi_pf:
            if state is compiled.FRESH:
                mi = _mi_state(sim, w, most)
                cfg = mi[13].copy()
                cfg[4] = 0  # a resumed chunk's EAMC order is already sorted (sort_all: no-op)
            else:
                mi = (*mi[:9], *compiled.mi_steps(w), cfg)
                # lrsum[:, L]: the step each live request's suffix sums were taken at, which
                # counts from its chunk's start: none yet in this chunk (eamc._match)
                mi[7][:, num_l] = -1.0
        attn, shared, dense_step, cost = compiled._layer_arrays(sim, w)
        resets, inst_off, inst_keys = compiled.reset_orders(
            sim, w, state is compiled.FRESH)
        counts = w.counts if w.counts is not None else dummy_counts
        iv, fv, layer_counts, layer_stall, step_t, S, F = kernel.replay(
            keys, counts, w.counts is not None, w.counted, attn, shared, dense_step, dense_n,
            part, caps, num_e, sim.timed, sim.copts.pin_layer, engines, duration, cost,
            ev_code, hot, touch, pf_code, point, hooks, ahead, top, wrap, warm,
            table if own is None else own, resets,
            inst_off, inst_keys, nocc, cursor, mi, state,
            compiled.runtime_arrays(sim, cost, w),
        )
        if iv[K.I_ERROR] != 0:  # the error the in-memory run stops with
            compiled.store_counters(sim, iv, fv, layer_counts, layer_stall, engines)
        state = (S, F, layer_counts, layer_stall)
        out = (iv, fv, layer_counts, layer_stall)
        prev_len = flat.shape[0]
        step0 += w.num_steps
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
        requests.add(w, step_t if sim.timed else None, running)
        del w, keys, flat, nocc, own
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
    table = requests.table()
    result.summary.update(tpot_percentiles(table))
    result.per_request = table
    return result
