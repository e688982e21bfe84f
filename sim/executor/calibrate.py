"""Microbenchmarks of this machine with the executor's own read path and ops -> a profile.

Means, not medians: a run's time is the *sum* of its calls and copies, and on a shared machine
their distributions have long tails (preemption) that a median drops; in-run medians matched
these microbenchmarks' medians while in-run means were 60-80 % higher (provisional, load ~4.5
on 2 cores).

Profile first, predict after: these time single operations in isolation (one expert read, one
expert FFN, one stand-in attention, ...) and never an end-to-end run, so a validation that
predicts executor runs from this profile is not fitted to them. Each op cycles through as
many distinct weights as a run touches (every layer's attention, a pool of expert slots), so
CPU caches are as cold as in the run. Reads are timed with ``copy_engines`` readers at once,
as the run's copy workers read. Used by ``experiments/validate.py`` when no measured profile is
given (``validate.calibrate=true``); ``moesim-profile`` measures the same ops for a standalone
profile.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.sim.executor.model import ExpertLayout
from moesim.sim.executor.storage import StorageBackend, default_work_dir, ensure_weights
from moesim.traces.model_card import ModelCard


@dataclass(frozen=True)
class CalibrationOptions:
    reads: int = 48  # expert reads per reader
    reps: int = 100  # timed rounds (one call of every compute point each) at least ...
    min_seconds: float = 1.0  # ... and for at least this long
    tokens: tuple[int, ...] = (1, 2, 4, 8)
    contexts: tuple[int, ...] = (1, 8, 32, 128, 512)
    copy_engines: int = 1
    threads: int = 1
    direct_io: bool | None = None
    work_dir: str | None = None
    weights_seed: int = 0
    read_seed: int = 0  # which experts the read timing picks
    slots: int = 32  # distinct experts the FFN timing cycles through
    handoff: bool = True  # profile the copy hand-off into the per-copy latency
    contention: bool = True  # also time compute while a reader thread keeps the link busy
    pace_Bps: float | None = None  # the executor's paced tier: profile its per-read lag
    loop_overhead: bool = True  # time the run loop's own work (sim.executor.overhead)
    loop_steps: int = 200  # decode steps per timed loop shape and round


def _mean_call(fn: Callable[[int], None], reps: int, cycle: int) -> float:
    """Mean seconds of ``fn(i)`` over ``reps`` calls, i cycling over ``cycle`` weight sets
    (after one untimed pass)."""
    for i in range(min(cycle, reps)):
        fn(i)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r % cycle)
        times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def _busy_reader(backend: StorageBackend, layout: ExpertLayout, slot: int
                 ) -> Callable[[], None]:
    """Start a thread that reads experts back to back into ``slot`` (a copy worker with the
    link always busy); returns the function that stops it."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def loop() -> None:
        k = 0
        try:
            while not stop.is_set():
                backend.load((k * 7919) % layout.num_keys, slot, 0)
                k += 1
        except BaseException as exc:  # surfaced by halt(): a dead reader would fake "no slowdown"
            failed.append(exc)

    t = threading.Thread(target=loop, name="moesim-calibrate-reader", daemon=True)
    t.start()

    def halt() -> None:
        stop.set()
        t.join()
        if failed:
            raise failed[0]

    return halt


def under_io(mapping: dict[str, Any], card: ModelCard) -> dict[str, Any]:
    """The profile with every compute time multiplied by its op's measured slowdown while a
    copy worker reads (``machine.compute_under_io``): the compute of a link-bound run, whose
    link is busy nearly all the time. A first-order stand-in for a contention term the
    simulator does not have (it would apply the factor only while a copy is in flight)."""
    factors = mapping.get("machine", {}).get("compute_under_io") or {}
    if not factors:
        return mapping
    ops = {"expert_s": "expert", "attention_s": "attention", "router_s": "router",
           "shared_s": "shared", "dense_layer_s": "dense"}
    table = dict(mapping["compute"]["measured"][card.name])
    for key, op in ops.items():
        if key in table and op in factors:
            q = dict(table[key])
            q["value"] = [[x, float(f"{y * factors[op]:.6g}")] for x, y in q["value"]]
            q["source"] = f"{q['source']} x {factors[op]:.3g} (measured slowdown under I/O)"
            table[key] = q
    return {**mapping, "compute": {**mapping["compute"],
                                   "measured": {**mapping["compute"]["measured"],
                                                card.name: table}}}


