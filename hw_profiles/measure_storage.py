"""``moesim-profile storage``: measure this machine's storage tier and CPU compute into a profile.

The machine this describes is the one the offloading executor (sim/executor/, backend
``storage``) runs on: experts live in one file, are read with ``O_DIRECT`` by ``copy_engines``
reader threads into a DRAM slot pool, and are computed on the CPU with torch. It is the shape of
an edge board staging experts from NVMe into unified memory, so the profile has
``unified_memory: true`` and a ``storage`` tier, like the ``jetson_*`` profiles.

Microbenchmarks only (never the executor's end-to-end runs):

* the O_DIRECT read curve, one synchronous read at a time, 4 KiB .. 256 MiB, random aligned
  offsets in a scratch file (latency is inside the curve, so ``latency_s`` is 0 and the
  least-squares ``t = a + s/B`` fit is kept as ``per_copy_overhead_s``);
* 1, 2, 4 concurrent readers of expert-sized reads -> aggregate bandwidth, ``copy_engines``
  (the fewest readers within 20 % of the best aggregate) and the per-reader plateau;
* per-layer CPU ops of ``hw_profiles.cpu_ops`` at the card's scaled shape, with weights rotated
  through a pool larger than the CPU caches: routed expert, shared expert and dense FFN at each
  batch, router at each batch, stand-in attention at batch 1 over each context;
* contention: expert-FFN time while 1..n readers read, and the readers' bandwidth while the FFN
  runs, as slowdown factors (``contention``; the simulator does not apply them yet);
* the executor's own costs (``sim.executor.overhead``): the copy hand-off through its copy
  worker and queue, and its run loop's work per step, layer and expert call timed by running
  that loop with zero-cost ops. They are software, not hardware: recorded with provenance in
  ``machine.executor_runtime`` as a runtime profile (``--runtime-out`` writes it as a runtime
  YAML for ``runtime=`` / ``validate.runtime``).

Every point is timed in ``rounds`` rounds; the median is written and the round-to-round spread
((max - min) / median) is reported in each ``source`` and in the printed summary. The logic only
sees a ``StorageBench``; tests drive it with a fake one and with the real one on tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from moesim.traces.model_card import ModelCard, load_card

from .direct_io import BLOCK, DirectFile, aligned_buffer, open_direct, round_up, write_random_file
from .link import LinkModel
from .measure import (
    _q,
    _sig,
    _slug,
    default_sizes,
    measure_curve,
    write_profile,
    write_yaml,
)

Samples = list[float]  # one value per round
OPS = ("expert", "shared", "dense", "router", "attention")


class StorageBench(Protocol):
    """What the storage measurement needs; ``CpuStorageBench`` here, fakes in tests."""

    def describe(self) -> dict[str, str]: ...
    def direct(self) -> tuple[bool, str]: ...
    def memory_bytes(self) -> int: ...
    def memory_bandwidth(self) -> tuple[float, str]: ...
    def matmul_flops(self) -> tuple[float, str]: ...
    def read_time(self, nbytes: int) -> float: ...  # one round: seconds per read
    def readers_bandwidth(self, readers: int) -> float: ...  # one round: aggregate bytes/s
    def op_samples(self, card: ModelCard, op: str, x: int) -> Samples: ...  # s per call
    def contention_samples(self, readers: int) -> list[tuple[float, float]]: ...
    # Optional: ``executor_runtime(card)`` -> the executor's runtime mapping (CpuStorageBench).


@dataclass(frozen=True)
class CardSpec:
    """One model card to time: the named card, its scale and the scaled card that runs."""

    base: ModelCard
    scale: float
    card: ModelCard


@dataclass(frozen=True)
class StorageOptions:
    sizes: tuple[int, ...]
    readers: tuple[int, ...] = (1, 2, 4)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    contexts: tuple[int, ...] = (1, 64, 256, 1024, 4096)
    engines_tolerance: float = 0.20  # more readers only if they add more than this
    rounds: int = 7  # storage rounds, interleaved: each round visits every size / reader count
    progress: bool = True
    command: str = "moesim-profile storage"


def read_sizes(lo: int = BLOCK, hi: int = 256 * 2**20) -> tuple[int, ...]:
    """Powers of two from ``lo`` to ``hi`` (both 4 KiB multiples, as O_DIRECT needs)."""
    if lo <= 0 or hi < lo or lo % BLOCK or hi % BLOCK:
        raise ValueError(f"read sizes need 0 < min <= max, both multiples of {BLOCK}")
    return default_sizes(lo, hi)


# --------------------------------------------------------------------------------------------
# Pure logic


@dataclass
class Spread:
    """Round-to-round spread ((max - min) / median) of every measured point, by group."""

    groups: dict[str, list[float]] = field(default_factory=dict)

    def add(self, group: str, samples: Sequence[float]) -> float:
        med = statistics.median(samples)
        if not (med > 0 and all(math.isfinite(s) for s in samples)):
            raise ValueError(f"{group}: a measurement returned {list(samples)!r}")
        spread = (max(samples) - min(samples)) / med
        self.groups.setdefault(group, []).append(spread)
        return med

    def text(self, group: str) -> str:
        vals = self.groups.get(group, [])
        if not vals:
            return "no spread recorded"
        return (f"round-to-round spread (max-min)/median: median {statistics.median(vals):.0%}, "
                f"max {max(vals):.0%} over {len(vals)} points")


def fit_latency_relative(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Fit t = a + s/B minimising *relative* error; returns (a >= 0, B).

    Why not plain least squares (``measure.fit_latency``): read times span 4 KiB to 256 MiB,
    so absolute residuals of the largest (and noisiest) reads would set the intercept; weighting
    by 1/t^2 lets the small reads, which are mostly latency, decide ``a``.
    """
    s = [float(p[0]) for p in points]
    t = [p[0] / p[1] for p in points]
    w = [1.0 / (ti * ti) for ti in t]
    sw = sum(w)
    sx = sum(wi * xi for wi, xi in zip(w, s, strict=True))
    sxx = sum(wi * xi * xi for wi, xi in zip(w, s, strict=True))
    sy = sum(wi * yi for wi, yi in zip(w, t, strict=True))
    sxy = sum(wi * xi * yi for wi, xi, yi in zip(w, s, t, strict=True))
    det = sw * sxx - sx * sx
    if det <= 0:
        return 0.0, max(p[1] for p in points)
    slope = (sw * sxy - sx * sy) / det
    a = (sy - slope * sx) / sw
    if slope <= 0:
        return max(a, 0.0), max(p[1] for p in points)
    if a < 0:  # refit through the origin
        slope = sxy / sxx
        a = 0.0
    return a, 1.0 / slope


