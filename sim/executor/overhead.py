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


def runtime_mapping(loop: LoopOverhead, handoff_s: float | None, card: ModelCard,
                    where: str, handoff_note: str = "") -> dict[str, Any]:
    """The runtime profile of the executor (``hw_profiles.runtime.runtime_from_mapping``):
    ``copy.per_copy_s`` = the copy hand-off (``handoff_s``; None: left out, ``handoff_note``
    saying where the profile already holds it) + the loop's main-thread work per copy
    (``loop.copy_s``), ``overhead.*`` = ``loop``'s fit."""
    pts = "; ".join(f"{lay} layers x {calls} expert calls: {t * 1e6:.1f} us"
                    for lay, calls, t in loop.points)
    loop_src = (f"{where} at {loop.at} on {platform.node()}: sim.executor.overhead."
                f"measure_loop_overhead, the executor's run loop (sim.executor.run) with "
                f"zero-cost ops and reads, every expert resident, {loop.steps} decode steps x "
                f"{loop.rounds} interleaved rounds per shape of {card.name}; mean s per step = "
                f"step_s + layers x layer_s + expert calls x expert_s, non-negative least "
                f"squares over ({pts})")
    copies = "; ".join(f"{n:.1f} demand copies per step, {t * 1e6:.1f} us per step more"
                       for n, t in loop.copy_points)
    miss_src = (f"the loop's main-thread work per demand copy {loop.copy_s * 1e6:.2f} us "
                f"(sim.executor.overhead.measure_loop_overhead: the same zero-cost loop with "
                f"a cache that misses, {copies} than with every expert resident, time blocked "
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
    return {
        "name": RUNTIME_NAME,
        "system": "moesim's offloading executor (sim/executor/, backend storage)",
        "description": ("the executor's copy hand-off and its run loop's Python work per step, "
                        "layer and expert call, measured on this machine"),
        "copy": {"per_copy_s": copy_q},
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
                  "work is smaller: no eviction decision at issue)."),
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
