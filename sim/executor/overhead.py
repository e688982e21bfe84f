"""The executor's own costs beyond its ops and reads, as a runtime profile.

A profile of the machine (``moesim-profile storage``, ``sim.executor.calibrate``) times the ops
and the reads; a run of the executor also pays

* the **copy hand-off**: from the compute thread issuing a demand copy to it running again once
  the copy worker reports it, beyond the read itself (``calibrate.measure_handoff``: the
  executor's own cache, ``Copier`` queue and worker thread);
* the **run loop's own work** per decode step, per layer and per expert call (policy hooks, the
  cache's bookkeeping, the copier's queue checks, the timers it reads), outside the timed ops,
  and per copy the main thread's work for a miss (the eviction, the reservation, submitting
  and draining the copy) beyond the hand-off wait. :func:`measure_loop_overhead` times it by
  running the executor's loop itself (``sim.executor.run.Executor``) with zero-cost stand-ins
  for the ops and the reads (:class:`NullCompute`, :class:`NullBackend`; the copies go through
  the real ``Copier`` and its worker thread) on a synthetic routing of the card's shape, once
  with every expert resident and once with a cache that misses, the time blocked waiting for a
  copy left out (that wait is the hand-off, measured with a real read).

Both are software costs of this runtime, not of the machine's hardware, so they are written as a
runtime profile (``hw_profiles/runtimes/``, the ``runtime`` axis): ``copy.per_copy_s`` and
``overhead.step_s`` / ``layer_s`` / ``expert_s``. The simulator then charges them through its
one cost model (``hw_profiles.runtime.apply_runtime``: both engines), with no engine code of its
own. Microbenchmarks only: never an end-to-end run of the workload a validation predicts.
"""

from __future__ import annotations

import itertools
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim.traces.model_card import ModelCard

RUNTIME_NAME = "moesim_executor"


class NullBackend:
    """The storage backend's interface with nothing behind it: a zero-cost read."""

    name = "null"
    device = "cpu"

    def load(self, key: int, slot: int, engine: int = 0) -> None:
        return None

    def weights(self, slot: int) -> tuple[Any, Any, Any]:
        return (None, None, None)

    def sync(self) -> None:
        return None

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None


class NullCompute:
    """``TorchCompute``'s calls as the run loop makes them, each doing nothing."""

    dense: list[Any] = []

    def attention(self, layer: int, tokens: int, context: int) -> None:
        return None

    def dense_layer(self, index: int, tokens: int, context: int) -> None:
        return None

    def shared(self, layer: int, tokens: int) -> None:
        return None

    def expert(self, weights: tuple[Any, Any, Any], tokens: int) -> None:
        return None


@dataclass(frozen=True)
class LoopOverhead:
    """The run loop's cost per step = ``step_s + layers x layer_s + expert calls x expert_s``
    (the simulator's runtime formula, ``RuntimeCompute``), fitted to the timed points."""

    step_s: float
    layer_s: float
    expert_s: float
    points: tuple[tuple[int, int, float], ...]  # (layers, expert calls per step, s per step)
    steps: int  # counted steps timed per point and round
    rounds: int
    at: str

    copy_s: float = 0.0  # the main thread's work per demand copy, beyond the hand-off wait
    copy_points: tuple[tuple[float, float], ...] = ()  # (copies per step, s per step beyond
    #                                                    the all-resident loop)

    def per_step(self, layers: int, calls: int) -> float:
        return self.step_s + layers * self.layer_s + calls * self.expert_s


def _variant(card: ModelCard, layers: int, top_k: int) -> ModelCard:
    """The card with ``layers`` MoE layers (no dense ones) and ``top_k`` experts per token: the
    ops do nothing here, so only the loop's shape matters (float32: a dtype the executor takes)."""
    return replace(card, name=f"{card.name}_loop", num_layers=layers,
                   moe_layers=tuple(range(layers)), top_k=top_k, dtype="float32",
                   experts_bits=None, attention_bits=None, shared_bits=None)


