"""The executor's run loop: one policy over one workload on real hardware, with a wall clock.

The layer timeline is the simulator's (``sim.engine``), step for step::

    on_pre_attention -> dense layers + attention + router computed for real -> routing known
    (from the trace) -> on_routed -> each expert a hit / late hit (its copy already started) /
    promoted (a queued prefetch made demand) / miss (demand copy) -> on_demand_issued -> shared
    experts, resident experts, then the rest as their copies arrive -> on_layer_end

Construction reuses the simulator's own (``Simulation.__init__``: partitions, capacity checks,
the policy objects with the same seeds, FutureView, prediction view); only the clock (wall
seconds), the cache (``SlottedCache``: the same bookkeeping plus physical slots) and the link
(``Copier``: real copy threads) differ, so a policy cannot tell which driver runs it. Every
policy call happens on this (main) thread. Results go through ``sim.metrics.build_result``, so
the columns are the simulator's; ``executor.*`` columns add what only a real run has.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim.policies.base import PolicySetup, PrefetchPolicy
from moesim.policies.registry import PolicySpec, as_spec
from moesim.sim.cache import ABSENT, LOADING, RESIDENT, SimulationError
from moesim.sim.engine import CacheOptions, RunOptions, Simulation
from moesim.sim.executor.clock import WallClock
from moesim.sim.executor.copier import Copier
from moesim.sim.executor.model import ExpertLayout
from moesim.sim.executor.slots import SlottedCache
from moesim.sim.hardware import FixedCompute, FixedLink
from moesim.sim.metrics import LATE, RunResult, build_result
from moesim.sim.workload import Replay, Workload, build_workload
from moesim.traces.model_card import ModelCard
from moesim.traces.trace import Trace

BACKENDS = ("storage", "cuda")


@dataclass(frozen=True)
class ExecutorOptions:
    """How the real run is set up (recorded with its results)."""

    backend: str = "storage"
    copy_engines: int = 1  # copy worker threads (the profile's copy_engines)
    threads: int = 1  # torch compute threads (set explicitly: the copy threads need a core)
    direct_io: bool | None = None  # None: O_DIRECT where supported; False: buffered fallback
    work_dir: str | None = None  # where the weights file lives (default $MOESIM_CACHE/executor)
    weights_seed: int = 0
    record_transfers: bool = False
    pace_Bps: float | None = None  # storage: stretch every read to expert bytes / pace_Bps


class _Plan(Simulation):
    """The simulator's construction with the wall clock and a slotted cache."""

    def __init__(self, *args: Any, wall_clock: WallClock, **kwargs: Any) -> None:
        self._wall = wall_clock
        super().__init__(*args, **kwargs)
        self.clock = wall_clock  # type: ignore[assignment]

    cache_type = SlottedCache

    def _setup(self, params: dict[str, Any], part: int | None) -> PolicySetup:
        return replace(super()._setup(params, part), clock=self._wall)


class WallContext:
    """The ``PrefetchContext`` of the executor (same rules as the simulator's)."""

    def __init__(self, ex: Executor) -> None:
        self._ex = ex
        self.clock = ex.clock
        self.shape = ex.shape

    def prefetch(self, keys: Iterable[int], priority: float | None = None) -> int:
        # The simulator's own rules (resident keys, default priorities, counters); the copies
        # start when the hook returns, as on the simulator's lazily advanced link.
        return self._ex.plan.prefetch(keys, priority)

    def cancel_prefetches(self, keys: Iterable[int] | None = None) -> int:
        return self._ex.copier.cancel(keys)

    def is_resident(self, key: int) -> bool:
        return self._ex.cache.state[key] == RESIDENT

    def is_loading(self, key: int) -> bool:
        return self._ex.cache.state[key] == LOADING or self._ex.copier.is_queued(key)

    def install(self, keys: Iterable[int]) -> int:
        ex = self._ex
        if ex.started:
            raise SimulationError("ctx.install is only allowed before the first step")
        n = 0
        for key in keys:
            if ex.cache.state[key] == ABSENT and ex.cache.install(key):
                ex.backend.load(key, ex.cache.pool.slot_of(key), 0)
                n += 1
            elif ex.cache.state[key] != ABSENT:
                n += 1
        return n

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self._ex.after(delay, fn)

    @property
    def request_ids(self) -> Sequence[int]:
        return self._ex.workload.requests_of(self.clock.step)