def _interleaved_means(jobs: Sequence[tuple[str, int, Callable[[int], None], int]],
                       reps: int, min_seconds: float) -> dict[tuple[str, int], float]:
    """Mean seconds per call of every job, timed round-robin (one call of each job per round,
    each cycling through its weight sets) for at least ``reps`` rounds and ``min_seconds``:
    all ops sample the same stretch of a shared machine's load, long enough that a burst of
    it moves every mean alike instead of one op's."""
    for _, _, fn, cycle in jobs:  # one untimed pass over every weight set
        for i in range(cycle):
            fn(i)
    sums = [0.0] * len(jobs)
    rounds = 0
    start = time.perf_counter()
    perf = time.perf_counter
    while rounds < reps or perf() - start < min_seconds:
        for j, (_, _, fn, cycle) in enumerate(jobs):
            t0 = perf()
            fn(rounds % cycle)
            sums[j] += perf() - t0
        rounds += 1
    return {(k, x): sums[j] / rounds for j, (k, x, _, _) in enumerate(jobs)}


Job = tuple[str, int, Callable[[int], None], int]  # (op, tokens or context, fn(i), weight sets)


def op_jobs(card: ModelCard, comp: Any, experts: Sequence[Any], num_layers: int,
            dense_layers: int, tokens: Sequence[int], contexts: Sequence[int],
            dense_context: int, dense_ffn_only: bool = False) -> list[Job]:
    """Every CPU op of a run as the executor calls it (``TorchCompute``, weights cycled over
    ``experts`` slots and ``num_layers`` layers): expert, router, shared and dense layer per
    token count, stand-in attention per context. ``sim.executor.calibrate`` and ``moesim-profile
    storage`` both time these jobs with ``time_ops``, so the two profiles measure the same."""
    nl = max(num_layers, 1)
    jobs: list[Job] = []
    for n in tokens:
        jobs.append(("expert", n, lambda i, n=n: comp.expert(experts[i], n), len(experts)))
        jobs.append(("router", n, lambda i, n=n: comp.router(i, n), nl))
        if card.shared_intermediate_size:
            jobs.append(("shared", n, lambda i, n=n: comp.shared(i, n), nl))
        if dense_layers and dense_ffn_only:  # the profile's dense_ffn_s
            jobs.append(("dense", n, lambda i, n=n: comp.dense_ffn(i, n), dense_layers))
        elif dense_layers:  # dense_layer_s: attention at dense_context + FFN
            jobs.append(("dense", n, lambda i, n=n: comp.dense_layer(i, n, dense_context),
                         dense_layers))
    for c in contexts:
        jobs.append(("attention", c, lambda i, c=c: comp.attention_only(i, 1, c), nl))
    return jobs


def time_ops(jobs: Sequence[Job], rounds: int = 1, reps: int = 100, min_seconds: float = 1.0
             ) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], list[float]]]:
    """The one way CPU ops are measured (the executor's calibration and ``moesim-profile
    storage``): ``rounds`` rounds of ``_interleaved_means`` (every job called once per pass,
    round-robin, each call timed alone, >= ``reps`` passes and >= ``min_seconds`` per round).
    Returns the mean seconds per call over all rounds (what a run's sum of calls sees, its
    preempted calls included) and each round's mean (for a spread)."""
    per: dict[tuple[str, int], list[float]] = {}
    for _ in range(max(rounds, 1)):
        for k, m in _interleaved_means(jobs, reps, min_seconds).items():
            per.setdefault(k, []).append(m)
    return {k: float(np.mean(v)) for k, v in per.items()}, per


