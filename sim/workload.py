"""Turn a routing trace into the steps the GPU executes.

A *step* is one forward pass: a decode step (one token of every running request) or a prefill
chunk. For each step and MoE layer the workload holds the unique experts demanded, in first-use
order, and how many tokens each serves. Batching is continuous: when a request finishes, the
next one joins at the following step. Everything is precomputed with numpy so the simulation
loop only reads arrays.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.policies.base import ModelShape
from moesim.sim.compiled.steps import count_valid
from moesim.traces.trace import DECODE, RequestRouting, Trace

Replay = Literal["decode", "prefill"]
NO_USE = 1 << 62


class WorkloadError(ValueError):
    """Workload options that cannot be applied to this trace."""


@dataclass
class Workload:
    """Per-step, per-layer demand of a whole run."""

    shape: ModelShape
    keys: np.ndarray  # int32 [S, L, W]: unique expert keys, -1 padded
    counts: np.ndarray | None  # int32 [S, L, W]: tokens per key; None when all are 1
    pairs: np.ndarray  # int32 [S, L]: token-expert pairs (tokens x k as recorded)
    tokens: np.ndarray  # int32 [S]: tokens processed in the step
    out_tokens: np.ndarray  # int32 [S]: output (decode) tokens produced by the step
    context: np.ndarray  # int32 [S]: longest context in the step (attention cost)
    counted: np.ndarray  # bool [S]: False for warm-up steps (excluded from metrics)
    req_offsets: np.ndarray  # int64 [S+1] into req_ids / token_start / token_end
    req_ids: np.ndarray  # int32: requests taking part in each step
    joins: dict[int, list[int]]  # step -> requests starting at that step
    token_start: np.ndarray  # int32, aligned with req_ids: first token of the request's unit
    token_end: np.ndarray  # int32: one past its last token
    _max_width: np.ndarray | None = None
    # Router weights, only when a placement needs them (``build_workload(gate_weights=...)``):
    # per key, the sum and the largest of its tokens' normalised gate weights (a token's weight
    # over the sum of its top-k weights at that layer); float32 [S, L, W], 0 where padded.
    gate_mass: np.ndarray | None = None
    gate_max: np.ndarray | None = None
    req_out: np.ndarray | None = None  # bool, aligned with req_ids: the unit is an output token

    @property
    def num_steps(self) -> int:
        return int(self.keys.shape[0])

    def requests_of(self, step: int) -> list[int]:
        return self.req_ids[self.req_offsets[step]:self.req_offsets[step + 1]].tolist()

    def max_width(self) -> np.ndarray:
        """Most unique experts any single step demands, per layer."""
        if self._max_width is None:
            self._max_width = (self.keys >= 0).sum(axis=2).max(axis=0)
        return self._max_width


def _units(phase: np.ndarray, replay: Replay, chunk: int) -> list[tuple[int, int, bool]]:
    """(first token, end token, is_output) units of one request."""
    n = len(phase)
    if replay == "decode":
        return [(t, t + 1, True) for t in range(n)]
    units: list[tuple[int, int, bool]] = []
    n_prefill = int(np.argmax(phase == DECODE)) if (phase == DECODE).any() else n
    step = chunk if chunk > 0 else max(n_prefill, 1)
    for t0 in range(0, n_prefill, step):
        units.append((t0, min(t0 + step, n_prefill), False))
    units += [(t, t + 1, True) for t in range(n_prefill, n)]
    return units


def check_replay_options(batch: int, warmup_tokens: int, replay: str,
                         warmup_extra_row: bool = False) -> None:
    """The replay options a workload is built from, refused with one error each (the
    in-memory and the streamed replay say the same)."""
    if batch < 1:
        raise WorkloadError(f"batch must be >= 1, got {batch}")
    if warmup_tokens < 0:
        raise WorkloadError(f"warmup_tokens must be >= 0, got {warmup_tokens}")
    if replay not in ("decode", "prefill"):
        raise WorkloadError(f"replay must be 'decode' or 'prefill', got {replay!r}")
    if warmup_extra_row and not (batch == 1 and replay == "decode"):
        raise WorkloadError("warmup_extra_row (MoE-Beyond's warm-up quirk) needs batch=1 and "
                            "replay=decode")


def build_workload(
    trace: Trace,
    *,
    replay: Replay = "decode",
    batch: int = 1,
    prefill_chunk: int = 0,
    warmup_tokens: int = 0,
    warmup_extra_row: bool = False,
    gate_weights: str | None = None,
) -> Workload:
    """Steps of ``trace`` under continuous batching of ``batch`` requests.

    ``replay="decode"`` treats every recorded token as a decode step (teacher forcing: a
    prefill-only trace such as MoE-Beyond's is replayed token by token). ``replay="prefill"``
    processes the recorded prefill tokens in chunks of ``prefill_chunk`` (0 = whole prompt).
    The first ``warmup_tokens`` tokens of each request only warm the cache.

    ``warmup_extra_row`` reproduces a quirk of MoE-Beyond's ``infinity_moe_sim.py``: its
    warm-up loop breaks only *after* accessing row ``26 * warmup``, so the first MoE layer of
    the first counted token is accessed once more during warm-up (uncounted, without
    predictions) and then again, counted. Here that row is an extra warm-up step holding only
    that layer's experts (batch 1, decode replay; requests longer than the warm-up).

    ``gate_weights`` (the name of what needs them, for the error) fills ``gate_mass`` and
    ``gate_max`` from the trace's router weights; a trace without them is refused.
    """
    check_replay_options(batch, warmup_tokens, replay, warmup_extra_row)
    meta = trace.meta
    shape = ModelShape(meta.num_moe_layers, meta.num_experts, meta.top_k, meta.expert_bytes)
    if not trace.requests:
        raise WorkloadError("the trace has no requests")
    weights = None
    if gate_weights is not None:
        weights = [normalised_gate_weights(r, gate_weights) for r in trace.requests]
    if batch == 1 and replay == "decode":
        return _single_token_steps(trace, shape, warmup_tokens, warmup_extra_row, weights)
    return _batched_steps(trace, shape, replay, batch, prefill_chunk, warmup_tokens, weights)


def normalised_gate_weights(req: RequestRouting, needed_by: str) -> np.ndarray:
    """float32 [T, L, k]: each recorded router weight over the sum of its token's top-k weights
    at that layer (rows sum to 1; 0 where no expert was recorded)."""
    ex = req.experts
    valid = ex >= 0
    if req.scores is None:
        raise WorkloadError(f"{needed_by} needs router weights, but the trace records none "
                            f"(request {req.request_id} has no scores column)")
    sc = req.scores.astype(np.float64)
    if (valid & ~np.isfinite(sc)).any() or (valid & (sc < 0)).any():
        raise WorkloadError(f"{needed_by} needs router weights, but request {req.request_id} "
                            "has missing (NaN) or negative scores for recorded experts")
    w = np.where(valid, sc, 0.0)
    tot = w.sum(axis=2, keepdims=True)
    if (valid.any(axis=2, keepdims=True) & (tot <= 0)).any():
        raise WorkloadError(f"{needed_by} needs router weights, but request {req.request_id} "
                            "has a token whose top-k weights sum to 0")
    return np.where(valid, w / np.where(tot > 0, tot, 1.0), 0.0).astype(np.float32)


def _single_token_steps(
    trace: Trace, shape: ModelShape, warmup: int, extra_row: bool = False,
    weights: list[np.ndarray] | None = None,
) -> Workload:
    """Fast path: one token per step, so keys are the routed ids shifted per layer (and a
    key's gate mass is its one token's weight)."""
    num_e = shape.num_experts
    masses: list[np.ndarray] = []
    offsets = (np.arange(shape.num_layers, dtype=np.int32) * num_e)[None, :, None]
    blocks, counted, context, starts, req_ids = [], [], [], [], []
    joins: dict[int, list[int]] = {}
    step = 0
    for i_req, req in enumerate(trace.requests):
        ex = req.experts.astype(np.int32)
        keys = np.where(ex >= 0, ex + offsets, -1)
        mass = None if weights is None else weights[i_req]
        n = req.num_tokens
        idx = np.arange(n, dtype=np.int32)
        if extra_row and 0 < warmup < n:  # the first counted token's first layer, once more
            row = np.full((1, *keys.shape[1:]), -1, dtype=np.int32)
            row[0, 0] = keys[warmup, 0]
            keys = np.concatenate([keys[:warmup], row, keys[warmup:]])
            if mass is not None:
                mrow = np.zeros((1, *mass.shape[1:]), dtype=np.float32)
                mrow[0, 0] = mass[warmup, 0]
                mass = np.concatenate([mass[:warmup], mrow, mass[warmup:]])
            idx = np.concatenate([idx[:warmup], [warmup], idx[warmup:]]).astype(np.int32)
            is_counted = np.arange(n + 1) > warmup
        else:
            is_counted = idx >= warmup
        blocks.append(keys)
        if mass is not None:
            masses.append(mass)
        counted.append(is_counted)
        context.append(idx + 1)
        starts.append(idx)
        req_ids.append(np.full(len(idx), req.request_id, dtype=np.int32))
        joins[step] = [req.request_id]
        step += len(idx)
    keys = np.concatenate(blocks)
    pairs = count_valid(keys)  # one compiled pass instead of numpy's count along a short axis
    steps = keys.shape[0]
    gate = np.concatenate(masses) if weights is not None else None
    return Workload(
        shape=shape,
        keys=keys,
        counts=None,
        pairs=pairs,
        tokens=np.ones(steps, dtype=np.int32),
        out_tokens=np.ones(steps, dtype=np.int32),
        context=np.concatenate(context),
        counted=np.concatenate(counted),
        req_offsets=np.arange(steps + 1, dtype=np.int64),
        req_ids=np.concatenate(req_ids),
        joins=joins,
        token_start=np.concatenate(starts),
        token_end=np.concatenate(context),
        _max_width=pairs.max(axis=0),  # one token per step: the width is its row count
        gate_mass=gate,
        gate_max=gate,
        req_out=np.ones(steps, dtype=bool),
    )


def _batched_steps(
    trace: Trace, shape: ModelShape, replay: Replay, batch: int, chunk: int, warmup: int,
    weights: list[np.ndarray] | None = None,
) -> Workload:
    """The schedule (who runs which unit in which step) in Python, one entry per unit; the
    per-layer unions of each step's experts in one compiled pass (``sim.compiled.steps``)."""
    from moesim.sim.compiled.steps import union_steps

    requests = list(trace.requests)
    first_row = np.cumsum([0] + [r.num_tokens for r in requests[:-1]]).tolist()
    pending = list(zip(requests, first_row, strict=True))[::-1]
    join_map: dict[int, list[int]] = {}
    running: list[tuple[object, int, list[tuple[int, int, bool]], int]] = []
    tokens, out_tokens, context, counted, req_ids, req_off = [], [], [], [], [], [0]
    t_start: list[int] = []
    t_end: list[int] = []
    is_output: list[bool] = []
    tok_idx: list[int] = []
    step_off = [0]
    while pending or running:
        joined = []
        while pending and len(running) < batch:
            req, row0 = pending.pop()
            running.append((req, row0, _units(req.phase, replay, chunk), 0))
            joined.append(req.request_id)
        if joined:
            join_map[len(step_off) - 1] = joined
        n_tok, n_out, ctx, past_warmup = 0, 0, 0, False
        nxt = []
        for req, row0, units, i in running:
            t0, t1, is_out = units[i]
            tok_idx.extend(range(row0 + t0, row0 + t1))
            n_tok += t1 - t0
            n_out += int(is_out)
            ctx = max(ctx, t1)
            past_warmup |= t0 >= warmup
            req_ids.append(req.request_id)
            t_start.append(t0)
            t_end.append(t1)
            is_output.append(is_out)
            if i + 1 < len(units):
                nxt.append((req, row0, units, i + 1))
        running = nxt
        step_off.append(len(tok_idx))
        tokens.append(n_tok)
        out_tokens.append(n_out)
        context.append(ctx)
        counted.append(past_warmup)
        req_off.append(len(req_ids))
    experts = np.concatenate([r.experts for r in requests])
    tok = np.asarray(tok_idx, dtype=np.int64)
    offs = np.asarray(step_off, dtype=np.int64)
    keys, counts, pairs = union_steps(experts, tok, offs, shape.num_experts)
    mass = wmax = None
    if weights is not None:
        mass, wmax = _gate_per_key(keys, experts[tok], np.concatenate(weights)[tok],
                                   np.repeat(np.arange(len(offs) - 1), np.diff(offs)),
                                   shape.num_experts)
    return Workload(
        shape=shape,
        keys=keys,
        counts=counts,
        pairs=pairs,
        tokens=np.asarray(tokens, dtype=np.int32),
        out_tokens=np.asarray(out_tokens, dtype=np.int32),
        context=np.asarray(context, dtype=np.int32),
        counted=np.asarray(counted, dtype=bool),
        req_offsets=np.asarray(req_off, dtype=np.int64),
        req_ids=np.asarray(req_ids, dtype=np.int32),
        joins=join_map,
        token_start=np.asarray(t_start, dtype=np.int32),
        token_end=np.asarray(t_end, dtype=np.int32),
        gate_mass=mass,
        gate_max=wmax,
        req_out=np.asarray(is_output, dtype=bool),
    )


def _gate_per_key(keys: np.ndarray, experts: np.ndarray, weights: np.ndarray,
                  step_of_row: np.ndarray, num_e: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum and largest normalised weight of every step-layer key over the step's tokens:
    each routed (token, layer, rank) is matched to its key's column by one sorted lookup."""
    num_s, num_l, width = keys.shape
    sl = (np.arange(num_s)[:, None] * num_l + np.arange(num_l)[None, :])[:, :, None]
    valid = keys >= 0
    code_w = np.where(valid, sl * num_e + keys % num_e, -1).reshape(-1)
    order = np.argsort(code_w, kind="stable")
    sorted_codes = code_w[order]
    ok = experts >= 0
    t_sl = step_of_row[:, None, None] * num_l + np.arange(num_l)[None, :, None]
    code_t = (t_sl * num_e + experts)[ok]
    pos = order[np.searchsorted(sorted_codes, code_t)]
    w = weights[ok].astype(np.float64)
    mass = np.zeros(code_w.shape[0])
    wmax = np.zeros(code_w.shape[0])
    np.add.at(mass, pos, w)
    np.maximum.at(wmax, pos, w)
    shape = (num_s, num_l, width)
    return mass.reshape(shape).astype(np.float32), wmax.reshape(shape).astype(np.float32)


class WorkloadFuture:
    """Future routing of a workload, for oracle policies (see ``policies.base.FutureView``).

    Built lazily: the compiled engine reads the workload's keys itself and never asks, and the
    next-use links (one int64 per position, from one backward pass without sort temporaries)
    are made on the first ``next_use``; ``key_frequencies`` counts in blocks of steps."""

    def __init__(self, workload: Workload) -> None:
        self._w = workload
        self.num_steps = workload.num_steps
        self.width = workload.keys.shape[2]
        self._freq: np.ndarray | None = None
        self._nxt: array | None = None
        self._cur: list[int] = []

    @property
    def keys(self) -> np.ndarray:
        """The whole [steps, layers, width] key array (read-only use: a policy that derives
        its own table from the future, such as ``speculative_prefetch``)."""
        return self._w.keys

    def keys_at(self, step: int, layer: int) -> list[int]:
        if step >= self.num_steps:
            return []
        row = self._w.keys[step, layer]
        return row[row >= 0].tolist()

    def _links(self) -> array:
        # (heaps, not kernel: importing the kernel module compiles its typed helpers)
        from moesim.sim.compiled.heaps import next_occurrences

        nxt, first = next_occurrences(self._w.keys.reshape(-1), self._w.shape.num_keys)
        links = array("q")
        links.frombytes(memoryview(nxt).cast("B"))
        self._cur = first.tolist()
        return links

    def next_use(self, key: int, position: int, inclusive: bool = False) -> int:
        """Positions are queried in non-decreasing order, so a per-key cursor is enough."""
        nxt = self._nxt
        if nxt is None:
            nxt = self._nxt = self._links()
        i = self._cur[key]
        while i < position:
            i = nxt[i]
        self._cur[key] = i
        if not inclusive and i == position:
            i = nxt[i]
        return i

    def key_frequencies(self) -> np.ndarray:
        if self._freq is None:
            keys = self._w.keys
            freq = np.zeros(self._w.shape.num_keys, dtype=np.int64)
            for a in range(0, keys.shape[0], 1 << 14):
                block = keys[a:a + (1 << 14)]
                freq += np.bincount(block[block >= 0], minlength=len(freq))
            self._freq = freq
        return self._freq.copy()