def recommend_engines(aggregate: Sequence[tuple[int, float]], tolerance: float) -> int:
    """The fewest readers whose aggregate bandwidth is within ``tolerance`` of the best."""
    best = max(b for _, b in aggregate)
    return min(k for k, b in aggregate if b >= (1 - tolerance) * best)


def isotonic(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators).

    Why not a running max: one slow outlier (another process woke up) would then lift every
    later point; pooling averages it with its neighbours instead.
    """
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: list[float] = []
    for mean, weight in blocks:
        out.extend([mean] * int(weight))
    return out


def monotone(points: Sequence[tuple[int, float]]) -> list[list[float]]:
    """[[x, ms], ...] made non-decreasing in x by ``isotonic`` (a larger batch never faster)."""
    fitted = isotonic([s for _, s in points])
    out: list[list[float]] = []
    for (x, _), s in zip(points, fitted, strict=True):
        ms = _sig(s * 1e3, 4)
        if out and ms < out[-1][1]:  # rounding must not undo the fit
            ms = out[-1][1]
        out.append([int(x), ms])
    return out


def _ffn_ops(card: ModelCard) -> list[str]:
    ops = ["expert"]
    if card.shared_intermediate_size > 0:
        ops.append("shared")
    if card.dense_intermediate_size > 0 and card.dense_layers:
        ops.append("dense")
    return ops


def run_storage_measurement(bench: StorageBench, cards: Sequence[CardSpec], torch_threads: int,
                            name: str, opts: StorageOptions) -> tuple[dict[str, Any], Spread]:
    """Measure through ``bench`` and return (the profile mapping, the spreads).

    The storage tier and contention are measured once, with the first card's expert size;
    compute is timed for every card.
    """
    if not cards:
        raise ValueError("need at least one model card")
    card = cards[0].card
    machine = bench.describe()
    direct, why = bench.direct()
    machine["o_direct"] = "yes" if direct else f"no: {why}"
    machine["command"] = opts.command
    src = f"moesim-profile storage {machine.get('date', '?')} (command in machine.command)"
    how = "O_DIRECT" if direct else "buffered + fadvise(DONTNEED), O_DIRECT unavailable"
    steps = len(opts.sizes) + len(opts.readers) + 4 + sum(
        len(opts.contexts) + len(opts.batches) * (1 + len(_ffn_ops(c.card))) for c in cards)
    bar = tqdm(total=steps, desc="moesim-profile storage", unit="step",
               disable=not opts.progress, file=sys.stderr)
    spread = Spread()
    try:
        bar.set_postfix_str("read curve")
        # Rounds are interleaved (round r visits every size, then every reader count) so a
        # disk whose speed drifts (shared, virtual) shifts all points alike, not the curve shape.
        reads: dict[int, list[float]] = {n: [] for n in opts.sizes}
        for _ in range(opts.rounds):
            for n in opts.sizes:
                reads[n].append(bench.read_time(n))
        medians = [spread.add("read", reads[n]) for n in opts.sizes]
        fitted = dict(zip(opts.sizes, isotonic(medians), strict=True))
        curve = measure_curve(fitted.__getitem__, opts.sizes, lambda: bar.update(1))
        bar.set_postfix_str("concurrent readers")
        agg: dict[int, list[float]] = {k: [] for k in opts.readers}
        for _ in range(opts.rounds):
            for k in opts.readers:
                agg[k].append(bench.readers_bandwidth(k))
        aggregate = []
        for k in opts.readers:
            aggregate.append((k, spread.add("readers", agg[k])))
            bar.update(1)
        engines = recommend_engines(aggregate, opts.engines_tolerance)
        mem_bw, mem_how = bench.memory_bandwidth()
        flops, flops_how = bench.matmul_flops()
        mem_bytes = bench.memory_bytes()
        bar.update(1)
        bar.set_postfix_str("contention")
        cont_k = tuple(range(1, max(engines, 2) + 1))
        cont: list[tuple[int, float, float]] = []
        for k in cont_k:
            pairs = bench.contention_samples(k)
            c = spread.add("contention", [p[0] for p in pairs])
            r = spread.add("contention", [p[1] for p in pairs])
            cont.append((k, c, r))
        bar.update(1)
        tables: dict[str, dict[str, list[tuple[int, float]]]] = {}
        op_table = getattr(bench, "op_table", None)  # the executor's own op timing
        for spec in cards:
            series: dict[str, list[tuple[int, float]]] = {}
            if op_table is not None:
                bar.set_postfix_str(f"{spec.base.name} ops (interleaved)")
                points = {op: list(opts.contexts if op == "attention" else opts.batches)
                          for op in ("attention", "router", *_ffn_ops(spec.card))}
                got = op_table(spec.card, points)
                for op, xs in points.items():
                    group = op if op in ("attention", "router") else "ffn"
                    series[op] = []
                    for x in xs:
                        mean, rounds = got[(op, x)]
                        spread.add(group, rounds)
                        series[op].append((x, mean))
                        bar.update(1)
                tables[spec.base.name] = series
                continue
            for op in ("attention", "router", *_ffn_ops(spec.card)):
                bar.set_postfix_str(f"{spec.base.name} {op}")
                group = op if op in ("attention", "router") else "ffn"
                series[op] = []
                for x in opts.contexts if op == "attention" else opts.batches:
                    series[op].append((x, spread.add(group, bench.op_samples(spec.card, op, x))))
                    bar.update(1)
            tables[spec.base.name] = series
        bar.update(1)
        executor_runtime = after_copy = None
        measure_rt = getattr(bench, "executor_runtime", None)
        copies_rec = None
        if measure_rt is not None:  # the executor's hand-off and loop work (sim.executor.overhead)
            bar.set_postfix_str("executor hand-off, loop and copies beside compute")
            if "engines" in inspect.signature(measure_rt).parameters:
                executor_runtime = measure_rt(card, engines=engines)
                copies_of = getattr(bench, "executor_copies", None)
                copies_rec = copies_of(card) if copies_of is not None else None
            else:
                executor_runtime = measure_rt(card)
        after_copy = None
        measure_ac = getattr(bench, "expert_after_copy", None)
        if measure_ac is not None:  # informational: compute right after a copy
            after_copy = measure_ac(card)
        bar.update(1)
    finally:
        bar.close()

    a, fit_bw = fit_latency_relative(curve)
    # Anchor the one-reader curve at the expert size: every simulated transfer is one expert,
    # so the curve is scaled until one expert reads at the one-reader figure of the (longer,
    # interleaved) concurrent-reader run. With k engines the loader scales each engine to
    # readers_bandwidth(k) / k (StorageSpec.engine_share), reproducing the measured aggregate.
    chunk = round_up(card.expert_bytes)
    one = dict(aggregate).get(1)
    curve_max = max(b for _, b in curve)
    at_chunk = LinkModel("curve", 0.0, tuple(curve), curve_max).bandwidth(chunk)
    factor = one / at_chunk if one is not None else 1.0
    readers_txt = ", ".join(f"{k}: {b / 1e9:.3g} GB/s" for k, b in aggregate)
    mapping = {
        "name": name,
        "device": machine.get("device", "this machine"),
        "description": (f"CPU and storage of this machine as the storage executor uses them, "
                        f"measured by moesim-profile storage on {machine.get('date', '?')} for "
                        + ", ".join(f"{c.base.name} x{c.scale:g} {c.card.dtype}" for c in cards)),
        "unified_memory": True,
        "machine": machine,
        "gpu": {
            "memory_bytes": _q(_sig(mem_bytes / 2**30, 6), "GiB", "spec",
                               f"DRAM (MemTotal) of this machine; the CPU is the compute device; "
                               f"{src}"),
            "memory_bandwidth_Bps": _q(None, None, None, "no datasheet figure for a VM's DRAM"),
            "memory_bandwidth_measured_Bps": _q(_sig(mem_bw / 1e9, 4), "GB/s", "measured",
                                                f"{mem_how}; {src}"),
            "fp16_flops": _q(None, None, None, "no datasheet figure for a VM's CPU"),
            "fp16_flops_measured": _q(_sig(flops / 1e12, 4), "TFLOPS", "measured",
                                      f"{flops_how} (the profile's dtype, not fp16: the roofline "
                                      f"fallback uses it for every dtype); {src}"),
        },
        "storage": {
            "medium": machine.get("disk_name", "disk"),
            "copy_engines": _q(engines, None, "measured",
                               f"fewest concurrent readers within {opts.engines_tolerance:.0%} "
                               f"of the best aggregate bandwidth ({readers_txt}; "
                               f"{chunk} B reads, {how}); {src}"),
            "peak_bandwidth_Bps": _q(_sig(curve_max * factor / 1e9), "GB/s", "measured",
                                     f"plateau of the one-reader curve below x {factor:.3g}: "
                                     f"the curve is scaled so that one expert ({chunk} B) "
                                     f"reads at the one-reader figure of readers_bandwidth_Bps "
                                     f"(the curve alone gives {at_chunk / 1e9:.3g} GB/s there); "
                                     f"with copy_engines k the loader gives each engine "
                                     f"readers_bandwidth(k) / k; {src}"),
            "latency_s": _q(0, "us", "estimate",
                            "0 on purpose: the curve was timed read by read (synchronous "
                            "preadv) and already contains the per-read latency"),
            "per_copy_overhead_s": _q(_sig(a * 1e6, 3), "us", "estimate",
                                      f"fit t = a + s/B to the curve, least relative error (B = "
                                      f"{fit_bw / 1e9:.3g} GB/s); informational"),
            "curve": {
                "unit": "GB/s",
                "kind": "measured",
                "source": (f"one {how} preadv per read into a page-aligned mmap buffer, random "
                           f"4 KiB-aligned offsets in a scratch file, median of rounds, read "
                           f"times made non-decreasing in size by isotonic regression; "
                           f"{spread.text('read')}; {src}"),
                "value": [[s, _sig(b / 1e9)] for s, b in curve],
            },
            "readers_bandwidth_Bps": _q([[k, _sig(b / 1e9, 4)] for k, b in aggregate], "GB/s",
                                        "measured",
                                        f"aggregate bandwidth of [readers] threads each reading "
                                        f"{chunk} B (one expert) at random offsets; "
                                        f"{spread.text('readers')}; {src}"),
        },
        "contention": {
            "notes": (f"expert FFN at 1 token among the executor's interleaved op calls "
                      f"(sim.executor.calibrate.time_ops) with the profile's torch threads; "
                      f"factor = time "
                      f"together / time alone, both timed in the same round; "
                      f"{spread.text('contention')}"),
            "compute_slowdown_under_io": _q([[k, _sig(c, 4)] for k, c, _ in cont], "1",
                                            "measured",
                                            f"expert-FFN time while [readers] reader threads "
                                            f"read, over alone; {src}"),
            "read_slowdown_under_compute": _q([[k, _sig(r, 4)] for k, _, r in cont], "1",
                                              "measured",
                                              f"read time per byte of [readers] readers while an "
                                              f"expert-FFN loop runs, over alone; {src}"),
        },
        "compute": {
            "memory_efficiency": _q(1.0, None, "estimate",
                                    "unused: this profile has a measured memory bandwidth"),
            "flops_efficiency": _q(1.0, None, "estimate",
                                   "unused: this profile has a measured throughput"),
            "measured": {c.base.name: _table(c, torch_threads, tables[c.base.name], spread, src,
                                             op_table is not None)
                         for c in cards},
        },
    }
    if executor_runtime is not None:
        mapping["machine"]["executor_runtime"] = executor_runtime
    if copies_rec is not None:
        # Compute beside the executor's own copy workers (sim.executor.overhead.
        # measure_copy_host), per op as a validation applies it (calibrate.under_io); the
        # bare-reader factor above stays as measured.
        mapping["machine"].update(copies_rec)
    if after_copy is not None:
        mapping["machine"]["expert_after_copy_s"] = after_copy
    return mapping, spread


def _table(spec: CardSpec, threads: int, ffn: dict[str, list[tuple[int, float]]],
           spread: Spread, src: str, executor_timing: bool = False) -> dict[str, Any]:
    """The ``compute.measured.<card>`` mapping; ``ffn`` holds every op's (x, seconds)."""
    base, card, scale = spec.base, spec.card, spec.scale
    how = ("timed as the executor's calibration times them (sim.executor.calibrate.time_ops: "
           "the executor's calls, interleaved round-robin, each call timed alone, mean of all "
           "calls)" if executor_timing else "median of rounds")
    note = (f"hw_profiles.cpu_ops functions, {card.dtype}, {threads} torch thread(s), weights "
            f"rotated through a pool of one decode step's working set (cpu_ops.working_set_bytes), "
            f"{how}, made "
            f"non-decreasing in batch/context by isotonic regression")
    ffn_spread = spread.text("ffn")
    table: dict[str, Any] = {
        "notes": (f"Measured at {base.name} x{scale:g} (hw_profiles.cpu_ops.scaled_card); "
                  f"applies only to a card of exactly this shape (measured_at). Per MoE layer "
                  f"the simulator charges attention_s + router_s + shared_s + routed expert_s; "
                  f"a dense layer is attention_s + dense_ffn_s. {src}"),
        "measured_at": {
            "base_card": base.name,
            "scale": scale,
            "dtype": card.dtype,
            "hidden_size": card.hidden_size,
            "moe_intermediate_size": card.moe_intermediate_size,
            "shared_intermediate_size": card.shared_intermediate_size,
            "dense_intermediate_size": card.dense_intermediate_size,
            "head_dim": card.head_dim,
            "torch_threads": threads,
        },
        "attention_s": _q(monotone(ffn["attention"]), "ms", "measured",
                          f"cpu_ops.attention_standin at batch 1 over [context] cached tokens; "
                          f"{note}; {spread.text('attention')}; {src}"),
        "router_s": _q(monotone(ffn["router"]), "ms", "measured",
                       f"cpu_ops.router over [batch] tokens; {note}; {spread.text('router')}; "
                       f"{src}"),
        "expert_s": _q(monotone(ffn["expert"]), "ms", "measured",
                       f"cpu_ops.expert_ffn (one routed expert) over [tokens]; {note}; "
                       f"{ffn_spread}; {src}"),
    }
    if "shared" in ffn:
        table["shared_s"] = _q(monotone(ffn["shared"]), "ms", "measured",
                               f"cpu_ops.expert_ffn with the layer's shared intermediate size "
                               f"over [tokens]; {note}; {ffn_spread}; {src}")
    if "dense" in ffn:
        table["dense_ffn_s"] = _q(monotone(ffn["dense"]), "ms", "measured",
                                  f"cpu_ops.expert_ffn with the dense layer's intermediate size "
                                  f"over [batch]; {note}; {ffn_spread}; {src}")
    return table