def _routing_trace(card: ModelCard, tokens: int, seed: int) -> Any:
    from moesim.traces.trace import DECODE, RequestRouting, Trace, TraceMeta

    rng = np.random.default_rng(seed)
    ex = np.empty((tokens, card.num_moe_layers, card.top_k), dtype=np.int16)
    for t in range(tokens):
        for j in range(card.num_moe_layers):
            ex[t, j] = rng.choice(card.num_experts, size=card.top_k, replace=False)
    meta = TraceMeta(model=card.name, moe_layers=tuple(card.moe_layers),
                     num_experts=card.num_experts, top_k=card.top_k,
                     num_shared_experts=card.num_shared_experts,
                     expert_bytes=card.expert_bytes, source="sim.executor.overhead (synthetic)")
    return Trace(meta, [RequestRouting(0, ex, np.full(tokens, DECODE, dtype=np.uint8))])


def loop_step_time(card: ModelCard, layers: int, top_k: int, steps: int, seed: int = 0,
                   policy: str = "lru", capacity: int | None = None) -> tuple[float, float]:
    """(mean seconds per counted decode step, demand copies per step) of the executor's run
    loop over a card of ``layers`` MoE layers and ``top_k`` experts per token, every op and
    read a no-op. ``capacity`` None: a cache of every expert, filled before the clock (every
    access a hit: no copy); else that many slots, starting full, so accesses miss and copies go
    through the real ``Copier``. The time blocked waiting for a copy is left out."""
    from moesim.sim.executor.run import prepare

    v = _variant(card, layers, top_k)
    trace = _routing_trace(v, steps + 2, seed)
    total = v.num_moe_layers * v.num_experts
    ex = prepare(trace, policy, v, capacity=total if capacity is None else capacity,
                 prefill="random", warmup_tokens=2, seed=seed)
    ex.stand_ins = (NullBackend(), NullCompute())
    ex.run()
    c = ex.c
    n = max(c.steps, 1)
    assert ex.copier is not None
    return (c.time - c.stall_miss - c.stall_late) / n, ex.copier.started[0] / n


