"""The two small interfaces every policy implements, and what a policy may know.

Eviction and prefetch are separate (as in libCacheSim): an eviction policy decides which resident
expert leaves when a slot is needed; a prefetch policy decides which experts to start loading
before they are demanded. A *policy* as users name it (``policy=lru``) is one of each; see
``policies.registry``.

Experts are addressed by a dense integer key ``layer * num_experts + expert``, where ``layer`` is
the MoE-layer index 0..L-1 of the trace (not the model's layer id).

Each class declares ``knows``: ``past`` (only what the runtime has seen so far), ``predictions``
(a prediction table whose rows become available at stated points of the layer timeline), or
``oracle`` (reads future routing: a bound, not a deployable policy). The simulator hands a
:class:`FutureView` only to policies that declare ``oracle``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol

import numpy as np


class Knowledge(str, Enum):
    PAST = "past"
    PREDICTIONS = "predictions"
    ORACLE = "oracle"


class PolicyError(ValueError):
    """Bad policy name or parameter."""


@dataclass(frozen=True)
class ModelShape:
    """What a policy knows of the model: dimensions only."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts

    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def layer_of(self, key: int) -> int:
        return key // self.num_experts


class FutureView(Protocol):
    """Future routing, for oracle policies only.

    A position numbers one access: ``(step * L + layer) * width + rank``, where rank is the
    access's place among the layer-step's unique experts; ``SimClock.position`` uses the same
    numbering (rank 0 outside the access loop)."""

    num_steps: int

    def keys_at(self, step: int, layer: int) -> list[int]:
        """Unique expert keys demanded at (step, layer), in access order; [] past the end."""
        ...

    def next_use(self, key: int, position: int, inclusive: bool = False) -> int:
        """First position > (>= if inclusive) ``position`` that demands ``key``; huge if none."""
        ...

    def key_frequencies(self) -> np.ndarray:
        """Demand count of every key over the whole run."""
        ...


class PredictionSource(Protocol):
    """Predicted experts of a prediction table, aligned with the run's steps."""

    def keys_at(self, step: int, layer: int) -> list[int]:
        """Predicted expert keys for (step, layer); [] when there is no prediction."""
        ...


class SimClock(Protocol):
    """Read-only view of where the simulation is; policies must not write to it."""

    now: float  # seconds (0 in zero-latency mode)
    step: int  # index of the current step (a decode step or a prefill chunk)
    layer: int  # current MoE layer index
    position: int  # (step * L + layer) * width + rank of the access being served
    counting: bool  # False during warm-up steps (not counted in metrics)


@dataclass
class PolicySetup:
    """Everything a policy is given at construction."""

    shape: ModelShape
    capacity: int  # slots of the partition this instance manages (eviction) or total (prefetch)
    clock: SimClock
    rng: np.random.Generator
    future: FutureView | None = None
    predictions: PredictionSource | None = None  # for policies that know predictions
    partition_layers: Sequence[int] | None = None  # layers this eviction instance manages
    reserve: int = 0  # slots that must stay evictable for demand (layer width + copy engines)
    # The policy's parameters, plus "_peers": one dict shared by every policy instance of the
    # run, so a prefetcher and its eviction partner can coordinate (e.g. protected candidates).
    params: dict[str, Any] = field(default_factory=dict)