def summary_lines(mapping: dict[str, Any], spread: Spread) -> list[str]:
    """A few lines for the terminal: the headline figures and their spread."""
    st = mapping["storage"]
    cont = mapping["contention"]
    lines = [
        f"storage: {st['peak_bandwidth_Bps']['value']} GB/s plateau per reader, "
        f"copy_engines {st['copy_engines']['value']}, readers (GB/s) "
        f"{st['readers_bandwidth_Bps']['value']}, fit a = {st['per_copy_overhead_s']['value']} us",
        f"  {spread.text('read')} (curve); {spread.text('readers')} (readers)",
        f"contention: compute x{cont['compute_slowdown_under_io']['value']}, read "
        f"x{cont['read_slowdown_under_compute']['value']}; {spread.text('contention')}",
    ]
    for card, table in mapping["compute"]["measured"].items():
        lines += [f"{card}: expert ms {table['expert_s']['value']}",
                  f"  attention ms {table['attention_s']['value']}, router ms "
                  f"{table['router_s']['value']}"]
    lines.append(f"{spread.text('ffn')} (FFN); {spread.text('attention')} (attention)")
    rt = mapping.get("machine", {}).get("executor_runtime")
    if rt:
        o = rt["overhead"]
        lines.append(f"executor: copy hand-off {rt['copy']['per_copy_s']['value']} us per copy; "
                     f"loop {o['step_s']['value']} us per step + {o['layer_s']['value']} us per "
                     f"layer + {o['expert_s']['value']} us per expert call")
        if "host_s" in rt["copy"]:
            lines.append(f"executor: compute thread {rt['copy']['host_s']['value']} us per copy "
                         f"(copier calls), ops beside copies x"
                         f"{mapping['machine']['executor_copies']['op_factor']['value']}")
    ac = mapping.get("machine", {}).get("expert_after_copy_s")
    if ac:
        lines.append(f"executor: expert FFN right after its copy {ac['value']} us (not charged)")
    return lines