def expert_pool_slots(card: ModelCard, at_least: int = 2, max_bytes: int = 256 * 2**20) -> int:
    """How many expert slots an op timing cycles through: one decode step's working set
    (``cpu_ops.working_set_bytes``, at most ``max_bytes``), so expert weights are as cache-cold
    as in a run; the calibration's and the profiler's pools are this size."""
    from moesim.hw_profiles.cpu_ops import expert_stride, working_set_bytes

    n = min(working_set_bytes(card), max_bytes) // expert_stride(card)
    return int(max(at_least, min(n, card.routed_experts_total)))


def _read_times(backend: StorageBackend, layout: ExpertLayout, engines: int, reads: int,
                seed: int, busy: Callable[[int], None] | None = None) -> list[float]:
    """Per-read seconds with ``engines`` readers running at once, random experts; with
    ``busy``, this thread calls ``busy(i)`` back to back until the readers finish (reads timed
    beside compute, as a run's copy workers read while its compute thread works)."""
    out: list[list[float]] = [[] for _ in range(engines)]
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, layout.num_keys, size=(engines, reads + 2)).tolist()
    barrier = threading.Barrier(engines)

    def reader(e: int) -> None:
        barrier.wait()
        for n, key in enumerate(keys[e]):
            t0 = time.perf_counter()
            backend.load(key, e, e)
            if n >= 2:  # the first reads warm the path
                out[e].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=reader, args=(e,)) for e in range(engines)]
    for t in threads:
        t.start()
    i = 0
    while busy is not None and any(t.is_alive() for t in threads):
        busy(i)
        i += 1
    for t in threads:
        t.join()
    return [x for xs in out for x in xs]


@dataclass(frozen=True)
class ReadTimes:
    """Seconds per expert read with ``readers`` readers at once."""

    mean_s: float  # what the link model uses (transfer times add up)
    median_s: float
    p10_s: float
    p90_s: float
    reads: int
    readers: int
    direct_io: bool
    at: str  # UTC time of the measurement


def measure_reads(card: ModelCard, opts: CalibrationOptions, seed: int = 0,
                  pace_Bps: float | None = None, busy: Callable[[int], None] | None = None
                  ) -> ReadTimes:
    """Time ``opts.reads`` random expert reads per reader through the executor's read path
    (cheap enough to repeat right before each validated config: the disk drifts); with
    ``pace_Bps`` through the paced tier, with ``busy`` beside compute (``_read_times``)."""
    layout = ExpertLayout.of(card)
    work = Path(opts.work_dir) if opts.work_dir else default_work_dir()
    path = ensure_weights(work, card.name, layout, opts.weights_seed)
    backend = StorageBackend(path, layout, max(opts.copy_engines, 1), opts.direct_io, pace_Bps)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        t = _read_times(backend, layout, opts.copy_engines, opts.reads, seed, busy)
    finally:
        backend.close()
    p10, p50, p90 = (float(x) for x in np.percentile(t, [10, 50, 90]))
    return ReadTimes(float(np.mean(t)), p50, p10, p90, len(t), opts.copy_engines,
                     backend.direct_io, at)