class EvictionPolicy:
    """Chooses victims. The cache owns residency; the policy only keeps its own ordering.

    Call order guaranteed by the simulator: ``on_insert`` when a slot is taken for a key (the
    moment its transfer starts, or instantly in zero-latency mode); ``on_access`` for every demand
    access of a key that holds a slot (hit or late hit; a miss is reported by ``on_insert``);
    ``on_evict`` when the key leaves. ``victim`` must return a key that holds a slot and for
    which ``can_evict(key)`` is true (not pinned, not in flight), or None if there is none.
    """

    name: ClassVar[str] = ""
    knows: ClassVar[Knowledge] = Knowledge.PAST
    params: ClassVar[dict[str, Any]] = {}
    prefills: ClassVar[bool] = False  # places experts before the run (initial_contents)
    partition_required: ClassVar[str | None] = None  # e.g. "per_layer"

    def __init__(self, setup: PolicySetup) -> None:
        self.setup = setup

    def on_insert(self, key: int, prefetch: bool) -> None:
        raise NotImplementedError

    def on_access(self, key: int) -> None:
        raise NotImplementedError

    def on_prefetch_resident(self, key: int) -> None:
        """A prefetch was asked for a key that already holds a slot (default: ignore)."""

    def on_evict(self, key: int) -> None:
        raise NotImplementedError

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        raise NotImplementedError

    def on_step_end(self) -> None:
        """A step (decode token or prefill chunk) finished."""

    def initial_contents(self) -> list[int]:
        """Keys to place in the cache before the run (default none)."""
        return []