# --------------------------------------------------------------------------------------------
# The real bench: this machine's disk and CPU


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _disk_of(path: Path) -> tuple[str, str]:
    """(block device name, filesystem type) holding ``path``, from /proc/self/mounts."""
    best, dev, fs = "", "", ""
    target = str(path.resolve())
    for line in _read_text("/proc/self/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and (target == parts[1] or target.startswith(
                parts[1].rstrip("/") + "/")) and len(parts[1]) > len(best):
            best, dev, fs = parts[1], parts[0], parts[2]
    return Path(dev).name or "disk", fs or "unknown"


class CpuComputeBench:
    """Timers for the ``cpu_ops`` functions on this machine's CPU (no disk).

    Shared by ``moesim-profile storage`` (through ``CpuStorageBench``) and ``moesim-profile
    host-cpu``, so both time the very same ops on the very same memory layout. An op rotates
    its weights through a pool of ``cpu_ops.working_set_bytes(card)`` (at most
    ``max_pool_bytes``), so its weights are as cache-cold as in the executor; ``cold`` uses
    ``max_pool_bytes`` itself (experts waiting in host DRAM, the host-CPU case). ``op_round_s``
    is how long one round of an op runs.
    """

    def __init__(self, card: ModelCard, *, torch_threads: int, seed: int, rounds: int = 7,
                 op_round_s: float = 0.02, max_pool_bytes: int = 256 * 2**20,
                 max_context: int = 4096, cold: bool = False,
                 read_bytes: int = 256 * 2**20) -> None:
        import torch

        from . import cpu_ops

        if rounds < 2:
            raise ValueError("rounds must be >= 2 to report a spread")
        if torch_threads < 1:
            raise ValueError(f"torch threads must be >= 1, got {torch_threads}")
        self.torch = torch
        self.ops = cpu_ops
        self.card = card
        self.rounds = rounds
        self.op_round_s = op_round_s
        self.max_pool_bytes = max_pool_bytes
        self.max_context = max_context
        self.threads = torch_threads
        self.seed = seed
        self.cold = cold
        self.read_bytes = read_bytes
        self._pools: dict[tuple[str, str], Any] = {}
        self._read_buf: Any = None  # read_bandwidth's buffer, kept between rounds

    def close(self) -> None:
        self._pools.clear()
        self._read_buf = None

    def describe_cpu(self) -> dict[str, str]:
        """CPU model, logical CPUs, RAM, software versions, threads, load and date."""
        cpu = "unknown CPU"
        for line in _read_text("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = self.memory_bytes()
        cores = os.cpu_count() or 0
        return {
            "device": f"{cpu} ({cores} CPUs), {mem / 2**30:.1f} GiB RAM",
            "cpu": cpu,
            "cores": str(cores),
            "ram": f"{mem / 2**30:.1f} GiB",
            "kernel": platform.release(),
            "os": platform.platform(),
            "python": platform.python_version(),
            "torch": str(self.torch.__version__),
            "torch_threads": str(self.threads),
            "load_average_at_start": " ".join(_read_text("/proc/loadavg").split()[:3]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def memory_bytes(self) -> int:
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 0

    # -- compute ---------------------------------------------------------------------------
    def memory_bandwidth(self) -> tuple[float, str]:
        torch = self.torch
        n = 64 * 2**20
        src = torch.ones(n // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        with self.ops.torch_threads(self.threads):
            dst.copy_(src)
            t = min(self._timed(lambda: dst.copy_(src), 5) for _ in range(3))
        return 2 * n / t, (f"torch copy of {n // 2**20} MiB in DRAM, 2 x bytes / time, best of "
                           f"3, {self.threads} torch thread(s)")

    def read_bandwidth(self) -> tuple[float, str]:
        """One round of a streaming read: a torch sum over ``read_bytes`` of float32, bytes /
        time (best of 3 passes), with the bench's thread count."""
        torch = self.torch
        if self._read_buf is None:
            self._read_buf = torch.ones(max(1, self.read_bytes // 4), dtype=torch.float32)
        buf = self._read_buf
        with self.ops.torch_threads(self.threads):
            buf.sum()
            t = min(self._timed(buf.sum, 2) for _ in range(3))
        nbytes = buf.numel() * 4
        return nbytes / t, (f"torch sum over {nbytes / 2**20:.0f} MiB of float32 in DRAM, "
                            f"bytes / time, best of 3, {self.threads} torch thread(s)")

    def matmul_flops(self) -> tuple[float, str]:
        torch = self.torch
        n = 512
        dt = self.ops.torch_dtype(self.card)
        g = torch.Generator().manual_seed(self.seed)
        a = torch.randn(n, n, generator=g).to(dt)
        b = torch.randn(n, n, generator=g).to(dt)
        with self.ops.torch_threads(self.threads):
            _ = a @ b  # warm-up: the first call allocates and dispatches
            t = min(self._timed(lambda: a @ b, 10) for _ in range(3))
        return 2 * n**3 / t, (f"{self.card.dtype} matmul {n}x{n}x{n}, 2n^3 / time, best of 3, "
                              f"{self.threads} torch thread(s)")

    @staticmethod
    def _timed(fn: Callable[[], Any], n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def _pool(self, card: ModelCard, op: str) -> list[Any]:
        """Weight sets for ``op`` (built once per card, seeded): copies of one random set."""
        key = (card.name, op)
        if key in self._pools:
            return self._pools[key]
        if any(k[0] != card.name for k in self._pools):  # one card's pools at a time
            self._pools.clear()
        torch, ops = self.torch, self.ops
        g = torch.Generator().manual_seed(self.seed + OPS.index(op) + 1)
        dt = ops.torch_dtype(card)
        pool_bytes = self.max_pool_bytes if self.cold else min(self.max_pool_bytes,
                                                               ops.working_set_bytes(card))
        if op == "attention":
            first = ops.make_standin_layer(card, self.max_context, g)
            size = sum(t.numel() * t.element_size() for t in (
                first.w_qkv, first.w_o, first.k_cache, first.v_cache, first.w_router))
            count = max(1, min(card.num_moe_layers, self.max_pool_bytes // size))
            pool: list[Any] = [first] + [_clone_layer(first) for _ in range(count - 1)]
        elif op == "router":
            w = (torch.randn(card.num_experts, card.hidden_size, generator=g) * 0.02).to(dt)
            pool = [w] + [w.clone() for _ in range(card.num_moe_layers - 1)]
        else:
            inter = {"expert": card.moe_intermediate_size, "shared": card.shared_intermediate_size,
                     "dense": card.dense_intermediate_size}[op]
            params = card.matrices_per_expert * card.hidden_size * inter
            size = int(params * card.dtype_bytes)
            stride = round_up(size)
            count = max(2, pool_bytes // stride)
            buf = aligned_buffer(stride * count)  # one slot pool, like the executor's
            flat = torch.frombuffer(buf, dtype=dt)
            per = stride // flat.element_size()
            flat[:params].copy_((torch.randn(params, generator=g) * 0.02).to(dt))
            for i in range(1, count):
                flat[i * per:i * per + params].copy_(flat[:params])
            pool = [ops.expert_views(flat[i * per:i * per + params], card, inter)
                    for i in range(count)]
            self._pools[(card.name, op + "_buffer")] = buf
        self._pools[key] = pool
        return pool

    def _op_fn(self, card: ModelCard, op: str, x: int) -> Callable[[int], Any]:
        torch, ops = self.torch, self.ops
        pool = self._pool(card, op)
        g = torch.Generator().manual_seed(self.seed + x)
        dt = ops.torch_dtype(card)
        if op == "attention":
            inp = torch.randn(1, card.hidden_size, generator=g).to(dt)
            if not 1 <= x <= self.max_context:
                raise ValueError(f"context {x} outside 1..{self.max_context}")
            return lambda i: ops.attention_standin(inp, pool[i % len(pool)], x)
        inp = torch.randn(x, card.hidden_size, generator=g).to(dt)
        if op == "router":
            return lambda i: ops.router(inp, pool[i % len(pool)], card.top_k)
        return lambda i: ops.expert_ffn(inp, *pool[i % len(pool)])

    def _calls_per(self, fn: Callable[[int], Any], seconds: float) -> int:
        for i in range(2):
            fn(i)
        t0 = time.perf_counter()
        fn(2)
        one = max(time.perf_counter() - t0, 1e-7)
        return max(3, min(5000, int(seconds / one)))

    def op_samples(self, card: ModelCard, op: str, x: int) -> Samples:
        fn = self._op_fn(card, op, x)
        out = []
        with self.ops.torch_threads(self.threads), self.torch.inference_mode():
            n = self._calls_per(fn, self.op_round_s)
            i = 0
            for _ in range(self.rounds):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(i)
                    i += 1
                out.append((time.perf_counter() - t0) / n)
        return out


def executor_op_table(bench: CpuComputeBench, card: ModelCard, points: dict[str, list[int]]
                      ) -> dict[tuple[str, int], tuple[float, list[float]]]:
    """Every (op, x) of ``points`` timed the way the executor's own calibration times them
    (``sim.executor.calibrate.op_jobs`` + ``time_ops``: the executor's ``TorchCompute`` calls,
    interleaved round-robin, each call timed alone, the mean over all calls): (mean seconds per
    call, per-round means). ``moesim-profile storage`` used to time each op alone in a tight
    loop and keep the median round, which on a loaded 2-core machine read the ops ~2x faster
    than the executor's calibration and runs (see experiments/docs/pages/validation.md)."""
    from moesim.sim.executor.calibrate import expert_pool_slots, op_jobs, time_ops
    from moesim.sim.executor.compute import TorchCompute

    torch, ops = bench.torch, bench.ops
    contexts = points.get("attention", [1])
    tokens = sorted({x for op, xs in points.items() if op != "attention" for x in xs})
    dense = len(card.dense_layers) if "dense" in points else 0
    comp = TorchCompute(card, card.num_moe_layers, max(contexts), max(tokens), dense,
                        seed=bench.seed + 1)
    experts = bench._pool(card, "expert")[:expert_pool_slots(card)]
    jobs = [j for j in op_jobs(card, comp, experts, card.num_moe_layers, dense, tokens,
                               contexts, 1, dense_ffn_only=True)
            if j[1] in points.get(j[0], ())]
    with ops.torch_threads(bench.threads), torch.inference_mode():
        means, rounds = time_ops(jobs, bench.rounds, reps=20,
                                 min_seconds=bench.op_round_s * len(jobs))
    return {k: (means[k], rounds[k]) for k in means}


class CpuStorageBench(CpuComputeBench):
    """Timers on this machine: a scratch file read with O_DIRECT, torch ops on the CPU.

    ``card`` sets the read size of the concurrent-reader and contention runs (one expert).
    ``window_s`` is how long one round of a concurrent-reader or contention measurement runs;
    the compute timers are ``CpuComputeBench``'s.
    """

    def __init__(self, card: ModelCard, file_dir: Path, *, file_bytes: int, torch_threads: int,
                 seed: int, rounds: int = 7, window_s: float = 0.3, op_round_s: float = 0.02,
                 max_pool_bytes: int = 256 * 2**20, max_context: int = 4096,
                 want_direct: bool = True, work_dir: Path | None = None,
                 loop_steps: int = 200, handoff_copies: int = 64) -> None:
        super().__init__(card, torch_threads=torch_threads, seed=seed, rounds=rounds,
                         op_round_s=op_round_s, max_pool_bytes=max_pool_bytes,
                         max_context=max_context)
        self.window_s = window_s
        self.want_direct = want_direct
        self.work_dir = work_dir  # the executor's weights files (None: its default folder)
        self.loop_steps = loop_steps
        self.handoff_copies = handoff_copies
        self.copies: Any = None  # sim.executor.overhead.CopyHost, set by executor_runtime
        self.chunk = round_up(card.expert_bytes)
        self.file_bytes = round_up(max(file_bytes, 4 * self.chunk))
        file_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="moesim_profile_", suffix=".bin", dir=file_dir)
        os.close(fd)
        self.path = Path(name)
        self._file: DirectFile | None = None
        self._buf: Any = None  # the read-curve buffer, grown to the largest size read
        try:
            write_random_file(self.path, self.file_bytes, seed)
            self._file = open_direct(self.path, want_direct=want_direct)
        except BaseException:
            self.close()
            raise
        self._rng_seq = 0

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file and delete the scratch file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        self.path.unlink(missing_ok=True)
        super().close()

    def executor_runtime(self, card: ModelCard, engines: int | None = None) -> dict[str, Any]:
        """The executor's runtime profile on this machine (``sim.executor.overhead``): the copy
        hand-off, timed ``rounds`` times through the executor's own cache, copy queue and
        worker reading its weights file of ``card`` (``calibrate.measure_handoff``; mean of all
        rounds), and its run loop's work per step, layer and expert call (zero-cost ops). With
        ``engines`` (the profile's copy_engines), also what copies cost the compute thread
        (``measure_copy_host``: ``copy.host_s``; the whole record in ``self.copies``)."""
        import numpy as np

        from moesim.sim.executor.calibrate import CalibrationOptions, measure_handoff
        from moesim.sim.executor.model import EXECUTOR_DTYPES
        from moesim.sim.executor.overhead import (
            measure_copy_host,
            measure_loop_overhead,
            runtime_mapping,
        )

        loop = measure_loop_overhead(card, steps=self.loop_steps, rounds=3, seed=self.seed)
        handoff = None
        note = ""
        self.copies = None
        if card.dtype in EXECUTOR_DTYPES and card.gated:
            direct = None if self.want_direct else False
            copts = CalibrationOptions(work_dir=str(self.work_dir) if self.work_dir else None,
                                       direct_io=direct)
            handoff = float(np.mean([measure_handoff(card, copts, seed=self.seed + r,
                                                     copies=self.handoff_copies)
                                     for r in range(self.rounds)]))
            if engines is not None:
                self.copies = measure_copy_host(card, engines, self.threads, direct,
                                                self.work_dir, seed=self.seed)
        else:
            note = (f"not measured: the executor does not run {card.dtype} "
                    f"{'gated' if card.gated else 'ungated'} experts")
        where = (f"moesim-profile storage ({self.rounds} rounds x {self.handoff_copies} copies "
                 f"for the hand-off)")
        return runtime_mapping(loop, handoff, card, where, note, self.copies)

    def executor_copies(self, card: ModelCard) -> dict[str, Any] | None:
        """``machine.executor_copies`` and ``machine.compute_under_io`` of the profile from the
        copies ``executor_runtime`` measured (None: none measured)."""
        from moesim.sim.executor.overhead import compute_under_copies, copies_record

        if self.copies is None:
            return None
        return {"executor_copies": copies_record(self.copies, card, "moesim-profile storage"),
                "compute_under_io": compute_under_copies(self.copies)}

    def expert_after_copy(self, card: ModelCard) -> dict[str, Any] | None:
        """One expert FFN right after the executor's read path filled its slot, and repeated
        (``sim.executor.overhead.measure_after_copy``): recorded in ``machine``, not charged."""
        from moesim.sim.executor.model import EXECUTOR_DTYPES
        from moesim.sim.executor.overhead import after_copy_quantity, measure_after_copy

        if card.dtype not in EXECUTOR_DTYPES or not card.gated:
            return None
        m = measure_after_copy(card, self.work_dir, None if self.want_direct else False,
                               self.threads, seed=self.seed)
        return after_copy_quantity(m, card, "moesim-profile storage")

    def op_table(self, card: ModelCard, points: dict[str, list[int]]
                 ) -> dict[tuple[str, int], tuple[float, list[float]]]:
        """The CPU ops as the executor's calibration times them (``executor_op_table``)."""
        return executor_op_table(self, card, points)

    def __enter__(self) -> CpuStorageBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def file(self) -> DirectFile:
        if self._file is None:
            raise RuntimeError("bench is closed")
        return self._file

    def _rng(self) -> Any:
        import numpy as np

        self._rng_seq += 1
        return np.random.default_rng([self.seed, self._rng_seq])

    # -- description -----------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        """``describe_cpu`` plus the disk holding the scratch file (key order as written)."""
        cpu = self.describe_cpu()
        disk, fs = _disk_of(self.path.parent)
        rot = _read_text(f"/sys/block/{disk}/queue/rotational").strip()
        head = {k: cpu[k] for k in ("cpu", "cores", "ram")}
        return {
            "device": f"{cpu['device']}, disk {disk} ({fs})",
            **head,
            "disk_name": disk,
            "disk": f"/dev/{disk}, {fs}, rotational flag {rot or 'unknown'}, scratch file in "
                    f"{self.path.parent}",
            "filesystem": fs,
            **{k: v for k, v in cpu.items() if k not in head and k != "device"},
        }

    def direct(self) -> tuple[bool, str]:
        return self.file.direct, self.file.why

    # -- storage ---------------------------------------------------------------------------
    def _offsets(self, nbytes: int, count: int) -> list[int]:
        blocks = (self.file_bytes - nbytes) // BLOCK
        rng = self._rng()
        return [int(x) * BLOCK for x in rng.integers(0, blocks + 1, size=count)]

    def read_time(self, nbytes: int) -> float:
        """Mean seconds per read over up to 64 reads (at most 64 MiB) at random offsets."""
        nbytes = round_up(nbytes)
        if nbytes > self.file_bytes:
            raise ValueError(f"read of {nbytes} B exceeds the {self.file_bytes} B scratch file")
        if self._buf is None or len(self._buf) < nbytes:
            if self._buf is not None:
                self._buf.close()
            self._buf = aligned_buffer(nbytes)
            self.file.read_into(memoryview(self._buf)[:nbytes], 0)  # first-touch the pages
        per_round = max(1, min(64, int(64 * 2**20 // nbytes)))
        offs = self._offsets(nbytes, per_round)
        with memoryview(self._buf) as whole, whole[:nbytes] as view:
            t0 = time.perf_counter()
            for off in offs:
                self.file.read_into(view, off)
            return (time.perf_counter() - t0) / per_round

    @staticmethod
    def _reader(file: DirectFile, chunk: int, offsets: list[int], stop: threading.Event,
                count: list[int], failed: list[BaseException]) -> None:
        buf = aligned_buffer(chunk)
        view = memoryview(buf)
        try:
            i = 0
            while not stop.is_set():
                file.read_into(view, offsets[i % len(offsets)])
                count[0] += 1
                i += 1
        except BaseException as exc:  # re-raised by _readers: a dead reader fakes a low figure
            failed.append(exc)
        finally:
            view.release()
            buf.close()

    @contextmanager
    def _readers(self, k: int) -> Iterator[list[list[int]]]:
        stop = threading.Event()
        counts = [[0] for _ in range(k)]
        failed: list[BaseException] = []
        threads = [threading.Thread(target=self._reader, daemon=True, args=(
            self.file, self.chunk, self._offsets(self.chunk, 256), stop, counts[i], failed))
            for i in range(k)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.01)  # let every reader get going
            yield counts
        finally:
            stop.set()
            for t in threads:
                t.join()
        if failed:
            raise failed[0]

    def _window_bandwidth(self, counts: list[list[int]], body: Callable[[], None]) -> float:
        c0 = sum(c[0] for c in counts)
        t0 = time.perf_counter()
        body()
        dt = time.perf_counter() - t0
        return (sum(c[0] for c in counts) - c0) * self.chunk / dt

    def readers_bandwidth(self, readers: int) -> float:
        """Aggregate bytes/s of ``readers`` threads reading one expert at a time for a window."""
        with self._readers(readers) as counts:
            return self._window_bandwidth(counts, lambda: time.sleep(self.window_s))

    def contention_samples(self, readers: int) -> list[tuple[float, float]]:
        """Per round: (expert-FFN time beside ``readers`` busy readers over alone, read time
        per byte beside compute over alone). Compute is timed as the executor's calibration
        times it (``executor_op_table``'s jobs through ``time_ops``: the executor's calls
        interleaved), so the slowdown is of the ops as a run calls them, not of one op in a
        tight loop, which read a far smaller slowdown than the runs met."""
        from moesim.sim.executor.calibrate import CalibrationOptions, time_ops

        jobs = self._contention_jobs(CalibrationOptions())
        out = []
        with self.ops.torch_threads(self.threads), self.torch.inference_mode():
            time_ops(jobs, 1, reps=1, min_seconds=0.0)  # warm every job once
            for _ in range(self.rounds):
                alone, _ = time_ops(jobs, 1, reps=5, min_seconds=self.window_s)
                got: dict[str, Any] = {}

                def busy(box: dict[str, Any] = got) -> None:
                    box["m"] = time_ops(jobs, 1, reps=5, min_seconds=self.window_s)[0]

                with self._readers(readers) as counts:
                    bw_alone = self._window_bandwidth(counts, lambda: time.sleep(self.window_s))
                    bw_busy = self._window_bandwidth(counts, busy)
                key = next(k for k in alone if k[0] == "expert")
                out.append((got["m"][key] / alone[key], bw_alone / max(bw_busy, 1.0)))
        return out

    def _contention_jobs(self, copts: Any) -> list[Any]:
        """The calibration's op jobs (``op_jobs`` at its token counts and contexts) for the
        bench's card, built once."""
        if getattr(self, "_cjobs", None) is None:
            from moesim.sim.executor.calibrate import expert_pool_slots, op_jobs
            from moesim.sim.executor.compute import TorchCompute

            card = self.card
            dense = len(card.dense_layers) if card.dense_intermediate_size else 0
            comp = TorchCompute(card, card.num_moe_layers, max(copts.contexts),
                                max(copts.tokens), dense, seed=self.seed + 1)
            experts = self._pool(card, "expert")[:expert_pool_slots(card)]
            ref = copts.contexts[len(copts.contexts) // 2]
            self._cjobs = op_jobs(card, comp, experts, card.num_moe_layers, dense,
                                  copts.tokens, copts.contexts, ref)
        return self._cjobs


def _clone_layer(layer: Any) -> Any:
    from dataclasses import fields as dc_fields
    from dataclasses import replace

    return replace(layer, **{f.name: getattr(layer, f.name).clone() for f in dc_fields(layer)
                             if hasattr(getattr(layer, f.name), "clone")})


# --------------------------------------------------------------------------------------------
# CLI (``moesim-profile storage``; wired in hw_profiles/measure.py)


def add_parser(sub: Any) -> None:
    """Register the ``storage`` sub-command."""
    s = sub.add_parser("storage", help="measure this machine's storage tier (O_DIRECT reads) "
                       "and CPU compute for a scaled model card into a profile YAML")
    s.add_argument("--model", "--card", dest="model", nargs="+", default=["deepseek_v2_lite"],
                   help="model card name(s) or path(s); the first sets the read size of the "
                        "concurrent-reader and contention runs (one expert)")
    s.add_argument("--scale", type=float, nargs="+", default=[0.25],
                   help="factor on hidden/intermediate sizes and head_dim (cpu_ops.scaled_card); "
                        "one for all cards or one per card")
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    s.add_argument("--out", "-o", type=Path, help="output YAML; its stem is the profile name")
    s.add_argument("--file-dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="directory for the scratch file: the filesystem the executor's expert "
                        "file will live on")
    s.add_argument("--file-bytes", type=int, default=512 * 2**20,
                   help="scratch file size (>= --max-bytes; random offsets within it)")
    s.add_argument("--min-bytes", type=int, default=BLOCK)
    s.add_argument("--max-bytes", type=int, default=256 * 2**20)
    s.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4])
    s.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    s.add_argument("--contexts", type=int, nargs="+", default=[1, 64, 256, 1024, 4096])
    s.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads while timing compute; the executor must use the same")
    s.add_argument("--rounds", type=int, default=7, help="rounds per point (median, spread)")
    s.add_argument("--window", type=float, default=0.3,
                   help="seconds per round of a concurrent-reader or contention measurement")
    s.add_argument("--engines-tolerance", type=float, default=0.20,
                   help="copy_engines = fewest readers within this fraction of the best "
                        "aggregate bandwidth (more readers must add more than the disk's noise)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--buffered", action="store_true",
                   help="do not try O_DIRECT (for filesystems known not to support it)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.add_argument("--runtime-out", type=Path,
                   help="also write the executor's runtime profile (copy hand-off, run-loop "
                        "overhead; machine.executor_runtime of the profile) to this YAML")
    s.add_argument("--work-dir", type=Path,
                   help="the executor's weights files, read by the hand-off timing (default: "
                        "the executor's own folder, $MOESIM_CACHE/executor)")


def write_runtime(runtime: dict[str, Any], path: Path, command: str = "") -> Path:
    """Validate (strictly, as ``load_runtime`` would) and write the executor's runtime YAML."""
    from .runtime import runtime_from_mapping

    runtime_from_mapping(runtime, str(path), allow_bare=False)
    header = ("# Runtime profile of moesim's executor, written by moesim-profile storage"
              + (f":\n#   {command}\n" if command else ".\n"))
    return write_yaml(runtime, path, header)


def run_cli(args: argparse.Namespace, argv: Sequence[str],
            bench: StorageBench | None = None) -> int:
    """Measure, write and summarise; ``bench`` lets tests replace the real machine."""
    from .cpu_ops import scaled_card

    scales = list(args.scale)
    if len(scales) == 1:
        scales *= len(args.model)
    if len(scales) != len(args.model):
        raise ValueError("give one --scale, or one per --model")
    cards = []
    for name, scale in zip(args.model, scales, strict=True):
        base = load_card(name)
        cards.append(CardSpec(base, scale, scaled_card(base, scale, args.dtype)))
    if len({c.base.name for c in cards}) != len(cards):
        raise ValueError("each --model may be given once")
    sizes = read_sizes(args.min_bytes, args.max_bytes)
    if args.file_bytes < args.max_bytes:
        raise ValueError("--file-bytes must be >= --max-bytes")
    for what in ("readers", "batches", "contexts"):
        if min(getattr(args, what)) < 1:
            raise ValueError(f"--{what} must be >= 1")
    if not 0 <= args.engines_tolerance < 1:
        raise ValueError("--engines-tolerance must be in [0, 1)")
    if args.torch_threads < 1 or args.rounds < 2 or args.window <= 0:
        raise ValueError("need --torch-threads >= 1, --rounds >= 2 and --window > 0")
    out: Path = args.out or Path(f"{_slug(platform.node() or 'this_machine')}_storage.yaml")
    if out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--out {out}: the profile must be a .yaml file")
    rt_out: Path | None = getattr(args, "runtime_out", None)
    if rt_out is not None and rt_out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--runtime-out {rt_out}: the runtime profile must be a .yaml file")
    if _slug(out.stem) != out.stem:
        out = out.with_name(f"{_slug(out.stem)}{out.suffix}")
    opts = StorageOptions(
        sizes=sizes,
        readers=tuple(sorted(set(args.readers))),
        batches=tuple(sorted(set(args.batches))),
        contexts=tuple(sorted(set(args.contexts))),
        progress=not args.no_progress,
        rounds=args.rounds,
        engines_tolerance=args.engines_tolerance,
        command="moesim-profile " + " ".join(argv),
    )
    t0 = time.perf_counter()
    own: CpuStorageBench | None = None
    if bench is None:
        own = bench = CpuStorageBench(cards[0].card, args.file_dir, file_bytes=args.file_bytes,
                                      torch_threads=args.torch_threads, seed=args.seed,
                                      rounds=args.rounds, window_s=args.window,
                                      max_context=max(opts.contexts),
                                      want_direct=not args.buffered,
                                      work_dir=getattr(args, "work_dir", None))
    try:
        from moesim.sim.executor.storage import fallback_reported

        direct, why = bench.direct()
        quiet = contextlib.nullcontext()
        if not direct:  # said once here; the executor's backends then do not repeat it
            print(f"moesim-profile: {why}", file=sys.stderr)
            quiet = fallback_reported()
        with quiet:
            mapping, spread = run_storage_measurement(bench, cards, args.torch_threads,
                                                      out.stem, opts)
    finally:
        if own is not None:
            own.close()
    if own is not None:
        mapping["machine"]["load_average_at_end"] = " ".join(
            _read_text("/proc/loadavg").split()[:3]) or "unknown"
    rt_map = mapping["machine"].get("executor_runtime")
    if rt_map is not None:  # checked before anything is written
        from .runtime import runtime_from_mapping

        runtime_from_mapping(rt_map, "machine.executor_runtime", allow_bare=False)
    elif rt_out is not None:
        raise ValueError("--runtime-out: this bench measured no executor runtime")
    print(f"wrote {write_profile(mapping, out)} in {time.perf_counter() - t0:.0f} s")
    if rt_out is not None:
        print(f"wrote {write_runtime(rt_map, rt_out, mapping['machine'].get('command', ''))}")
    for line in summary_lines(mapping, spread):
        print(line)
    return 0