def _shape_points(card: ModelCard) -> list[tuple[int, int]]:
    """(layers, top_k) of the timed loops: the card's own and a smaller one in each, so the
    step, layer and expert terms are told apart."""
    big_l, big_k = card.num_moe_layers, card.top_k
    small_l = max(1, big_l // 4) if big_l >= 4 else big_l + 3
    ks = sorted({1, big_k}) if card.num_experts > 1 else [1]
    if len(ks) == 1 and card.num_experts > 1:
        ks.append(2)
    return [(lay, k) for lay in (small_l, big_l) for k in ks]


def fit_loop(points: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Non-negative least squares of ``t = step + layers x layer + calls x expert`` over the
    timed points (a term the noise would make negative is dropped and the rest refitted).

    Exact by enumeration: the least-squares fit on every subset of the three terms, the best
    one with no negative coefficient (the NNLS optimum is such a fit on its non-zero terms).
    Three unknowns need no solver library (scipy is not a dependency of this project)."""
    a = np.array([[1.0, float(lay), float(calls)] for lay, calls, _ in points])
    b = np.array([t for _, _, t in points])
    best, best_r = np.zeros(3), float(b @ b)  # the empty subset: every term 0
    for cols in itertools.chain.from_iterable(
            itertools.combinations(range(3), n) for n in (1, 2, 3)):
        sub = a[:, cols]
        coef, *_ = np.linalg.lstsq(sub, b, rcond=None)
        if (coef < 0).any():
            continue
        r = float(np.sum((sub @ coef - b) ** 2))
        if r < best_r - 1e-30:
            best, best_r = np.zeros(3), r
            best[list(cols)] = coef
    return float(best[0]), float(best[1]), float(best[2])


def miss_capacity(card: ModelCard) -> int:
    """Slots of the missing loop: an eighth of the experts (a 10-25 % cache misses most of
    the time under random routing), at least what one layer's experts need."""
    return max(3 * card.top_k, card.num_moe_layers * card.num_experts // 8)


def measure_loop_overhead(card: ModelCard, steps: int = 200, rounds: int = 3, seed: int = 0
                          ) -> LoopOverhead:
    """Time the executor's loop with zero-cost ops (:func:`loop_step_time`) at the shapes of
    :func:`_shape_points` with every expert resident, and at the card's own shape with a cache
    that misses (:func:`miss_capacity`), ``rounds`` interleaved rounds (a burst of load hits
    every point), the mean per point. The resident points fit the step, layer and expert terms
    (expert calls per step count a layer's shared-expert call, as the simulator's runtime model
    does: ``RuntimeCompute.shared_time`` adds ``expert_s``); the missing loop's time beyond the
    resident loop of the same shape, per demand copy, is ``copy_s``."""
    shapes = _shape_points(card)
    shared = 1 if card.shared_intermediate_size > 0 else 0
    own = (card.num_moe_layers, card.top_k)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    miss_t: list[float] = []
    miss_n: list[float] = []
    for r in range(max(rounds, 1)):
        for lay, k in shapes:
            times[(lay, k)].append(loop_step_time(card, lay, k, steps, seed + r)[0])
        t, n = loop_step_time(card, *own, steps, seed + r, capacity=miss_capacity(card))
        miss_t.append(t)
        miss_n.append(n)
    points = tuple((lay, lay * (k + shared), float(np.mean(times[(lay, k)])))
                   for lay, k in shapes)
    step_s, layer_s, expert_s = fit_loop(points)
    resident = float(np.mean(times[own]))  # the same shape, every expert resident
    copies = float(np.mean(miss_n))
    extra = float(np.mean(miss_t)) - resident
    copy_s = max(extra / copies, 0.0) if copies > 0 else 0.0
    return LoopOverhead(step_s, layer_s, expert_s, points, steps, max(rounds, 1),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), copy_s,
                        ((copies, extra),))


def _q(value: float, unit: str, source: str) -> dict[str, Any]:
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    return {"value": float(f"{value * scale:.6g}"), "unit": unit, "kind": "measured",
            "source": source}


def host_s_supported() -> bool:
    """Whether this simulator's runtime profiles take ``copy.host_s`` (the compute thread's
    work per demand copy, charged in series with the layer: ``sim.link.CopyRules``)."""
    from moesim.hw_profiles.runtime import FITTABLE

    return "copy.host_s" in FITTABLE


def runtime_mapping(loop: LoopOverhead, handoff_s: float | None, card: ModelCard,
                    where: str, handoff_note: str = "", copies: CopyHost | None = None
                    ) -> dict[str, Any]:
    """The runtime profile of the executor (``hw_profiles.runtime.runtime_from_mapping``):
    ``copy.per_copy_s`` = the copy hand-off (``handoff_s``; None: left out, ``handoff_note``
    saying where the profile already holds it) + the loop's main-thread work per copy
    (``loop.copy_s``), ``overhead.*`` = ``loop``'s fit. With ``copies`` (``measure_copy_host``)
    and a simulator that charges ``copy.host_s``: the compute thread's copier calls per copy
    are ``copy.host_s`` (host work in series with the layer, not on the link), the copies'
    slowdown beside the ops is ``copy.efficiency`` (plain read time / the copier's copy time
    beside compute), and ``per_copy_s`` keeps the hand-off only (the loop's work per copy is
    in ``host_s``)."""
    pts = "; ".join(f"{lay} layers x {calls} expert calls: {t * 1e6:.1f} us"
                    for lay, calls, t in loop.points)
    loop_src = (f"{where} at {loop.at} on {platform.node()}: sim.executor.overhead."
                f"measure_loop_overhead, the executor's run loop (sim.executor.run) with "
                f"zero-cost ops and reads, every expert resident, {loop.steps} decode steps x "
                f"{loop.rounds} interleaved rounds per shape of {card.name}; mean s per step = "
                f"step_s + layers x layer_s + expert calls x expert_s, non-negative least "
                f"squares over ({pts})")
    copy_pts = "; ".join(f"{n:.1f} demand copies per step, {t * 1e6:.1f} us per step more"
                         for n, t in loop.copy_points)
    miss_src = (f"the loop's main-thread work per demand copy {loop.copy_s * 1e6:.2f} us "
                f"(sim.executor.overhead.measure_loop_overhead: the same zero-cost loop with "
                f"a cache that misses, {copy_pts} than with every expert resident, time blocked "
                f"on a copy left out)")
    if handoff_s is None:
        copy_q = _q(loop.copy_s, "us", f"{where} at {loop.at}: {miss_src}; the copy hand-off "
                    f"left out: {handoff_note or 'not measured here'}")
    else:
        copy_q = _q(handoff_s + loop.copy_s, "us",
                    f"{where} at {loop.at}: copy hand-off {handoff_s * 1e6:.1f} us "
                    f"(sim.executor.calibrate.measure_handoff, mean time "
                    f"from the compute thread issuing a demand copy to it running again once the "
                    f"executor's copy worker reports it, minus the read itself: the executor's "
                    f"cache, Copier queue and worker thread, O_DIRECT reads of {card.name}) + "
                    f"{miss_src}")
    copy: dict[str, Any] = {"per_copy_s": copy_q}
    if copies is not None and host_s_supported():
        copy = {"per_copy_s": _q(handoff_s or 0.0, "us", (
                    f"{where} at {loop.at}: copy hand-off {(handoff_s or 0.0) * 1e6:.1f} us "
                    f"(sim.executor.calibrate.measure_handoff, mean time from the compute "
                    f"thread issuing a demand copy to it running again once the executor's copy "
                    f"worker reports it, minus the read itself)"
                    if handoff_s is not None else
                    f"{where}: 0, the copy hand-off left out: "
                    f"{handoff_note or 'not measured here'}")
                    + "; the loop's main-thread work per copy is copy.host_s here (the "
                    f"zero-cost loop's {loop.copy_s * 1e6:.2f} us per demand copy not added)"),
                "host_s": copy_host_quantity(copies, card, where)}
        eff = copy_efficiency(copies)
        if eff < 1.0:
            copy["efficiency"] = {
                "value": float(f"{eff:.4g}"), "unit": "1", "kind": "measured",
                "source": (f"{_copies_text(copies, card, where)}; plain reads by "
                           f"{copies.engines} thread(s) at the same moment "
                           f"{copies.read_s * 1e6:.1f} us / the copier's copies beside the ops "
                           f"{copies.copy_mean_s * 1e6:.1f} us (with the compute thread idle "
                           f"{copies.copy_idle_s * 1e6:.1f} us): the executor's copies run at "
                           f"this share of the read rate while it computes")}
    return {
        "name": RUNTIME_NAME,
        "system": "moesim's offloading executor (sim/executor/, backend storage)",
        "description": ("the executor's copy hand-off, the compute thread's work per copy and "
                        "its run loop's Python work per step, layer and expert call, measured "
                        "on this machine"),
        "copy": copy,
        "overhead": {
            "step_s": _q(loop.step_s, "us", loop_src),
            "layer_s": _q(loop.layer_s, "us", loop_src),
            "expert_s": _q(loop.expert_s, "us", loop_src),
        },
        "notes": ("Measured, never fitted to an end-to-end run. The simulator charges step_s "
                  "spread over the card's layers and layer_s per layer, dense ones included "
                  "(the executor's loop pays it per MoE layer: a card with dense layers is "
                  "charged layer_s once more per dense layer); expert_s per routed and shared "
                  "expert call; per_copy_s on every copy (prefetches too, whose main-thread "
                  "work is smaller: no eviction decision at issue); host_s (when present) per "
                  "demand copy on the compute thread, right after routing, and per prefetch "
                  "copy started since the previous routing, at the next routing (the executor "
                  "pays it for prefetches at the pump that starts and drains them)."),
    }


@dataclass(frozen=True)
class AfterCopy:
    """One expert FFN timed right after its copy landed and once more at once (seconds)."""

    after_copy_s: float
    again_s: float
    samples: int
    at: str


def measure_after_copy(card: ModelCard, work_dir: Any = None, direct_io: bool | None = None,
                       threads: int = 1, samples: int = 200, seed: int = 0) -> AfterCopy:
    """Mean time of one expert FFN at 1 token on a slot right after the executor's read path
    (``StorageBackend.load``: O_DIRECT, so no CPU cache holds the new bytes) filled it, and of
    the same call repeated at once (the weights now cached). A run computes most copied experts
    right after their copy; the simulator has no term for the difference (recorded, not
    charged)."""
    import torch

    from moesim.sim.executor.compute import TorchCompute
    from moesim.sim.executor.model import ExpertLayout
    from moesim.sim.executor.storage import StorageBackend, default_work_dir, ensure_weights

    layout = ExpertLayout.of(card)
    path = ensure_weights(default_work_dir() if work_dir is None else Path(work_dir), card.name,
                          layout, 0)
    slots = 16
    backend = StorageBackend(path, layout, slots, direct_io)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    cold: list[float] = []
    warm: list[float] = []
    perf = time.perf_counter
    try:
        comp = TorchCompute(card, 1, 1, 1, 0, seed=seed + 1)
        with torch.inference_mode():
            for s in range(slots):  # every slot and the op warmed up once
                backend.load(s % layout.num_keys, s)
                comp.expert(backend.weights(s), 1)
            for r in range(samples):
                s = r % slots
                backend.load(int(rng.integers(layout.num_keys)), s)
                t0 = perf()
                comp.expert(backend.weights(s), 1)
                t1 = perf()
                comp.expert(backend.weights(s), 1)
                cold.append(t1 - t0)
                warm.append(perf() - t1)
    finally:
        torch.set_num_threads(old)
        backend.close()
    return AfterCopy(float(np.mean(cold)), float(np.mean(warm)), samples,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def after_copy_quantity(m: AfterCopy, card: ModelCard, where: str) -> dict[str, Any]:
    """``m`` as a ``{value, unit, kind, source}`` record (the warm time in its source)."""
    return _q(m.after_copy_s, "us",
              f"{where} at {m.at}: sim.executor.overhead.measure_after_copy, one expert FFN of "
              f"{card.name} at 1 token right after StorageBackend.load (O_DIRECT) filled its "
              f"slot, mean of {m.samples}; the same call repeated at once: "
              f"{m.again_s * 1e6:.1f} us. Recorded, not charged: the simulator has no term for "
              f"compute right after a copy")


@dataclass(frozen=True)
class CopyHost:
    """What copies cost the compute thread while the ops run, and what the ops cost the copies
    (seconds; :func:`measure_copy_host`)."""

    issue_s: float  # the compute thread's copier calls per copy (drain, reserve, submit, wake)
    op_factor: float  # op time with the copy workers kept busy / op time alone
    host_s: float  # all extra compute-thread time per copy: (with copies - alone) / copies
    alone_s: float  # mean seconds per pass of the ops, no copy running
    with_copies_s: float  # the same passes with the copy workers kept busy (copier calls too)
    copies_per_pass: float
    copy_mean_s: float  # the copy workers' mean time per copy beside the ops
    copy_idle_s: float  # ... with the compute thread idle (blocked until a copy lands)
    read_s: float  # the same reads by ``engines`` plain threads (no copier), same moment
    engines: int
    passes: int  # passes per variant and round
    rounds: int
    at: str
    load: float = float("nan")  # 1-minute load average at the end


def measure_copy_host(card: ModelCard, engines: int = 2, threads: int = 1,
                      direct_io: bool | None = None, work_dir: Any = None, rounds: int = 5,
                      passes: int = 20, seed: int = 0) -> CopyHost:
    """Copies beside compute, measured the way a run of the executor incurs them.

    The compute thread runs every MoE layer's ops as the run loop calls them (``TorchCompute``:
    stand-in attention and router, the shared experts, ``top_k`` routed experts at one token,
    weights cycled over a step's working set), ``passes`` times per variant: (a) alone; (b)
    while the executor's own copy path (``SlottedCache`` with LRU, ``Copier`` with ``engines``
    worker threads, ``StorageBackend`` reads of the card's weights file) is kept busy: before
    every op call the compute thread drains finished copies and submits new ones until every
    worker has one, as the loop pumps the copier between experts; (c) the same copies with
    the compute thread idle, blocked until a copy lands (a demand miss's wait). From (a) and
    (b): the compute thread's copier calls per copy (``issue_s``, timed around them), its op
    time with the workers busy over alone (``op_factor``: the workers' CPU, ``O_DIRECT`` page
    pinning and their turns at the GIL run in series with compute on a machine with few
    cores), and all its extra time per copy (``host_s``); from (b) and (c) the copy time
    beside compute and beside an idle compute thread; (d) the same number of reads by
    ``engines`` plain threads (``StorageBackend.load``, no copier: what a read profile times),
    so (c) - (d) is the copy path's own time per copy. ``rounds`` interleaved rounds (a, b,
    c, d), the means of all."""
    import torch

    from moesim.policies.base import ModelShape, PolicySetup
    from moesim.policies.lru import LRU
    from moesim.sim.cache import ABSENT
    from moesim.sim.executor.calibrate import _read_times, expert_pool_slots
    from moesim.sim.executor.clock import WallClock
    from moesim.sim.executor.compute import TorchCompute
    from moesim.sim.executor.copier import Copier
    from moesim.sim.executor.model import ExpertLayout
    from moesim.sim.executor.slots import SlottedCache
    from moesim.sim.executor.storage import StorageBackend, default_work_dir, ensure_weights

    layout = ExpertLayout.of(card)
    path = ensure_weights(default_work_dir() if work_dir is None else Path(work_dir), card.name,
                          layout, 0)
    pool = expert_pool_slots(card)
    cap = 2 * engines + 2
    shape = ModelShape(card.num_moe_layers, card.num_experts, card.top_k, card.expert_bytes)
    ev = LRU(PolicySetup(shape, cap, WallClock(), np.random.default_rng(seed)))
    cache = SlottedCache(card.num_experts, [0] * card.num_moe_layers, [cap], [ev])
    ops_backend = StorageBackend(path, layout, pool, direct_io)
    backend = copier = None
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, layout.num_keys, size=1 << 16).tolist()
    ki = 0
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    nl = max(card.num_moe_layers, 1)
    perf = time.perf_counter
    alone: list[float] = []
    busy: list[float] = []
    issue: list[float] = []
    copies: list[int] = []
    beside: list[float] = []
    idle: list[float] = []
    plain: list[float] = []
    try:
        backend = StorageBackend(path, layout, cap, direct_io)
        copier = Copier(backend.load, engines, cache, cache.pool.slot_of, perf, record=True)
        records = copier.records
        assert records is not None
        for s in range(pool):
            ops_backend.load(s % layout.num_keys, s)
        weights = [ops_backend.weights(s) for s in range(pool)]
        comp = TorchCompute(card, nl, 64, 1, 0, seed=seed + 1)
        calls: list[Any] = []
        for j in range(nl):
            calls.append(lambda j=j: comp.attention(j, 1, 64))
            if card.shared_intermediate_size:
                calls.append(lambda j=j: comp.shared(j, 1))
            for k in range(card.top_k):
                w = weights[(j * card.top_k + k) % pool]
                calls.append(lambda w=w: comp.expert(w, 1))

        def fill() -> None:
            nonlocal ki
            while copier.in_flight < engines:
                key = keys[ki % len(keys)]
                ki += 1
                if cache.state[key] == ABSENT and cache.reserve(key, prefetch=False):
                    copier.submit_demand(key)
            copier.flush()

        def run(with_copies: bool) -> tuple[float, float]:
            spent = 0.0
            t0 = perf()
            for _ in range(passes):
                for call in calls:
                    if with_copies:
                        t1 = perf()
                        copier.drain(0.0)
                        fill()
                        spent += perf() - t1
                    call()
            return perf() - t0, spent

        def copy_times(since: int) -> list[float]:
            return [e - s for _, _, s, e in records[since:]]

        with torch.inference_mode():
            run(False)  # warm-up: every op and the copy path once
            run(True)
            copier.wait_idle()
            for _ in range(max(rounds, 1)):
                alone.append(run(False)[0])
                n0, r0 = copier.copies, len(records)
                t, spent = run(True)
                copier.wait_idle()
                busy.append(t)
                issue.append(spent)
                copies.append(copier.copies - n0)
                beside.extend(copy_times(r0))
                r0 = len(records)
                for _ in range(copies[-1]):  # (c): as many copies, the compute thread idle
                    fill()
                    copier.drain(None)
                copier.wait_idle()
                idle.extend(copy_times(r0))
                for k in list(cache.pool.held()):  # (d) reads into the copier's slots
                    cache.evict(k)
                plain.extend(_read_times(backend, layout, engines,
                                         max(copies[-1] // engines, 1), seed + len(plain)))
    finally:
        torch.set_num_threads(old)
        if copier is not None:
            copier.close()
        if backend is not None:
            backend.close()
        ops_backend.close()
    n = float(np.sum(copies))
    total = passes * max(rounds, 1)
    t_alone, t_busy, t_issue = float(np.sum(alone)), float(np.sum(busy)), float(np.sum(issue))
    return CopyHost(
        issue_s=t_issue / n if n else 0.0,
        op_factor=(t_busy - t_issue) / t_alone if t_alone > 0 else 1.0,
        host_s=max(t_busy - t_alone, 0.0) / n if n else 0.0,
        alone_s=t_alone / total, with_copies_s=t_busy / total, copies_per_pass=n / total,
        copy_mean_s=float(np.mean(beside)) if beside else float("nan"),
        copy_idle_s=float(np.mean(idle)) if idle else float("nan"),
        read_s=float(np.mean(plain)) if plain else float("nan"),
        engines=engines, passes=passes, rounds=max(rounds, 1),
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), load=_load())


def _load() -> float:
    import os

    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def _copies_text(m: CopyHost, card: ModelCard, where: str) -> str:
    return (f"{where} at {m.at}: sim.executor.overhead.measure_copy_host, {card.name}: every "
            f"MoE layer's ops as the run loop calls them, {m.passes} passes x {m.rounds} "
            f"interleaved rounds alone and with the executor's Copier ({m.engines} worker(s), "
            f"StorageBackend reads, SlottedCache) kept busy, drained and refilled before every "
            f"op call as the loop pumps it: {m.copies_per_pass:.1f} copies per pass, "
            f"{m.alone_s * 1e3:.3f} ms per pass alone, {m.with_copies_s * 1e3:.3f} ms with "
            f"copies; load average {m.load:.2f}")


def copy_host_quantity(m: CopyHost, card: ModelCard, where: str) -> dict[str, Any]:
    """``copy.host_s`` of the runtime: the compute thread's copier calls per copy."""
    return _q(m.issue_s, "us",
              f"{_copies_text(m, card, where)}; the compute thread's time in the copier's calls "
              f"(drain, reserve with the eviction, submit, wake a worker) per copy "
              f"{m.issue_s * 1e6:.1f} us (all its extra time per copy {m.host_s * 1e6:.1f} us, "
              f"the rest its ops slowed x{m.op_factor:.3f}: machine.compute_under_io)")


def copies_record(m: CopyHost, card: ModelCard, where: str) -> dict[str, Any]:
    """The profile's ``machine.executor_copies``: every figure of ``m`` with its source."""
    return {
        "source": _copies_text(m, card, where),
        "engines": m.engines,
        "issue_s": _q(m.issue_s, "us", "the compute thread's copier calls per copy"),
        "op_factor": {"value": float(f"{m.op_factor:.4g}"), "unit": "1", "kind": "measured",
                      "source": "op time with the copy workers busy / alone (the copier's "
                                "calls left out)"},
        "host_s": _q(m.host_s, "us", "all extra compute-thread time per copy"),
        "copy_beside_compute_s": _q(m.copy_mean_s, "us", "the workers' mean time per copy "
                                    "beside the ops"),
        "copy_idle_s": _q(m.copy_idle_s, "us", "the same with the compute thread blocked "
                          "until a copy lands"),
        "read_s": _q(m.read_s, "us", f"the same reads by {m.engines} plain threads "
                     "(StorageBackend.load, no copier)"),
    }


def copy_efficiency(m: CopyHost) -> float:
    """The runtime's ``copy.efficiency`` from ``m``: plain reads' time over the copier's copy
    time beside the ops (1 when the copies were no slower, or either is unknown)."""
    if not (m.read_s > 0 and m.copy_mean_s > 0 and math.isfinite(m.read_s)
            and math.isfinite(m.copy_mean_s)):
        return 1.0
    return min(1.0, m.read_s / m.copy_mean_s)


def compute_under_copies(m: CopyHost) -> dict[str, float]:
    """``machine.compute_under_io`` (``sim.executor.calibrate.under_io``: every op's time
    multiplied) from ``m``: the ops slowed beside the executor's own copy workers."""
    return {op: float(f"{m.op_factor:.4g}")
            for op in ("expert", "attention", "router", "shared", "dense")}