class PrefetchContext(Protocol):
    """What a prefetch policy can see and do at a hook. Implemented by the simulator."""

    clock: SimClock
    shape: ModelShape

    def prefetch(self, keys: Iterable[int], priority: float | None = None) -> int:
        """Queue loads of absent keys (behind all demand fetches); returns how many were queued.
        Lower ``priority`` goes first; default is submission order."""
        ...

    def cancel_prefetches(self, keys: Iterable[int] | None = None) -> int:
        """Drop queued (not yet started) prefetches, all of them or those for ``keys``."""
        ...

    def is_resident(self, key: int) -> bool: ...

    def is_loading(self, key: int) -> bool:
        """In flight or queued."""
        ...

    def install(self, keys: Iterable[int]) -> int:
        """Place keys in the cache without a transfer; only allowed before the first step."""
        ...

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` ``delay`` seconds from now (timed mode); at once in zero-latency mode."""
        ...

    @property
    def request_ids(self) -> Sequence[int]:
        """Requests taking part in the current step."""
        ...


class PrefetchPolicy:
    """Starts loads ahead of demand. Hooks follow the layer timeline of one step:

    ``on_pre_attention(l)`` -> attention + router -> ``on_routed(l, keys)`` (routing of layer l is
    known; prefetches issued here are submitted before l's demand fetches, so a same-layer
    prediction lands before the accesses in zero-latency mode) -> demand fetches issued ->
    ``on_demand_issued(l, keys)`` (the place to prefetch later layers behind demand) ->
    experts compute -> ``on_layer_end(l)``; then ``on_step_end()``.
    """

    name: ClassVar[str] = ""
    knows: ClassVar[Knowledge] = Knowledge.PAST
    default_eviction: ClassVar[str] = "lru"
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, setup: PolicySetup) -> None:
        self.setup = setup

    def on_start(self, ctx: PrefetchContext) -> None:
        """Before the first step (cache may be pre-filled here with ``ctx.install``)."""

    def on_request_start(self, ctx: PrefetchContext, request_id: int) -> None:
        """A request joins the running batch."""

    def on_pre_attention(self, ctx: PrefetchContext, layer: int) -> None:
        """Start of MoE layer ``layer`` (before its attention)."""

    def on_routed(self, ctx: PrefetchContext, layer: int, keys: Sequence[int]) -> None:
        """Routing of ``layer`` is known; ``keys`` are about to be accessed."""

    def on_demand_issued(self, ctx: PrefetchContext, layer: int, keys: Sequence[int]) -> None:
        """Demand fetches of ``layer`` are queued; prefetches go behind them."""

    def on_layer_end(self, ctx: PrefetchContext, layer: int) -> None:
        """All experts of ``layer`` computed."""

    def on_step_end(self, ctx: PrefetchContext) -> None:
        """The step finished."""

    def on_transfer_done(self, ctx: PrefetchContext, key: int, prefetch: bool) -> None:
        """A load completed (timed mode, at its completion time)."""


class NoPrefetch(PrefetchPolicy):
    """Demand fetching only."""

    name = "none"


class PointPrefetch(PrefetchPolicy):
    """A prefetcher that acts at one configurable point of every layer (param ``point``)."""

    points: ClassVar[tuple[str, ...]] = ("pre_attention", "routed", "demand_issued")

    def __init__(self, setup: PolicySetup) -> None:
        super().__init__(setup)
        self.point = setup.params.get("point", self.points[0])
        if self.point not in self.points:
            raise PolicyError(f"{self.name}: point {self.point!r} not one of {self.points}")

    def issue(self, ctx: PrefetchContext, layer: int) -> None:
        """Prefetch at the chosen point of ``layer``."""
        raise NotImplementedError

    def on_pre_attention(self, ctx: PrefetchContext, layer: int) -> None:
        if self.point == "pre_attention":
            self.issue(ctx, layer)

    def on_routed(self, ctx: PrefetchContext, layer: int, keys: Sequence[int]) -> None:
        if self.point == "routed":
            self.issue(ctx, layer)

    def on_demand_issued(self, ctx: PrefetchContext, layer: int, keys: Sequence[int]) -> None:
        if self.point == "demand_issued":
            self.issue(ctx, layer)


# -- placement: what happens to a routed expert that is not resident ------------------------
FETCH, CPU, LOW_PRECISION, SKIP = 0, 1, 2, 3  # PlacementPolicy.decide answers
ACTIONS = ("fetch", "cpu", "low_precision", "skip")


class PlacementContext(Protocol):
    """What a placement policy can ask when it decides (implemented by the simulator).

    Costs are seconds from now (``clock.now``, routing of the layer just known) until the
    expert's output exists on the GPU, queue-aware: behind the host link's booked copies and
    the host CPU's booked expert executions of this layer. Zero-latency runs have no costs."""

    clock: SimClock
    shape: ModelShape
    timed: bool

    def fetch_cost(self, tokens: int, bits: int | None = None) -> float:
        """Copy the expert (``bits`` per weight; None: the model's dtype) as a demand copy,
        then compute it on the GPU for ``tokens`` tokens."""
        ...

    def cpu_cost(self, tokens: int) -> float:
        """Copy the tokens' activations host-ward, compute the expert on the host CPU, copy
        the outputs back."""
        ...


class PlacementPolicy:
    """Decides, for every routed expert that is not resident when its layer routes, whether it
    is fetched (full precision, cached: the default), computed on the host CPU (nothing copied
    but activations), fetched in low precision (fewer bytes, not cached), or skipped.

    ``decide`` gets the expert's key, its normalised gate weight (the largest over the step's
    tokens that chose it; NaN unless ``needs_gate_weights``) and how many tokens it serves.
    ``cpu_layers`` lists MoE layers whose routed experts always run on the CPU and never take a
    cache slot (their prefetches are ignored). Resident experts and transfers already started
    are always used as they are.
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    needs_gate_weights: ClassVar[bool] = False  # refuses traces without router weights
    uses_cpu: ClassVar[bool] = False  # needs a host CPU model in timed mode
    timed_only: ClassVar[bool] = False  # decides from costs, which zero-latency runs lack
    approximates: ClassVar[bool] = False  # may skip or reduce precision (gate mass < 1)
    # ``cpu_layers`` are whole layers the engine times itself (``sim.cpu_layers``), never
    # asking ``decide`` and never caching their experts: "cpu" run on the host (attention,
    # router, shared experts too: placement ``cpu_layers``), "copied" run on the GPU with every
    # weight copied in at each call (placement ``layer_offload``); "" none
    whole_layers: ClassVar[str] = ""

    def __init__(self, setup: PolicySetup) -> None:
        self.setup = setup

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        raise NotImplementedError

    def cpu_layers(self) -> list[int]:
        """MoE layers computed on the CPU whatever the cache holds (default none)."""
        return []

    def low_precision_bits(self) -> int:
        """Bits per weight of a low-precision copy (placements that answer LOW_PRECISION)."""
        raise NotImplementedError


class FetchOnMiss(PlacementPolicy):
    """Fetch every missed expert at full precision and cache it (the simulator's default)."""

    name = "fetch"

    def decide(self, ctx: PlacementContext, key: int, weight: float, tokens: int) -> int:
        return FETCH
