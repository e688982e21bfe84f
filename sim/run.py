"""One call from a trace and a policy to a result: the API under the Hydra app and the tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from moesim.policies.registry import PlacementSpec, PolicySpec, as_spec, resolve_placement
from moesim.sim.cache import SimulationError
from moesim.sim.engine import CacheOptions, Mode, RunOptions, Simulation
from moesim.sim.hardware import ComputeTimes, HostSide, TransferModel
from moesim.sim.metrics import RunResult
from moesim.sim.workload import Replay, build_workload
from moesim.traces.trace import Trace

if TYPE_CHECKING:
    from moesim.sim.stream import StreamOptions


def capacity_slots(
    total_experts: int,
    expert_bytes: int,
    *,
    fraction: float | None = None,
    experts: int | None = None,
    nbytes: int | None = None,
    sizing: str = "round",
) -> int:
    """Cache size in expert slots from exactly one of: a fraction of all routed experts, a
    number of experts, or a byte budget. ``sizing`` rounds a fraction to the nearest slot
    (``round``) or down (``floor``: MoE-Beyond's ``int(1664 * f)``)."""
    given = [x is not None for x in (fraction, experts, nbytes)]
    if sum(given) != 1:
        raise SimulationError("give exactly one of cache.fraction, cache.experts, cache.bytes")
    if sizing not in ("round", "floor"):
        raise SimulationError(f"cache.sizing must be 'round' or 'floor', got {sizing!r}")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SimulationError(f"cache.fraction must be in (0, 1], got {fraction}")
        exact = fraction * total_experts
        return max(1, int(exact) if sizing == "floor" else round(exact))
    if experts is not None:
        if experts < 1:
            raise SimulationError(f"cache.experts must be >= 1, got {experts}")
        return int(experts)
    if nbytes < expert_bytes:
        raise SimulationError(f"cache.bytes {nbytes} is below one expert ({expert_bytes} B)")
    return int(nbytes // expert_bytes)


def simulate(
    trace: Trace,
    policy: str | Mapping[str, Any] | PolicySpec,
    *,
    capacity: int,
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
    record_transfers: bool = False,
    timeline_steps: int = 0,
    progress: bool = False,
    dense_before: Sequence[int] | None = None,
    predictions: Mapping[int, Any] | None = None,
    engine: str = "auto",
    placement: str | Mapping[str, Any] | PlacementSpec | None = None,
    host: HostSide | None = None,
    staging: int = 0,
    stream: StreamOptions | None = None,
) -> RunResult:
    """Replay ``trace`` under ``policy`` with a cache of ``capacity`` expert slots.

    ``placement`` is a name, ``{"name": ..., **params}`` or a resolved spec (default
    ``fetch``); ``host`` gives CPU-executing and low-precision placements the host CPU model,
    activation size and weight width; ``staging`` device buffers outside the cache let a
    runtime run caches smaller than a layer's experts (``CacheOptions.staging``).

    ``stream`` (``run.stream``): replay the trace file in chunks of requests instead of
    building the whole workload (``sim.stream``; ``trace`` is then a trace file or its
    :class:`~moesim.sim.stream.TraceOutline`); options a streamed run cannot replay are refused
    by name."""
    spec = as_spec(policy)
    if isinstance(placement, PlacementSpec):
        place = placement
    elif isinstance(placement, Mapping):
        params = {k: v for k, v in placement.items() if k != "name"}
        place = resolve_placement(placement.get("name"), params)
    else:
        place = resolve_placement(placement)
    if stream is not None and stream.enabled:
        from moesim.sim.stream import simulate_streamed

        return simulate_streamed(
            trace, spec, stream, capacity=capacity, mode=mode, link=link, compute=compute,
            partition=partition, pin_layer=pin_layer, prefill=prefill,
            reset_per_request=reset_per_request, replay=replay, batch=batch,
            prefill_chunk=prefill_chunk, warmup_tokens=warmup_tokens,
            warmup_extra_row=warmup_extra_row, seed=seed, record_transfers=record_transfers,
            timeline_steps=timeline_steps, dense_before=dense_before, predictions=predictions,
            engine=engine, placement=place, host=host, staging=staging)
    workload = build_workload(
        trace, replay=replay, batch=batch, prefill_chunk=prefill_chunk,
        warmup_tokens=warmup_tokens, warmup_extra_row=warmup_extra_row,
        gate_weights=f"placement {place.name!r}" if place.cls.needs_gate_weights else None,
    )
    sim = Simulation(
        workload,
        spec,
        CacheOptions(capacity, partition, pin_layer, prefill, reset_per_request, staging),
        RunOptions(mode, seed, record_transfers, timeline_steps, progress, engine),
        link_model=link,
        compute=compute,
        labels={"layer_ids": list(trace.meta.moe_layers)},
        dense_before=dense_before,
        predictions=predictions,
        placement=place,
        host=host,
    )
    return sim.run()


def dense_layers_before(moe_layers: Sequence[int], num_layers: int | None = None) -> list[int]:
    """Dense (non-MoE) decoder layers run before each MoE layer, counting from layer 0.

    Dense layers after the last MoE layer are charged to the next step's first MoE layer.
    """
    out, prev = [], -1
    for layer in moe_layers:
        out.append(layer - prev - 1)
        prev = layer
    if num_layers is not None and out:
        out[0] += num_layers - 1 - prev
    return out