def measure_handoff(card: ModelCard, opts: CalibrationOptions, seed: int = 0,
                    copies: int = 48) -> float:
    """Mean per-copy latency of the executor's copy path beyond the read itself: from the
    compute thread issuing a demand copy (reserve, submit, wake a worker) to it running again
    once the worker reports the copy, minus the worker's read time. One copy at a time through
    the executor's own cache, copier and read path, nothing else running. This is what the
    simulator's per-copy ``latency_s`` means (issue to arrival, beyond bytes / bandwidth); a
    read-only profile has no such term (on a loaded 2-core machine it was 40-140 us per copy
    inside runs, a tenth to a third of a 0.4 ms read)."""
    from moesim.policies.base import ModelShape, PolicySetup
    from moesim.policies.lru import LRU
    from moesim.sim.executor.clock import WallClock
    from moesim.sim.executor.copier import Copier
    from moesim.sim.executor.slots import SlottedCache

    layout = ExpertLayout.of(card)
    work = Path(opts.work_dir) if opts.work_dir else default_work_dir()
    path = ensure_weights(work, card.name, layout, opts.weights_seed)
    shape = ModelShape(card.num_moe_layers, card.num_experts, card.top_k, card.expert_bytes)
    cap = 2
    ev = LRU(PolicySetup(shape, cap, WallClock(), np.random.default_rng(seed)))
    cache = SlottedCache(card.num_experts, [0] * card.num_moe_layers, [cap], [ev])
    backend = StorageBackend(path, layout, cap, opts.direct_io)
    records: list[tuple[int, int, float, float]] = []
    copier = Copier(backend.load, 1, cache, cache.pool.slot_of, time.perf_counter)
    copier.records = records
    rng = np.random.default_rng(seed)
    lags = []
    try:
        for key in rng.permutation(layout.num_keys)[: copies + 2].tolist():
            t0 = time.perf_counter()
            if not cache.reserve(key, prefetch=False):
                raise RuntimeError("copy latency benchmark: no slot")
            copier.submit_demand(key)
            copier.drain(None)  # flushes, then blocks until the worker reports the copy
            _, _, start, end = records[-1]
            lags.append(time.perf_counter() - t0 - (end - start))
            for k in [k for k in cache.pool.held() if k != key]:
                cache.evict(k)
    finally:
        copier.close()
        backend.close()
    return float(np.mean(lags[2:]))


def with_reads(mapping: dict[str, Any], card: ModelCard, reads: ReadTimes,
               handoff_s: float | None = None) -> dict[str, Any]:
    """The profile mapping with its storage bandwidth from ``reads`` (expert bytes / mean) and,
    if given, the copy hand-off (``measure_handoff``) as the per-copy latency."""
    out = {**mapping, "storage": dict(mapping["storage"]),
           "machine": {**mapping.get("machine", {}), "read_median_s": reads.median_s,
                       "read_p10_s": reads.p10_s, "read_p90_s": reads.p90_s}}
    out["storage"]["peak_bandwidth_Bps"] = _q(
        float(f"{card.expert_bytes / reads.mean_s:.6g}"),
        f"sim.executor.calibrate at {reads.at}: expert bytes / mean of {reads.reads} reads "
        f"with {reads.readers} reader(s)")
    if handoff_s is not None:
        out["storage"]["latency_s"] = _q(
            float(f"{handoff_s:.6g}"),
            f"sim.executor.calibrate.measure_handoff at {reads.at}: mean time from the "
            "compute thread issuing a demand copy to it running again once the copy is "
            "reported, minus the read itself (submit, worker wake-up, hand-off back)")
    return out


def _q(value: Any, source: str, kind: str = "measured") -> dict[str, Any]:
    return {"value": value, "kind": kind, "source": source}


def _series(points: Sequence[tuple[int, float]], source: str) -> dict[str, Any]:
    return _q([[int(x), float(f"{y:.6g}")] for x, y in points], source)