def _overrides(obj: object, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(PrefetchPolicy, name)


class Executor:
    """One real run of one policy over one workload. Build, then call :meth:`run` once."""

    def __init__(
        self,
        workload: Workload,
        spec: PolicySpec,
        card: ModelCard,
        cache_opts: CacheOptions,
        opts: ExecutorOptions,
        *,
        seed: int = 0,
        labels: dict[str, Any] | None = None,
        dense_before: Sequence[int] | None = None,
        predictions: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        if opts.backend not in BACKENDS:
            raise SimulationError(f"executor backend must be one of {BACKENDS}, got "
                                  f"{opts.backend!r}")
        if card.expert_bytes != workload.shape.expert_bytes:
            raise SimulationError(
                f"the workload says {workload.shape.expert_bytes} B per expert but card "
                f"{card.name!r} has {card.expert_bytes} B (give the trace the card's bytes)")
        if card.routed_experts_total != workload.shape.num_keys:
            raise SimulationError(f"card {card.name!r} does not match the trace's experts")
        if cache_opts.reset_per_request:
            raise SimulationError("the executor does not support cache.reset_per_request")
        self.card = card
        self.opts = opts
        self.layout = ExpertLayout.of(card)
        self.clock = WallClock()
        self.plan = _Plan(
            workload, spec, cache_opts,
            RunOptions("timed", seed, opts.record_transfers, 0, False, "python"),
            link_model=FixedLink(copy_engines=opts.copy_engines), compute=FixedCompute(),
            labels=labels, dense_before=dense_before, predictions=predictions,
            wall_clock=self.clock,
        )
        self.workload = workload
        self.shape = workload.shape
        self.cache: SlottedCache = self.plan.cache  # type: ignore[assignment]
        self.c = self.plan.c
        self.labels = self.plan.labels
        self.ropts = self.plan.ropts
        self.predictions = self.plan.predictions
        self.timeline: list[tuple[str, str, float, float]] = []
        self.engine_used = f"executor:{opts.backend}"
        self.started = False
        self.counting = True
        self.backend: Any = None
        self.copier: Copier | None = None
        self.link: Copier | None = None  # what build_result reads
        self.ctx = WallContext(self)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self.compute_s = 0.0
        self.handoff_s = 0.0  # copy finished -> the waiting main thread runs again
        self.waits = 0
        self.step_times: list[float] = []
        # (backend, compute) to run instead of the real ones: zero-cost stand-ins time the
        # loop itself (sim.executor.overhead); None: the backend of ``opts`` and torch ops.
        self.stand_ins: tuple[Any, Any] | None = None

    # -- timers (ctx.after) ------------------------------------------------------------------
    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (self.clock.elapsed() + max(delay, 0.0),
                                      self._timer_seq, fn))

    def _run_timers(self) -> None:
        timers = self._timers
        while timers and timers[0][0] <= self.clock.elapsed():
            _, _, fn = heapq.heappop(timers)
            self.clock.tick()
            fn()

    def _pump(self) -> None:
        """Apply finished copies, fire due timers, start prefetches on idle engines."""
        self.copier.drain(0.0)
        if self._timers:
            self._run_timers()
            self.copier.dispatch()

    def _wait(self) -> None:
        """Block until a copy finishes or a timer is due."""
        timeout = None
        if self._timers:
            timeout = max(self._timers[0][0] - self.clock.elapsed(), 1e-6)
        elif self.copier.in_flight == 0:
            raise SimulationError("waiting for an expert that no copy is bringing")
        self.copier.drain(timeout)
        if self._timers:
            self._run_timers()
            self.copier.dispatch()

    # -- setup -----------------------------------------------------------------------------
    def _make_backend(self) -> Any:
        cap = self.cache.pool.capacity
        if self.opts.backend == "storage":
            from moesim.sim.executor.storage import StorageBackend, default_work_dir, ensure_weights

            work = Path(self.opts.work_dir) if self.opts.work_dir else default_work_dir()
            path = ensure_weights(work, self.card.name, self.layout, self.opts.weights_seed)
            return StorageBackend(path, self.layout, cap, self.opts.direct_io,
                                  self.opts.pace_Bps)
        if self.opts.pace_Bps is not None:
            raise SimulationError("pace_Bps paces the storage backend's reads only")
        from moesim.sim.executor.cuda import CudaBackend

        return CudaBackend(self.layout, cap, self.opts.copy_engines, self.opts.weights_seed)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> RunResult:
        import torch

        from moesim.sim.executor.compute import TorchCompute

        w = self.workload
        pf = self.plan.prefetcher
        on_done = None
        if _overrides(pf, "on_transfer_done"):
            def on_done(key: int, was_prefetch: bool) -> None:
                self.clock.tick()
                pf.on_transfer_done(self.ctx, key, was_prefetch)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.opts.threads)
        backend = copier = None
        try:  # everything opened is closed, and torch's thread count restored, on any error
            if self.stand_ins is not None:
                self.backend = backend = self.stand_ins[0]
                self.compute = self.stand_ins[1]
            else:
                self.backend = backend = self._make_backend()
                dense_total = max(self.plan.dense_before) if any(self.plan.dense_before) else 0
                self.compute = TorchCompute(
                    self.card, self.shape.num_layers, int(w.context.max()),
                    int(w.tokens.max()), dense_total, seed=self.opts.weights_seed + 1,
                    device=backend.device,
                )
            self.copier = self.link = self.plan.link = copier = Copier(  # type: ignore[assignment]
                backend.load, self.opts.copy_engines, self.cache, self.cache.pool.slot_of,
                self.clock.elapsed, on_done=on_done, record=self.opts.record_transfers,
            )
            for key in self.cache.pool.held():  # pre-filled experts: loaded before the clock
                backend.load(key, self.cache.pool.slot_of(key), 0)
            self._warm_up()
            with torch.inference_mode():
                self._loop()
            end = self.clock.tick()
            copier.discard_queued()  # the run is over: not a policy's cancellation
            copier.wait_idle()
            self.clock.now = end
        finally:
            if copier is not None:
                copier.close()
            if backend is not None:
                backend.close()
            torch.set_num_threads(old_threads)
        self.c.unused_prefetches = self.cache.unused_prefetches()
        self.c.wasted_prefetches += self.cache.wasted_prefetches
        self.c.evictions += self.cache.evictions
        result = build_result(self)  # type: ignore[arg-type]
        result.summary.update(self.info())
        return result

    def _warm_up(self) -> None:
        """One untimed call of every op shape the run uses (a runtime warms its model up;
        torch's first call of a shape pays one-off setup that no step should)."""
        import torch

        w, comp = self.workload, self.compute
        sizes = {int(n) for n in np.unique(w.tokens)}
        if w.counts is not None:
            sizes |= {int(n) for n in np.unique(w.counts) if n > 0}
        slot = 0  # any slot's memory has the right shape; its contents do not matter here
        with torch.inference_mode():
            for n in sorted(sizes):
                comp.expert(self.backend.weights(slot), n)
                comp.shared(0, n)
            for n in {int(x) for x in np.unique(w.tokens)}:
                comp.attention(0, n, 1)
                if comp.dense:
                    comp.dense_layer(0, n, 1)
        self.backend.sync()

    def info(self) -> dict[str, Any]:
        """What only a real run has: setup and where its time went."""
        import torch

        c = self.c
        stall = c.stall_miss + c.stall_late
        out = {
            "source": "real",
            "executor.backend": self.opts.backend,
            "executor.dtype": self.card.dtype,
            "executor.torch_threads": torch.get_num_threads(),
            "executor.copy_engines": self.opts.copy_engines,
            "executor.compute_s": self.compute_s,
            "executor.overhead_s": c.time - self.compute_s - stall,
            "executor.waits": self.waits,
            "executor.copies": self.copier.copies,
            "executor.copy_mean_s": self.copier.busy / self.copier.copies
            if self.copier.copies else float("nan"),
            "executor.handoff_s": self.handoff_s,
            "executor.step_p50_s": float(np.median(self.step_times)) if self.step_times
            else float("nan"),
            "executor.torch_version": str(torch.__version__),
        }
        out.update({f"executor.{k}": v for k, v in self.backend.info().items()})
        return out

    def _loop(self) -> None:
        w, clock, c, cache = self.workload, self.clock, self.c, self.cache
        compute, copier, ctx = self.compute, self.copier, self.ctx
        pf = self.plan.prefetcher
        num_l = self.shape.num_layers
        hook_pre = _overrides(pf, "on_pre_attention")
        hook_routed = _overrides(pf, "on_routed")
        hook_issued = _overrides(pf, "on_demand_issued")
        hook_end = _overrides(pf, "on_layer_end")
        dense_n = self.plan.dense_before
        pin = self.plan.copts.pin_layer
        width = w.keys.shape[2]
        perf = time.perf_counter
        pf.on_start(ctx)
        self.started = self.plan.started = True
        # Every step's wall time (counted or not), indexed by step, as the simulator records
        # them: sim.metrics builds the per-request table and tpot percentiles from it.
        all_steps = c.step_times = []
        clock.start()
        for s in range(w.num_steps):
            clock.step = s
            # Counting first, as the simulator does: prefetches issued when a request joins
            # belong to this step.
            self.counting = self.plan._counting = clock.counting = counting = bool(w.counted[s])
            cache.counting = copier.counting = counting
            for rid in w.joins.get(s) or ():
                clock.tick()
                pf.on_request_start(ctx, rid)
            rows = w.keys[s].tolist()
            counts = None if w.counts is None else w.counts[s].tolist()
            ntok, context = int(w.tokens[s]), int(w.context[s])
            step_start = clock.elapsed()
            comp_s = 0.0
            for j in range(num_l):
                clock.layer = j
                clock.position = base = (s * num_l + j) * width
                self._pump()
                if hook_pre:
                    clock.tick()
                    pf.on_pre_attention(ctx, j)
                    self._pump()
                t0 = perf()
                for d in range(dense_n[j]):
                    compute.dense_layer(d, ntok, context)
                compute.attention(j, ntok, context)
                self.backend.sync()
                comp_s += perf() - t0
                keys = [k for k in rows[j] if k >= 0]
                if pin:
                    cache.pinned.update(keys)
                self._pump()
                if hook_routed:
                    clock.tick()
                    pf.on_routed(ctx, j, keys)
                    self._pump()
                clock.tick()
                kinds = self.plan._access(keys, j, counting)  # the simulator's rules
                copier.flush()  # the layer's demand copies start together
                clock.position = base + width - 1
                if hook_issued:
                    clock.tick()
                    pf.on_demand_issued(ctx, j, keys)
                copier.dispatch()
                row_counts = None if counts is None else counts[j]
                st_miss, st_late, busy = self._experts(j, keys, kinds, row_counts, ntok)
                comp_s += busy
                if counting:
                    c.stall_miss += st_miss
                    c.stall_late += st_late
                    c.layer_stall[j] += st_miss + st_late
                if pin:
                    cache.pinned.clear()
                if hook_end:
                    clock.tick()
                    pf.on_layer_end(ctx, j)
            clock.tick()
            pf.on_step_end(ctx)
            for ev in cache.evictors:
                ev.on_step_end()
            all_steps.append(clock.elapsed() - step_start)
            if counting:
                dt = clock.elapsed() - step_start
                c.steps += 1
                c.out_tokens += int(w.out_tokens[s])
                c.tokens += ntok
                c.pairs += int(w.pairs[s].sum())
                c.time += dt
                self.compute_s += comp_s
                self.step_times.append(dt)

    def _experts(self, layer: int, keys: list[int], kinds: list[int],
                 counts: list[int] | None, ntok: int) -> tuple[float, float, float]:
        """Shared experts, resident experts, then the others in arrival order. Returns the
        time waiting on misses, on late copies, and the compute time."""
        compute, backend, slot_of = self.compute, self.backend, self.cache.pool.slot_of
        state, arrival = self.cache.state, self.copier.arrival
        finished = self.copier.finished_at
        perf = time.perf_counter
        busy = 0.0
        t0 = perf()
        compute.shared(layer, ntok)
        for i, k in enumerate(kinds):
            if not k:
                compute.expert(backend.weights(slot_of(keys[i])), 1 if counts is None
                               else counts[i])
        backend.sync()
        busy += perf() - t0
        waiting = {keys[i]: (k, 1 if counts is None else counts[i])
                   for i, k in enumerate(kinds) if k}
        st = [0.0, 0.0]  # started prefetches, demand copies (misses and promoted)
        blocked = 0.0
        while waiting:
            self._pump()
            ready = [k for k in waiting if state[k] == RESIDENT]
            if not ready:
                t0 = perf()
                self._wait()
                blocked += perf() - t0
                continue
            key = min(ready, key=arrival.__getitem__)
            kind, n = waiting.pop(key)
            if blocked:
                st[kind != LATE] += blocked
                blocked = 0.0
                if self.counting:
                    self.waits += 1
                    self.handoff_s += max(self.clock.elapsed() - finished[key], 0.0)
            t0 = perf()
            compute.expert(backend.weights(slot_of(key)), n)
            backend.sync()
            busy += perf() - t0
        return st[1], st[0], busy


