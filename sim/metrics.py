"""Run metrics: counters filled during the run, then one summary row and a per-layer table.

Every access is one unique expert of one layer-step (warm-up steps excluded) and is exactly one
of (experiments/docs/pages/metrics.md has the table with every formula):
- hit: resident when the layer's routing became known;
- late hit: not resident, but a prefetch transfer of it had already *started* (the GPU may
  wait for the rest of it);
- promoted: a prefetch of it was queued but had not started; it became a demand copy;
- miss: absent and not queued, fetched on demand.
A placement (``placement=<name>``) may serve a miss without a full-precision copy: on the host
CPU (``cpu_expert_execs``), by a low-precision copy (``low_precision_fetches``) or not at all
(``skipped_experts``); the access is still a miss, so ``demand_fetches + cpu_expert_execs +
low_precision_fetches + skipped_experts == misses + promoted``.
Stall is GPU time idle waiting for expert weights: ``stall_late_s`` on started prefetches,
``stall_miss_s`` on demand copies (misses, promoted and low-precision copies), and
``stall_cpu_s`` on outputs of experts computed on the host CPU. A prefetch *transfer* (one that
started in a counted step) ends exactly one way: it serves an access (useful), it is evicted
or discarded before any use (wasted), or it is still unused at the end. Precision and recall
count only transfers that actually served an access; a promoted prefetch is a demand copy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from moesim.sim.link import COPY_KINDS

if TYPE_CHECKING:
    from moesim.sim.engine import Simulation

HIT, LATE, PROMOTED, MISS = 0, 1, 2, 3  # rows of Counters.layer_counts


class Counters:
    """Plain counters; kept as attributes and lists because they sit on the hot path."""

    def __init__(self, num_layers: int) -> None:
        self.layer_counts = [[0] * num_layers for _ in range(4)]
        self.layer_stall = [0.0] * num_layers
        self.stall_miss = 0.0
        self.stall_late = 0.0
        self.steps = 0
        self.tokens = 0
        self.out_tokens = 0
        self.pairs = 0
        self.time = 0.0
        self.demand_started = 0
        self.prefetch_issued = 0
        self.prefetch_started = 0
        self.prefetch_dropped = 0
        self.prefetch_served = 0  # counted accesses whose copy came by a prefetch transfer
        self.prefetch_useful = 0  # counted prefetch transfers that served an access
        self.unused_prefetches = 0
        self.wasted_prefetches = 0
        self.evictions = 0
        # placements (policies.base.PlacementPolicy); counted steps, except cpu_busy (whole run)
        self.cpu_execs = 0
        self.low_fetches = 0
        self.low_bytes = 0
        self.skipped = 0
        self.stall_cpu = 0.0
        self.cpu_busy = 0.0
        self.gate_total = 0.0  # normalised gate mass of every counted access (approximating
        self.gate_low = 0.0  # placements only; the others compute all of it at full precision)
        self.gate_skip = 0.0
        # Duration of every step (index = step number, warm-up included) where the engine
        # records it; None where it does not (zero-latency runs): per-request times are NaN.
        self.step_times: list[float] | None = None


@dataclass
class RunResult:
    """Everything one run produced."""

    summary: dict[str, Any]
    per_layer: pd.DataFrame
    transfers: pd.DataFrame | None = None
    timeline: list[dict[str, Any]] | None = None
    per_request: pd.DataFrame | None = None

    def write_chrome_trace(self, path: str | Path) -> None:
        """Compute and copy spans as Chrome-trace JSON (open in Perfetto or chrome://tracing)."""
        Path(path).write_text(json.dumps({"traceEvents": self.timeline or []}))


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def build_result(sim: Simulation) -> RunResult:
    c, shape = sim.c, sim.shape
    hits, late, promoted, misses = (sum(x) for x in c.layer_counts)
    accesses = hits + late + promoted + misses
    link = sim.link
    nbytes = shape.expert_bytes
    timed = link is not None
    if timed:
        prefetch_started = link.started[1]
        end = sim.clock.now
        # copies on the compute stream keep link time (sim.link): clipped at its end
        link_end = getattr(sim, "link_end", None)
        busy = _ratio(link.busy_until(end if link_end is None else link_end),
                      end * link.engines)
        dropped, cancelled = link.dropped, link.cancelled
        swaps, swap_s = getattr(link, "swaps", 0), getattr(link, "swap_time", 0.0)
    else:
        prefetch_started, busy, cancelled = c.prefetch_started, math.nan, 0
        dropped = c.prefetch_dropped
        swaps, swap_s = 0, 0.0
    stall = c.stall_miss + c.stall_late + c.stall_cpu
    nan = math.nan
    summary: dict[str, Any] = {
        "accesses": accesses,
        "hits": hits,
        "late_hits": late,
        "promoted": promoted,
        "misses": misses,
        "hit_rate": _ratio(hits, accesses),
        "hit_rate_incl_late": _ratio(hits + late, accesses),
        "miss_rate": _ratio(misses + promoted, accesses),
        "steps": c.steps,
        "tokens": c.tokens,
        "output_tokens": c.out_tokens,
        "token_expert_pairs": c.pairs,
        "unique_experts_per_pair": _ratio(accesses, c.pairs),
        "stall_time_s": stall if timed else nan,
        "stall_miss_s": c.stall_miss if timed else nan,
        "stall_late_s": c.stall_late if timed else nan,
        "stall_cpu_s": c.stall_cpu if timed else nan,
        "total_time_s": c.time if timed else nan,
        "time_per_output_token_s": _ratio(c.time, c.out_tokens) if timed else nan,
        "stall_per_output_token_s": _ratio(stall, c.out_tokens) if timed else nan,
        "stall_fraction": _ratio(stall, c.time) if timed else nan,
        "pcie_busy_fraction": busy,
        "demand_fetches": c.demand_started,
        "demand_bytes": c.demand_started * nbytes,
        "prefetch_issued": c.prefetch_issued,
        "prefetch_transfers": prefetch_started,
        "prefetch_bytes": prefetch_started * nbytes,
        "prefetch_dropped": dropped,
        "prefetch_cancelled": cancelled,
        "prefetch_useful": c.prefetch_useful,
        "prefetch_wasted": c.wasted_prefetches,
        "prefetch_unused_at_end": c.unused_prefetches,
        "prefetch_served": c.prefetch_served,
        "prefetch_precision": _ratio(c.prefetch_useful, prefetch_started),
        "prefetch_recall": _ratio(c.prefetch_served, c.prefetch_served + misses + promoted),
        "wasted_prefetch_bytes": c.wasted_prefetches * nbytes,
        "unused_prefetch_bytes_at_end": c.unused_prefetches * nbytes,
        "evictions": c.evictions,
        "swap_copies": swaps,
        "swap_copy_s": swap_s,
        "sim_engine": getattr(sim, "engine_used", "python"),
    }
    summary.update(_placement_columns(sim, accesses))
    summary.update(phase_times(sim.workload, c.step_times))
    per_request = per_request_table(sim.workload, c.step_times)
    summary.update(tpot_percentiles(per_request))
    view = getattr(sim, "predictions", None)
    summary["prediction_coverage"] = view.coverage if view is not None else nan
    layer_ids = sim.labels.get("layer_ids") or list(range(shape.num_layers))
    h, lt, pr, m = c.layer_counts
    per_layer = pd.DataFrame(
        {
            "layer": range(shape.num_layers),
            "layer_id": layer_ids,
            "accesses": [sum(x) for x in zip(h, lt, pr, m, strict=True)],
            "hits": h,
            "late_hits": lt,
            "promoted": pr,
            "misses": m,
            "stall_time_s": c.layer_stall if timed else [nan] * shape.num_layers,
        }
    )
    denom = per_layer["accesses"].where(per_layer["accesses"] > 0)
    per_layer["hit_rate"] = per_layer["hits"] / denom
    per_layer["hit_rate_incl_late"] = (per_layer["hits"] + per_layer["late_hits"]) / denom
    transfers = None
    if timed and link.records is not None and sim.ropts.record_transfers:
        transfers = pd.DataFrame(link.records_until(sim.clock.now),
                                 columns=["key", "kind", "start_s", "end_s"])
        anonymous = transfers["key"] < 0  # activations, low-precision copies: no cache key
        transfers["layer"] = (transfers["key"] // shape.num_experts).mask(anonymous, -1)
        transfers["expert"] = (transfers["key"] % shape.num_experts).mask(anonymous, -1)
        transfers["kind"] = transfers["kind"].map(dict(enumerate(COPY_KINDS)))
    timeline = _chrome_events(sim) if sim.ropts.timeline_steps > 0 and timed else None
    return RunResult(summary, per_layer, transfers, timeline, per_request)


def _placement_columns(sim: Simulation, accesses: int) -> dict[str, Any]:
    """What the placement did, and the routed gate mass computed at full precision, at low
    precision, and skipped (fractions of the counted accesses' normalised gate mass, summing
    to 1; 1/0/0 for placements that never approximate, NaN when nothing was accessed)."""
    c = sim.c
    link = sim.link
    placement = getattr(sim, "placement_spec", None)
    approximates = placement is not None and placement.cls.approximates
    if not accesses:
        full = low = skip = math.nan
    elif approximates:
        low, skip = _ratio(c.gate_low, c.gate_total), _ratio(c.gate_skip, c.gate_total)
        full = _ratio(c.gate_total - c.gate_low - c.gate_skip, c.gate_total)
    else:
        full, low, skip = 1.0, 0.0, 0.0
    host = getattr(sim, "host", None)
    parallel = host.cpu.parallel if host is not None and host.cpu is not None else 1
    busy = math.nan
    if link is not None:
        busy = _ratio(c.cpu_busy, sim.clock.now * parallel)
    return {
        "placement": placement.name if placement is not None else "fetch",
        "cpu_expert_execs": c.cpu_execs,
        "low_precision_fetches": c.low_fetches,
        "low_precision_bytes": c.low_bytes,
        "skipped_experts": c.skipped,
        "cpu_busy_fraction": busy,
        "gate_mass_full": full,
        "gate_mass_low_precision": low,
        "gate_mass_skipped": skip,
    }


def phase_times(workload: Any, step_times: list[float] | None) -> dict[str, float]:
    """Whole-request timing split by phase, so that a published tokens/s that includes the
    prompt (or one of the prompt alone) is compared like for like.

    A counted step that produces no output token is *prefill* (prompt chunks only); every
    other counted step is *decode* (with continuous batching a step that also carries another
    request's prompt chunk counts as decode: its time cannot be split). ``prefill_tokens`` are
    the tokens the prefill steps process. Times are NaN without step durations (zero-latency
    runs); with ``replay=decode`` there are no prefill steps and the decode figures equal
    ``total_time_s`` and ``time_per_output_token_s``."""
    w = workload
    counted = np.asarray(w.counted, dtype=bool)
    prefill = counted & (np.asarray(w.out_tokens) == 0)
    decode = counted & ~prefill
    out = int(np.asarray(w.out_tokens)[decode].sum())
    p_tok = int(np.asarray(w.tokens)[prefill].sum())
    if step_times is None or len(step_times) != w.num_steps:
        p_t = d_t = math.nan
    else:
        t = np.asarray(step_times, dtype=np.float64)
        p_t, d_t = float(t[prefill].sum()), float(t[decode].sum())
    return {
        "prefill_tokens": p_tok,
        "prefill_time_s": p_t,
        "prefill_tokens_per_s": _ratio(p_tok, p_t) if p_tok and p_t == p_t else math.nan,
        "decode_time_s": d_t,
        "decode_time_per_output_token_s": _ratio(d_t, out) if d_t == d_t else math.nan,
    }


def per_request_table(workload: Any, step_times: list[float] | None) -> pd.DataFrame:
    """One row per request with a counted step: its output tokens, counted steps, time (the
    sum of the durations of the counted steps it takes part in: with batches, a step's time
    counts for every request in it) and time per output token. Times are NaN when the engine
    recorded no step durations (zero-latency runs, or an engine that does not record them)."""
    w = workload
    per_step = np.diff(w.req_offsets)
    step_of = np.repeat(np.arange(w.num_steps), per_step)
    keep = np.asarray(w.counted, dtype=bool)[step_of]
    out = w.req_out if w.req_out is not None else np.ones(len(w.req_ids), dtype=bool)
    have_times = step_times is not None and len(step_times) == w.num_steps
    times = np.asarray(step_times, dtype=np.float64)[step_of] if have_times else (
        np.full(len(step_of), np.nan))
    df = pd.DataFrame({
        "request_id": np.asarray(w.req_ids)[keep].astype(np.int64),
        "output_tokens": np.asarray(out)[keep].astype(np.int64),
        "steps": np.ones(int(keep.sum()), dtype=np.int64),
        "time_s": times[keep],
    })
    df = df.groupby("request_id", sort=True).sum(min_count=1).reset_index()
    tokens = df["output_tokens"].where(df["output_tokens"] > 0)
    df["time_per_output_token_s"] = df["time_s"] / tokens
    return df


def tpot_percentiles(per_request: pd.DataFrame) -> dict[str, float]:
    """``tpot_p50_s``, ``tpot_p90_s``, ``tpot_p99_s``: percentiles (linear interpolation) of
    the requests' time per output token; NaN when there are no times."""
    vals = per_request["time_per_output_token_s"].dropna().to_numpy()
    if not len(vals):
        return {"tpot_p50_s": math.nan, "tpot_p90_s": math.nan, "tpot_p99_s": math.nan}
    p50, p90, p99 = np.percentile(vals, [50, 90, 99])
    return {"tpot_p50_s": float(p50), "tpot_p90_s": float(p90), "tpot_p99_s": float(p99)}


def _chrome_events(sim: Simulation) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    horizon = max((b for _, _, _, b in sim.timeline), default=0.0)
    for what, name, a, b in sim.timeline:
        events.append({"name": name, "ph": "X", "pid": "GPU",
                       "tid": "host cpu" if what == "cpu" else "compute",
                       "ts": a * 1e6, "dur": (b - a) * 1e6})
    num_e = sim.shape.num_experts
    for key, kind, a, b in sim.link.records_until(sim.clock.now):
        if a > horizon:
            continue
        events.append({
            "name": (f"{COPY_KINDS[kind]} L{key // num_e} e{key % num_e}" if key >= 0
                     else COPY_KINDS[kind]),
            "ph": "X", "pid": "GPU", "tid": "host link", "ts": a * 1e6, "dur": (b - a) * 1e6,
        })
    return events