def calibrate(card: ModelCard, num_layers: int, dense_layers: int,
              opts: CalibrationOptions, name: str = "executor_calibrated",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """A unified-memory profile mapping (``hw_profiles.profile_from_mapping``) of this machine
    for ``card`` (already scaled): storage read time of one expert, compute tables."""
    import torch


    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        return _calibrate(card, num_layers, dense_layers, opts, name, log)
    finally:
        torch.set_num_threads(old_threads)


def _calibrate(card: ModelCard, num_layers: int, dense_layers: int,
               opts: CalibrationOptions, name: str, log: Callable[[str], None]
               ) -> dict[str, Any]:
    import torch

    from moesim.sim.executor.compute import TorchCompute

    layout = ExpertLayout.of(card)
    work = Path(opts.work_dir) if opts.work_dir else default_work_dir()
    path = ensure_weights(work, card.name, layout, opts.weights_seed)
    slots = expert_pool_slots(card, max(opts.slots, opts.copy_engines))
    backend = StorageBackend(path, layout, slots, opts.direct_io)
    src = (f"sim.executor.calibrate on {platform.node()} at "
           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    try:
        reads = measure_reads(card, opts, opts.read_seed)
        log(f"calibrate: expert read {layout.stride} B with {opts.copy_engines} reader(s): "
            f"mean {reads.mean_s * 1e3:.3f} ms, median {reads.median_s * 1e3:.3f} (p10 "
            f"{reads.p10_s * 1e3:.3f}, p90 {reads.p90_s * 1e3:.3f}), O_DIRECT {reads.direct_io}")
        handoff = measure_handoff(card, opts, opts.read_seed) if opts.handoff else None
        if handoff is not None:
            log(f"calibrate: per-copy latency beyond the read {handoff * 1e6:.1f} us")
        loop = None
        if opts.loop_overhead:
            from moesim.sim.executor.overhead import measure_loop_overhead

            loop = measure_loop_overhead(card, opts.loop_steps, 3, opts.read_seed)
            log(f"calibrate: run loop {loop.step_s * 1e6:.1f} us per step + "
                f"{loop.layer_s * 1e6:.2f} us per layer + {loop.expert_s * 1e6:.2f} us per "
                f"expert call")
        for s in range(slots):
            backend.load(s % layout.num_keys, s)
        ctx_max = max(opts.contexts)
        comp = TorchCompute(card, num_layers, ctx_max, max(opts.tokens), dense_layers,
                            seed=opts.weights_seed + 1)
        nl = num_layers
        ref_ctx = opts.contexts[len(opts.contexts) // 2]
        jobs = op_jobs(card, comp, [backend.weights(i) for i in range(slots)], nl,
                       dense_layers, opts.tokens, opts.contexts, ref_ctx)
        with torch.inference_mode():
            means, _ = time_ops(jobs, 1, opts.reps, opts.min_seconds)
            expert, attn, router, shared, dense = (
                [(x, means[(k, x)]) for k2, x, _, _ in jobs if k2 == k]
                for k in ("expert", "attention", "router", "shared", "dense"))
            io_factor = {}
            if opts.contention:
                busy = _busy_reader(backend, layout, slots - 1)
                try:
                    means_io = _interleaved_means(jobs, opts.reps, opts.min_seconds)
                finally:
                    busy()
                for k in ("expert", "attention", "router", "shared", "dense"):
                    pts = [x for k2, x, _, _ in jobs if k2 == k]
                    if pts:
                        io_factor[k] = float(np.mean([means_io[(k, x)] / means[(k, x)]
                                                      for x in pts]))
            paced = None
            if opts.pace_Bps:
                def busy(i: int) -> None:
                    _, _, fn, cycle = jobs[i % len(jobs)]
                    fn(i % cycle)

                paced = measure_reads(card, opts, opts.read_seed + 1, opts.pace_Bps, busy)
            n = 1 << 22  # memory bandwidth: a 16 MiB fp32 copy; flops: a 512^3 matmul
            a, b = torch.randn(n), torch.empty(n)
            bw = 8 * n / _mean_call(lambda i: b.copy_(a), 10, 1)
            m = torch.randn(512, 512)
            flops = 2 * 512**3 / _mean_call(lambda i: m @ m, 10, 1)
    finally:
        backend.close()
    log(f"calibrate: expert FFN {expert[0][1] * 1e6:.1f} us at 1 token, attention "
        f"{attn[0][1] * 1e6:.1f} us at context {attn[0][0]}, router {router[0][1] * 1e6:.1f} us"
        + (f"; under I/O x{io_factor['expert']:.2f} / x{io_factor['attention']:.2f}"
           if io_factor else ""))
    table: dict[str, Any] = {
        "notes": (f"executor ops (hw_profiles.cpu_ops) at scaled shapes, {opts.threads} torch "
                  f"thread(s), weights cycled over {slots} expert slots / {nl} layers"),
        "attention_s": _series(attn, src + ": stand-in attention, batch 1"),
        "router_s": _series(router, src + ": router"),
        "expert_s": _series(expert, src + ": one SwiGLU expert per token count"),
    }
    if shared:
        table["shared_s"] = _series(shared, src + ": shared experts")
    if dense:
        table["dense_layer_s"] = _series(dense, src + f": dense layer at context {ref_ctx}")
        table["attention_context"] = _q(ref_ctx, "context of dense_layer_s", "measured")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mapping = with_reads({
        "name": name,
        "device": f"{platform.machine()} CPU x{os.cpu_count()} (executor backend storage)",
        "description": f"measured by sim.executor.calibrate for {card.name}",
        "unified_memory": True,
        "gpu": {
            "memory_bytes": _q(int(mem), "os.sysconf physical pages"),
            "memory_bandwidth_measured_Bps": _q(float(f"{bw:.4g}"), src + ": 16 MiB copy"),
            "fp16_flops_measured": _q(float(f"{flops:.4g}"),
                                      src + f": 512^3 {card.dtype} matmul (CPU)"),
        },
        "storage": {
            "medium": "file (O_DIRECT)" if backend.direct_io else "file (buffered)",
            "copy_engines": _q(opts.copy_engines, "the executor's copy workers (setting)",
                               "estimate"),
            "peak_bandwidth_Bps": None,  # set by with_reads
            "latency_s": _q(0.0, "included in the bandwidth (measured at the expert size)"),
        },
        "compute": {
            "memory_efficiency": _q(1.0, "measured bandwidth used as is", "estimate"),
            "flops_efficiency": _q(1.0, "measured throughput used as is", "estimate"),
            "measured": {card.name: table},
        },
        **({"contention": {
            "notes": "mean op time while one reader thread reads experts back to back, over "
                     "alone, same interleaved rounds; per op in machine.compute_under_io",
            "compute_slowdown_under_io": _q([[1, float(f"{io_factor['expert']:.4g}")]],
                                            src + ": expert FFN under one busy reader"),
        }} if "expert" in io_factor else {}),
        "machine": {"platform": platform.platform(), "torch": str(torch.__version__),
                    "torch_threads": opts.threads, "direct_io": reads.direct_io,
                    "compute_under_io": io_factor},
    }, card, reads, handoff)
    if loop is not None:
        from moesim.sim.executor.overhead import runtime_mapping

        mapping["machine"]["executor_runtime"] = runtime_mapping(
            loop, None, card, "sim.executor.calibrate",
            "0 here: sim.executor.calibrate puts the copy hand-off in the hardware profile's "
            "storage.latency_s (measure_handoff)")
    if paced is not None and opts.pace_Bps:
        mapping = with_paced_reads(mapping, card, paced, opts.pace_Bps, handoff or 0.0)
        log(f"calibrate: paced read at {opts.pace_Bps / 1e9:.3g} GB/s beside compute: mean "
            f"{paced.mean_s * 1e3:.3f} ms ({card.expert_bytes / opts.pace_Bps * 1e3:.3f} ms "
            f"nominal)")
    return mapping


def with_paced_reads(mapping: dict[str, Any], card: ModelCard, paced: ReadTimes,
                     pace_Bps: float, handoff_s: float) -> dict[str, Any]:
    """The profile of the paced tier: bandwidth the pace, per-copy latency the copy hand-off
    plus the paced read's measured lag beyond ``bytes / pace`` (a paced reader wakes up late on
    a loaded machine: sleep overshoot, waiting for a core and the GIL), timed beside compute."""
    lag = max(paced.mean_s - card.expert_bytes / pace_Bps, 0.0)
    st = dict(mapping["storage"])
    st["peak_bandwidth_Bps"] = _q(pace_Bps, "the executor's paced tier (ExecutorOptions."
                                  "pace_Bps): every read stretched to expert bytes / this",
                                  "estimate")
    st["latency_s"] = _q(float(f"{handoff_s + lag:.6g}"),
                         f"sim.executor.calibrate at {paced.at}: copy hand-off "
                         f"{handoff_s * 1e6:.1f} us + paced-read lag {lag * 1e6:.1f} us (mean of "
                         f"{paced.reads} paced reads beside the op loop, minus bytes / pace)")
    st.pop("curve", None)
    return {**mapping, "storage": st,
            "machine": {**mapping.get("machine", {}), "paced_read_mean_s": paced.mean_s,
                        "paced_read_lag_s": lag, "pace_Bps": pace_Bps}}