def execute(
    trace: Trace,
    policy: str | Mapping[str, Any] | PolicySpec,
    card: ModelCard,
    *,
    capacity: int,
    options: ExecutorOptions | None = None,
    partition: str = "global",
    prefill: str = "empty",
    replay: Replay = "decode",
    batch: int = 1,
    prefill_chunk: int = 0,
    warmup_tokens: int = 0,
    seed: int = 0,
    dense_before: Sequence[int] | None = None,
    predictions: Mapping[int, Any] | None = None,
) -> RunResult:
    """Replay ``trace`` under ``policy`` for real with a cache of ``capacity`` expert slots;
    the arguments mean what they mean for ``sim.run.simulate`` (the trace's expert bytes must
    be the card's)."""
    return prepare(trace, policy, card, capacity=capacity, options=options, partition=partition,
                   prefill=prefill, replay=replay, batch=batch, prefill_chunk=prefill_chunk,
                   warmup_tokens=warmup_tokens, seed=seed, dense_before=dense_before,
                   predictions=predictions).run()


def prepare(
    trace: Trace,
    policy: str | Mapping[str, Any] | PolicySpec,
    card: ModelCard,
    *,
    capacity: int,
    options: ExecutorOptions | None = None,
    partition: str = "global",
    prefill: str = "empty",
    replay: Replay = "decode",
    batch: int = 1,
    prefill_chunk: int = 0,
    warmup_tokens: int = 0,
    seed: int = 0,
    dense_before: Sequence[int] | None = None,
    predictions: Mapping[int, Any] | None = None,
) -> Executor:
    """``execute`` up to the run: every check of the trace, card, policy and cache (no file
    opened, no thread started), so a sweep can refuse bad input before its first real run."""
    spec = as_spec(policy)
    workload = build_workload(trace, replay=replay, batch=batch, prefill_chunk=prefill_chunk,
                              warmup_tokens=warmup_tokens)
    ex = Executor(
        workload, spec, card, CacheOptions(capacity, partition, True, prefill, False),
        options or ExecutorOptions(), seed=seed,
        labels={"layer_ids": list(trace.meta.moe_layers)}, dense_before=dense_before,
        predictions=predictions,
    )
    return ex
