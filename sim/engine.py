"""The simulation loop: the GPU walks steps and MoE layers while the link moves experts.

One MoE layer ``l`` of a step, as every policy sees it::

    pre-attention point -> attention + router -> routing known -> demand fetches issued
          ^ on_pre_attention     ^ on_routed (prefetches       ^ on_demand_issued
                                   land before accesses)          (prefetch behind demand)
    -> experts compute as they arrive (resident first, then in arrival order) -> layer end

A *placement* policy (``placement=<name>``, ``policies.base.PlacementPolicy``) decides what
happens to a routed expert that is not resident when its layer routes: fetched on demand and
cached (``fetch``, the default and the only choice before placements existed: those runs are
unchanged), computed on the host CPU, fetched in low precision (not cached), or skipped. A
CPU-executed expert costs, in timed mode: the layer's hidden states copied host-ward once per
layer (``tokens x activation_bytes``; device-to-host runs in the other direction of the
full-duplex link, where nothing else is copied in this model, so it does not queue), the
expert on one of the host CPU's ``parallel`` lanes (``HostCpuTimes.expert_time``; a lane runs
one expert at a time, in the layer's access order), and its output copied back over the host
link (``n_tokens x activation_bytes``, demand priority, booked at routing behind the layer's
expert copies, starting when the CPU finishes). The CPU runs beside the GPU's compute and the
link's copies; the layer ends when both the GPU's experts and every CPU expert's output are
done. A low-precision copy is a demand copy of ``expert_bytes * bits / dtype_bits`` bytes that
the GPU computes when it lands (same compute time) and then drops.

A runtime whose copies share the compute stream (``sim.link.CopyRules``: ``compute_stream``)
lays every compute time out as its host part (the runtime's overheads: the GPU stream idle, the
link's copies running) followed by its GPU kernel (the copies paused). The link then runs on
*link time*, wall time less the kernel time so far (``Simulation.link_time``), and the GPU waits
on link times: an awaited expert's host part is issued at once (copies are ``non_blocking``),
its kernel starts once its copy has landed, and the wait in between is stall. With
``copy.order: fifo`` (``CopyRules.window``) the stream runs in issue order: every kernel of the
layer also waits for every copy handed to the stream before it (the attention kernel for the
copies in flight when the layer starts; the expert kernels also for the layer's first
``window`` demand copies, handed at routing), and each further demand copy is
handed over after the kernel of the missed expert before it (``_run_gpu_fifo``); with
``CopyRules.sync`` (``copy.sync: expert``) the host waits for the stream before each expert
call's host part, which then never runs beside a copy handed before it; with
``CopyRules.own_prefetch`` (``copy.prefetch_stream: own``) prefetches run on a stream of their
own: only demand copies hold kernels, an expert whose prefetch is in flight waits for that
copy, and the link runs on wall time (exact for demand copies: in issue order none is in
flight during a kernel). A runtime's
``copy.host_s`` adds the host's work to issue the layer's demand copies, and the prefetch
copies started since the previous routing, right after routing (``CopyRules.issue_time``), in
either layout.

Timed mode runs the GPU as a SimPy process (durations from the hardware profile; policies may
schedule their own SimPy callbacks with ``ctx.after``). Zero-latency mode runs the same code with
no time: every load completes at once, which is MoE-Beyond's evaluation protocol.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import simpy

from moesim.policies.base import (
    CPU,
    FETCH,
    LOW_PRECISION,
    SKIP,
    EvictionPolicy,
    Knowledge,
    ModelShape,
    PolicySetup,
    PrefetchPolicy,
)
from moesim.policies.registry import PlacementSpec, PolicySpec, resolve_placement
from moesim.sim import compiled
from moesim.sim.cache import (
    ABSENT,
    COUNTED_PREFETCH,
    LOADING,
    RESIDENT,
    ExpertCache,
    SimulationError,
)
from moesim.sim.cpu_layers import HOST, CpuLayerTimes, cpu_layer_times, offload_layer_times
from moesim.sim.hardware import ComputeTimes, HostSide, TransferModel
from moesim.sim.link import (
    ACTIVATION,
    NO_RULES,
    HostLink,
    copy_rules,
    host_time,
    wait_for_gate,
)
from moesim.sim.link import LOW_PRECISION as LOW_COPY
from moesim.sim.metrics import HIT, LATE, MISS, PROMOTED, Counters, RunResult, build_result
from moesim.sim.predictions import PredictionView
from moesim.sim.workload import Workload, WorkloadFuture

Mode = Literal["timed", "zero_latency"]


@dataclass(frozen=True)
class CacheOptions:
    """How the expert cache is laid out and started."""

    capacity: int  # slots over all partitions
    partition: Literal["global", "per_layer"] = "global"
    pin_layer: bool = True  # experts of the layer being computed cannot be evicted
    prefill: Literal["empty", "random"] = "empty"
    reset_per_request: bool = False  # a fresh cache for every request (MoE-Beyond protocol)
    # Device buffers outside the cache that hold experts in flight and while they compute
    # (mixtral-offloading's ``buffer_size``): a partition smaller than the computing layer's
    # experts plus one copy in flight borrows up to this many extra slots, so caches of 1-2
    # experts per layer run as real runtimes run them. Modelled as slots of the partition only
    # as far as the partition is short of that need (a buffer beyond it adds nothing): the
    # borrowed slot keeps its expert until evicted, which overstates the hit rate a little.
    staging: int = 0


@dataclass(frozen=True)
class RunOptions:
    mode: Mode = "timed"
    seed: int = 0
    record_transfers: bool = False
    timeline_steps: int = 0  # steps of compute/copy spans kept for the Chrome trace
    progress: bool = False
    # "auto": the compiled engine (sim.compiled) where it has an exact twin of the run, which
    # gives the same metrics, else SimPy; "python": always SimPy; "compiled": an error if absent.
    engine: Literal["auto", "python", "compiled"] = "auto"


class Clock:
    """Where the GPU is; read by policies through ``SimClock``."""

    __slots__ = ("counting", "layer", "now", "position", "step")

    def __init__(self) -> None:
        self.now = 0.0
        self.step = 0
        self.layer = 0
        self.position = 0
        self.counting = True  # False during warm-up steps


class _Context:
    """The ``PrefetchContext`` handed to prefetch policies."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.clock = sim.clock
        self.shape = sim.shape

    def prefetch(self, keys: Iterable[int], priority: float | None = None) -> int:
        return self._sim.prefetch(keys, priority)

    def cancel_prefetches(self, keys: Iterable[int] | None = None) -> int:
        link = self._sim.link
        return 0 if link is None else link.cancel(keys)

    def is_resident(self, key: int) -> bool:
        return self._sim.cache.state[key] == RESIDENT

    def is_loading(self, key: int) -> bool:
        link = self._sim.link
        return self._sim.cache.state[key] == LOADING or (link is not None and link.is_queued(key))

    def install(self, keys: Iterable[int]) -> int:
        if self._sim.started:
            raise SimulationError("ctx.install is only allowed before the first step")
        return sum(self._sim.cache.install(k) for k in keys)

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self._sim.after(delay, fn)

    @property
    def request_ids(self) -> Sequence[int]:
        return self._sim.workload.requests_of(self.clock.step)


class _PlaceContext:
    """The ``PlacementContext`` handed to placement policies: queue-aware costs."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.clock = sim.clock
        self.shape = sim.shape
        self.timed = sim.timed

    def fetch_cost(self, tokens: int, bits: int | None = None) -> float:
        sim = self._sim
        if not self.timed:
            return 0.0
        nbytes = sim.shape.expert_bytes
        if bits is not None:
            nbytes = int(nbytes * bits / sim.host.dtype_bits)
        # a demand copy issued now starts behind the booked copies (queued prefetches go
        # behind it)
        return (sim.link.copy_start() - sim.link.t + sim.link_model.transfer_time(nbytes)
                + sim.compute.expert_time(tokens))

    def cpu_cost(self, tokens: int) -> float:
        sim = self._sim
        if not self.timed:
            return 0.0
        start = max(sim._d2h_at(), min(sim._cpu_free))
        done = start + sim.host.cpu.expert_time(tokens)
        # its output goes back over the host link, behind the copies booked there
        back = sim.link.copy_start(done)
        return (back - self.clock.now
                + sim.link_model.transfer_time(tokens * sim.host.activation_bytes))


def _overrides(obj: object, base: type, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(base, name)


class Simulation:
    """One run of one policy over one workload. Build, then call :meth:`run` once."""

    # The residency bookkeeping; the real executor substitutes one that also holds slots.
    cache_type: ClassVar[type[ExpertCache]] = ExpertCache

    def __init__(
        self,
        workload: Workload,
        spec: PolicySpec,
        cache_opts: CacheOptions,
        run_opts: RunOptions,
        link_model: TransferModel | None = None,
        compute: ComputeTimes | None = None,
        labels: dict[str, Any] | None = None,
        dense_before: Sequence[int] | None = None,
        predictions: Mapping[int, np.ndarray] | None = None,
        placement: PlacementSpec | None = None,
        host: HostSide | None = None,
    ) -> None:
        self.workload = workload
        self.shape: ModelShape = workload.shape
        self.spec = spec
        self.copts = cache_opts
        self.ropts = run_opts
        self.timed = run_opts.mode == "timed"
        if run_opts.mode not in ("timed", "zero_latency"):
            raise SimulationError(f"mode must be 'timed' or 'zero_latency', got {run_opts.mode!r}")
        if self.timed and (link_model is None or compute is None):
            raise SimulationError("timed mode needs a transfer model and compute times")
        if self.timed and not cache_opts.pin_layer:
            raise SimulationError("timed mode pins the computing layer; pin_layer must be true")
        if cache_opts.reset_per_request and int(workload.req_offsets[1]) > 1:
            raise SimulationError("cache.reset_per_request needs batch size 1")
        self.link_model = link_model
        self.compute = compute
        # Copy rules of a runtime (swap, compute stream); link time = wall time without them.
        self.rules = copy_rules(link_model, workload.shape.expert_bytes) if self.timed else (
            NO_RULES)
        self._cs = self.rules.compute_stream
        # the link runs on link time (copies on the compute stream), else on wall time
        # (``CopyRules.link_clock``: also with prefetches on their own stream)
        self._lt = self.rules.link_clock
        self._own = self.rules.own_prefetch
        # copy.order: fifo: the layer's demand copies (key, evicted) in issue order, handed
        # to the link by the GPU loop (a window at routing, the rest one per loaded expert)
        self._fifo = self.rules.fifo
        self._handoff: list[tuple[int, bool]] = []
        self._tau = 0.0  # link time at the GPU's last yield boundary (compute stream only)
        self._pieces: list[tuple[float, float, float]] = [(0.0, 0.0, float("inf"))]
        self.link_end: float | None = None  # link time at the end (compute stream only)
        self.labels = labels or {}
        self.dense_before = list(dense_before or [0] * self.shape.num_layers)
        self.clock = Clock()
        self.rng = np.random.default_rng(run_opts.seed)
        self.future = WorkloadFuture(workload) if spec.needs(Knowledge.ORACLE) else None
        self.predictions = None
        if spec.needs(Knowledge.PREDICTIONS):
            if predictions is None:
                raise SimulationError(
                    f"policy {spec.name!r} replays predictions, but no prediction table was "
                    "given (set predictions.path, or import a source that has one)"
                )
            self.predictions = PredictionView(
                workload, predictions, getattr(predictions, "available_at", None)
            )
        self.started = False
        self.env: simpy.Environment | None = None
        self.c = Counters(self.shape.num_layers)
        self._peers: dict[str, Any] = {}  # shared by all policy instances of this run
        if (placement is not None and placement.cls.whole_layers
                and cache_opts.partition == "per_layer"):
            # the host / offloaded layers would hold partitions no expert ever uses, sized
            # and checked like the others: the budget is the GPU layers' (one global cache)
            raise SimulationError(
                f"placement {placement.name!r} with cache.partition=per_layer: its layers on "
                "the host or copied in take no cache slot, so their partitions would waste "
                "the budget; use cache.partition=global")
        self._layers_of_part, self._part_of_layer, self._caps = self._partitions()
        caps = list(self._caps)  # before staging buffers lend slots
        self._check_capacity()
        if self._fifo and cache_opts.partition == "per_layer":  # load_experts' window bound
            self.rules = replace(self.rules, groups=tuple(caps[p] for p in self._part_of_layer))
        self._init_placement(placement, host)
        if self._cs and self._place and not self.placement_spec.cls.whole_layers:
            raise SimulationError(
                f"placement {self.placement_spec.name!r} with a runtime whose copies share the "
                "compute stream (copy.stream: compute) is not modelled (only the default "
                "fetch placement and cpu_layers are)")
        # every piece of the GPU's layout, to put recorded copies on the wall clock at the end
        self._history: list[tuple[float, float, float]] | None = (
            [] if self._lt and (run_opts.record_transfers or run_opts.timeline_steps) else None)
        self.cache = self._new_cache()
        self.prefetcher: PrefetchPolicy = spec.prefetch(self._setup(spec.prefetch_params, None))
        self.link: HostLink | None = None
        self.ctx = _Context(self)
        self.timeline: list[tuple[str, str, float, float]] = []

    # -- construction ---------------------------------------------------------------------
    def _init_placement(self, spec: PlacementSpec | None, host: HostSide | None) -> None:
        """The placement policy and its state; plain ``fetch`` leaves every path as before
        (no random draws, no extra work per access)."""
        self.placement_spec = spec = spec or resolve_placement("fetch")
        self.host = host or HostSide()
        cls, name = spec.cls, spec.name
        if cls.needs_gate_weights and self.workload.gate_mass is None:
            raise SimulationError(
                f"placement {name!r} needs router weights (gate scores): the workload has none "
                "(a trace without a scores column, or built without gate_weights)")
        if cls.timed_only and not self.timed:
            raise SimulationError(f"placement {name!r} decides from copy and CPU times; it "
                                  "needs mode=timed")
        if cls.uses_cpu and self.timed and self.host.cpu is None:
            raise SimulationError(f"placement {name!r} computes experts on the host CPU, but "
                                  f"{self.host.why_no_cpu}")
        # Its own generator: the run's stream (random prefill, policies) stays as it was.
        params = dict(spec.params)
        if cls.whole_layers:  # the decoder layout, to count layers as the runtime does
            params["_dense_before"] = list(self.dense_before)
        setup = PolicySetup(
            shape=self.shape, capacity=self.copts.capacity, clock=self.clock,
            rng=np.random.default_rng([self.ropts.seed, 17]), params=params)
        self.placement = cls(setup)
        self._place = not spec.is_default
        self._track_gate = cls.approximates  # gate mass is all full precision otherwise
        self._never: bytearray | None = None  # keys that never take a cache slot
        cpu_layers = self.placement.cpu_layers()
        if cpu_layers:
            num_e = self.shape.num_experts
            self._never = bytearray(self.shape.num_keys)
            for j in cpu_layers:
                self._never[j * num_e:(j + 1) * num_e] = b"\x01" * num_e
        # whole layers on the host (placement cpu_layers): their costs, one function for
        # both engines (sim.cpu_layers)
        self.cpu_times: CpuLayerTimes | None = None
        if cls.whole_layers and cpu_layers:
            cpu_dense = self.placement.cpu_dense_layers()
            # the dense layers before a host / offloaded MoE layer that the split leaves on
            # the GPU (it falls between them and the MoE layer): charged with that layer
            dense_gpu = [int(n) - int(c) for n, c in zip(self.dense_before, cpu_dense,
                                                         strict=True)]
            if cls.whole_layers == "cpu":
                self.cpu_times = cpu_layer_times(
                    self.workload, cpu_layers, cpu_dense, self.host.cpu if self.timed else None,
                    self.link_model.transfer_time if self.timed else None,
                    self.compute if self.timed else None, self.host.activation_bytes,
                    dense_gpu)
            elif cls.whole_layers == "copied":
                if self.timed and self.host.attention_bytes <= 0:
                    raise SimulationError(
                        f"placement {name!r} copies each offloaded layer's attention weights, "
                        "but the host side gives no attention_bytes (HostSide; "
                        "sim.hardware.host_side fills it from the model card)")
                self.cpu_times = offload_layer_times(
                    self.workload, cpu_layers, cpu_dense,
                    self.link_model if self.timed else None,
                    self.compute if self.timed else None, self.shape.expert_bytes,
                    self.host.attention_bytes, self.host.shared_bytes, self.host.dense_bytes,
                    dense_gpu, self.shape.top_k)
        self.pctx = _PlaceContext(self)
        parallel = int(self.host.cpu.parallel) if self.host.cpu is not None else 1
        if parallel < 1:
            raise SimulationError(f"host CPU parallel must be >= 1, got {parallel}")
        self._cpu_free = [0.0] * parallel
        self._d2h_done: float | None = None  # this layer's activations on the host
        self._elsewhere: dict[int, tuple[int, float]] = {}  # access index -> (action, ready)
        self._cpu_returns: list[tuple[float, int, int]] = []  # (CPU end, access index, tokens)
        self._gate_rows: tuple[np.ndarray, np.ndarray] | None = None
        self._row_counts: list[int] | None = None
        self._step_tokens = 1

    def _partitions(self) -> tuple[list[list[int]], list[int], list[int]]:
        num_l, cap = self.shape.num_layers, self.copts.capacity
        required = self.spec.eviction.partition_required
        if required is not None and self.copts.partition != required:
            raise SimulationError(
                f"eviction {self.spec.eviction.name!r} needs cache.partition={required}"
            )
        if self.copts.partition == "global":
            return [list(range(num_l))], [0] * num_l, [cap]
        if self.copts.partition != "per_layer":
            raise SimulationError(
                f"cache.partition must be 'global' or 'per_layer', got {self.copts.partition!r}"
            )
        split = getattr(self.spec.eviction, "layer_capacities", None)
        if split is not None:  # the eviction policy allocates the slots over layers itself
            need = [self._reserve_for([j]) for j in range(num_l)]
            caps = [int(c) for c in split(cap, need, self.shape.num_experts,
                                          self.spec.eviction_params)]
            if len(caps) != num_l or sum(caps) != cap or min(caps) < 0:
                raise SimulationError(
                    f"{self.spec.eviction.name}: layer capacities {caps} do not split {cap} "
                    f"slots over {num_l} layers"
                )
        else:
            base, extra = divmod(cap, num_l)
            caps = [base + (1 if j < extra else 0) for j in range(num_l)]
        return [[j] for j in range(num_l)], list(range(num_l)), caps

    def _reserve_for(self, layers: Sequence[int]) -> int:
        width = self.workload.max_width()
        need = max(int(width[j]) for j in layers) if self.copts.pin_layer else 1
        # Zero-latency runs keep one slot of headroom so both modes size caches alike.
        engines = self.link_model.copy_engines if self.timed else 1
        return need + engines

    def _check_capacity(self) -> None:
        if self.copts.staging < 0:
            raise SimulationError(f"staging buffers must be >= 0, got {self.copts.staging}")
        if self.copts.staging:
            self._borrow_staging()
        for layers, cap in zip(self._layers_of_part, self._caps, strict=True):
            # A partition that holds all of its layers' experts never needs to evict.
            need = min(self._reserve_for(layers), len(layers) * self.shape.num_experts)
            if cap < need:
                where = "the cache" if len(self._caps) == 1 else f"layer {layers[0]}'s partition"
                raise SimulationError(
                    f"cache too small: {where} has {cap} slots but a step needs {need} "
                    "(widest layer's unique experts, pinned while computing, plus one per copy "
                    "engine); raise cache.fraction or cache.experts"
                )
        total = self.shape.num_keys
        if self.copts.capacity > total:
            raise SimulationError(
                f"cache capacity {self.copts.capacity} exceeds the {total} routed experts"
            )

    def _borrow_staging(self) -> None:
        """Partitions short of a step's need borrow staging buffers as slots (CacheOptions)."""
        for p, layers in enumerate(self._layers_of_part):
            need = min(self._reserve_for(layers), len(layers) * self.shape.num_experts)
            self._caps[p] += min(self.copts.staging, max(0, need - self._caps[p]))

    def _setup(self, params: dict[str, Any], part: int | None) -> PolicySetup:
        layers = None if part is None else self._layers_of_part[part]
        params = {**params, "_peers": self._peers}
        return PolicySetup(
            shape=self.shape,
            capacity=self.copts.capacity if part is None else self._caps[part],
            clock=self.clock,
            rng=np.random.default_rng(self.rng.integers(1 << 62)),
            future=self.future,
            predictions=self.predictions,
            partition_layers=layers,
            reserve=0 if part is None else self._reserve_for(layers),
            params=params,
        )

    def _new_cache(self) -> ExpertCache:
        evictors: list[EvictionPolicy] = [
            self.spec.eviction(self._setup(self.spec.eviction_params, p))
            for p in range(len(self._caps))
        ]
        cache = self.cache_type(self.shape.num_experts, self._part_of_layer, self._caps, evictors)
        never = self._never
        for ev in evictors:
            for key in ev.initial_contents():
                if never is None or not never[key]:
                    cache.install(key)
        if self.copts.prefill == "random":
            self._random_fill(cache)
        elif self.copts.prefill != "empty":
            raise SimulationError(f"cache.prefill must be 'empty' or 'random', got "
                                  f"{self.copts.prefill!r}")
        return cache

    def _random_fill(self, cache: ExpertCache) -> None:
        num_e = self.shape.num_experts
        for p, layers in enumerate(self._layers_of_part):
            keys = np.concatenate([np.arange(j * num_e, (j + 1) * num_e) for j in layers])
            for key in self.rng.permutation(keys).tolist():
                if cache.used[p] >= cache.capacities[p]:
                    break
                if self._never is None or not self._never[key]:
                    cache.install(key)

    # -- actions policies take ------------------------------------------------------------
    def prefetch(self, keys: Iterable[int], priority: float | None) -> int:
        cache, c = self.cache, self.c
        state = cache.state
        n = 0
        if self._never is not None:  # the placement computes these on the CPU, never caches
            never = self._never
            keys = [k for k in keys if not never[k]]
        if self.link is None:  # zero latency: the load is complete at once
            # Residency is judged for the whole request first, as the timed link does when
            # the keys are queued, so both modes evict alike.
            todo = []
            for key in keys:
                if state[key] != ABSENT:
                    cache.evictors[cache.partition(key)].on_prefetch_resident(key)
                elif key not in todo:
                    todo.append(key)
            for key in todo:
                if cache.reserve(key, prefetch=True):
                    cache.complete(key)
                    n += 1
                    if self.counting:
                        c.prefetch_started += 1
                elif self.counting:
                    c.prefetch_dropped += 1
            if self.counting:
                c.prefetch_issued += n
            return n
        link = self.link
        prio = float(link._seq) if priority is None else float(priority)
        for key in keys:
            if state[key] != ABSENT:
                cache.evictors[cache.partition(key)].on_prefetch_resident(key)
            elif link.submit_prefetch(key, prio):
                n += 1
        if self.counting:
            c.prefetch_issued += n
        return n

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        if self.env is None:
            fn()
            return
        env = self.env

        def proc() -> Generator[simpy.Event, None, None]:
            yield env.timeout(delay)
            self.clock.now = env.now
            self.link.advance(self.link_time(env.now))
            fn()
            self.link.advance(self.link_time(env.now))

        env.process(proc())

    def link_time(self, wall: float) -> float:
        """The link's clock at GPU wall time ``wall`` (inside the GPU's current yield): wall
        time itself, or on the compute stream the link time of the piece of the yield that
        holds it (a piece: from wall ``w0`` and link time ``tau0`` the link runs ``free``
        seconds, then waits out a GPU kernel until the next piece)."""
        if not self._lt:
            return wall
        for w0, tau0, free in reversed(self._pieces):
            if wall >= w0:
                dt = wall - w0
                return tau0 + (dt if dt < free else free)
        return self._tau

    def _records_to_wall(self) -> None:
        """Recorded copies (and those still running) from link time to the GPU's wall clock:
        a copy ends at the earliest wall time the layout reached its end's link time, and
        starts at the latest wall time at its start's link time (when the link clock moved on
        from there, e.g. after the kernel during which it was booked); after the run the GPU
        is idle and both clocks run alike. Clipping at the end is then by wall time."""
        hist = self._history
        assert hist is not None  # called only when the run records its layout
        hist.append((self.clock.now, self._tau, float("inf")))
        starts = [tau0 for _, tau0, _ in hist]
        ends = [tau0 + free for _, tau0, free in hist]

        def end(tau: float) -> float:
            w0, tau0, _ = hist[bisect.bisect_left(ends, tau)]
            return w0 + (tau - tau0 if tau > tau0 else 0.0)

        def start(tau: float) -> float:
            w0, tau0, _ = hist[max(0, bisect.bisect_right(starts, tau) - 1)]
            return w0 + (tau - tau0 if tau > tau0 else 0.0)

        link = self.link
        assert link is not None and link.records is not None  # a timed run that records
        link.records = [(k, kind, start(a), end(b)) for k, kind, a, b in link.records]
        link._running = [(end(f), seq, k, kind, start(a)) for f, seq, k, kind, a in link._running]
        self.link_end = None

    # -- the GPU ----------------------------------------------------------------------------
    @property
    def counting(self) -> bool:
        """Whether the current step counts in the metrics (False during warm-up)."""
        return self._counting

    def _layer_times(self) -> tuple[list[float], list[float]]:
        """Per-step attention+router time and shared-expert time (zeros in zero-latency mode)."""
        w, comp = self.workload, self.compute
        steps = w.num_steps
        if not self.timed:
            return [0.0] * steps, [0.0] * steps
        uniq: dict[tuple[int, int], tuple[float, float]] = {}
        attn, shared = [], []
        for b, ctx in zip(w.tokens.tolist(), w.context.tolist(), strict=True):
            if (b, ctx) not in uniq:
                uniq[(b, ctx)] = (comp.attention_time(b, ctx) + comp.router_time(b),
                                  comp.shared_time(b))
            a, sh = uniq[(b, ctx)]
            attn.append(a)
            shared.append(sh)
        return attn, shared

    def _host_times(self) -> tuple[list[float], list[float], list[float]]:
        """Per-step host parts (``sim.link.host_time``) of the attention(+router) time, the
        shared-expert time and one dense layer's time: on the compute stream only."""
        w, comp = self.workload, self.compute
        attn, shared, dense = [], [], []
        for b in w.tokens.tolist():
            attn.append(host_time(comp, "attention", b))
            shared.append(host_time(comp, "shared", b))
            dense.append(host_time(comp, "dense_layer", b))
        return attn, shared, dense

    def _gpu(self) -> Generator[float, None, None]:
        w, clock, c, cache = self.workload, self.clock, self.c, self.cache
        num_l = self.shape.num_layers
        pf, ctx = self.prefetcher, self.ctx
        hook_pre = _overrides(pf, PrefetchPolicy, "on_pre_attention")
        hook_routed = _overrides(pf, PrefetchPolicy, "on_routed")
        hook_issued = _overrides(pf, PrefetchPolicy, "on_demand_issued")
        hook_end = _overrides(pf, PrefetchPolicy, "on_layer_end")
        attn_t, shared_t = self._layer_times()
        cs = self._cs
        lt = self._lt  # the link on link time (else on wall time)
        own = self._own  # prefetches on their own stream: they hold no kernel
        if cs:
            attn_h, shared_h, dense_h = self._host_times()
            exp_host: dict[int, float] = {}
        dense_n = self.dense_before
        comp = self.compute
        dense_cost = {}
        exp_cost: dict[int, float] = {}
        pin = self.copts.pin_layer
        link = self.link
        timed = self.timed
        tl_steps = self.ropts.timeline_steps
        width = w.keys.shape[2]
        one_expert = comp.expert_time(1) if timed else 0.0
        place = self._place
        weights = (w.gate_mass, w.gate_max) if place and w.gate_mass is not None else None
        step_times = self.c.step_times = [] if timed else None
        ct = self.cpu_times
        on_cpu = ct.on_cpu.tolist() if ct is not None else [False] * num_l
        pf.on_start(ctx)
        self.started = True
        progress = _progress(w.num_steps, self.ropts.progress)
        for s in range(w.num_steps):
            clock.step = s
            joined = w.joins.get(s)
            if joined and self.copts.reset_per_request:
                if link is not None:
                    link.advance(self._tau if lt else clock.now)
                self._discard(cache)
                self.cache = cache = self._new_cache()
                if link is not None:
                    link.reset(cache)
            # Set before the join hooks, so prefetches a policy issues for the new request
            # count with the step they serve; the link reads the same flag from the cache.
            self._counting = clock.counting = counting = bool(w.counted[s])
            cache.counting = counting
            if joined:
                for rid in joined:
                    pf.on_request_start(ctx, rid)
            rows = w.keys[s].tolist()
            counts = None if w.counts is None else w.counts[s].tolist()
            step_start = clock.now
            for j in range(num_l):
                clock.layer = j
                clock.position = base = (s * num_l + j) * width
                if hook_pre:
                    if link is not None:
                        link.advance(self._tau if lt else clock.now)
                    pf.on_pre_attention(ctx, j)
                    if link is not None:
                        link.advance(self._tau if lt else clock.now)
                if on_cpu[j]:  # the whole layer on the host (placement cpu_layers)
                    yield from self._cpu_layer(s, j, rows[j], base + width - 1, counting)
                    continue
                if timed:
                    d = attn_t[s]
                    if dense_n[j]:
                        key = (int(w.tokens[s]), int(w.context[s]))
                        if key not in dense_cost:
                            dense_cost[key] = comp.dense_layer_time(*key)
                        d += dense_n[j] * dense_cost[key]
                    t0 = clock.now
                    if cs:  # host part first (the link runs), then the kernels (it waits)
                        h = attn_h[s]
                        if dense_n[j]:
                            h += dense_n[j] * dense_h[s]
                        # its kernels wait for the copies in flight (with prefetches on their
                        # own stream none does: no demand copy outlives its layer under fifo)
                        if self._fifo and not own and d > h:
                            link.advance(self._tau)
                            gate = max(link._free)
                            if gate > self._tau + h:
                                wait = gate - (self._tau + h)
                                d += wait
                                h += wait
                                if counting:
                                    c.stall_late += wait
                                    c.layer_stall[j] += wait
                        self._pieces = [(t0, self._tau, h)]
                        if self._history is not None:
                            self._history.extend(self._pieces)
                    if d > 0:
                        yield d
                    if lt:
                        self._tau += h
                    link.advance(self._tau if lt else clock.now)
                    if s < tl_steps:
                        self.timeline.append(("compute", f"attention L{j}", t0, clock.now))
                keys = [k for k in rows[j] if k >= 0]
                if pin:
                    cache.pinned.update(keys)
                if hook_routed:
                    pf.on_routed(ctx, j, keys)
                    if link is not None:
                        link.advance(self._tau if lt else clock.now)
                if place:
                    self._layer_start(s, j, counts, weights, counting)
                kinds = self._access(keys, j, counting)
                if self._fifo:  # the window goes to the stream before any kernel of the layer
                    handoff, self._handoff = self._handoff, []
                    wj = self.rules.layer_window(j)
                    wgate = 0.0  # when the window's copies have landed
                    for key, evicted in handoff[:wj]:
                        ready = link.submit_demand(key, evicted)
                        if ready > wgate:
                            wgate = ready
                if place and self._cpu_returns and timed:
                    self._book_cpu_returns()
                clock.position = base + width - 1
                if hook_issued:
                    pf.on_demand_issued(ctx, j, keys)
                if timed:
                    if link._queued:  # let queued prefetches take idle engines now
                        link.advance(self._tau if lt else clock.now)
                    t = clock.now
                    issue = self._issue_time(kinds) if self.rules.host_s else 0.0
                    if cs:
                        spans = [] if s < tl_steps else None
                        if self._fifo:
                            end, tau_end, st_miss, st_late, self._pieces = _run_gpu_fifo(
                                t, self._tau if lt else t, kinds,
                                None if counts is None else counts[j],
                                comp, exp_cost, exp_host, shared_t[s], shared_h[s], issue, link,
                                handoff[wj:], self.rules.sync, keys, spans,
                                wgate if own else None)
                        else:
                            waiting = [i for i, k in enumerate(kinds) if k]
                            ready = (link.ready_times([keys[i] for i in waiting]) if waiting
                                     else [])
                            end, tau_end, st_miss, st_late, self._pieces = _run_gpu_stream(
                                t, self._tau, kinds, None if counts is None else counts[j],
                                comp, exp_cost, exp_host, shared_t[s], shared_h[s], ready,
                                waiting, keys, spans, issue)
                        if spans:
                            self.timeline.extend(
                                ("compute", f"L{j} {n}", a, b) for n, a, b in spans
                            )
                        if self._history is not None:
                            self._history.extend(self._pieces)
                        if counting:
                            c.stall_miss += st_miss
                            c.stall_late += st_late
                            c.layer_stall[j] += st_miss + st_late
                    elif counts is None and s >= tl_steps and not any(kinds):
                        # all resident (``issue``: prefetches started since the last routing)
                        end = t + issue + shared_t[s] + len(keys) * one_expert
                    else:
                        end, st_miss, st_late, spans = _schedule(
                            t, keys, kinds, None if counts is None else counts[j], link, comp,
                            exp_cost, shared_t[s], s < tl_steps, issue,
                        ) if not (place and self._elsewhere) else _schedule_placed(
                            t, keys, kinds, None if counts is None else counts[j], link, comp,
                            exp_cost, shared_t[s], s < tl_steps, self._elsewhere, c,
                            j if counting else -1, issue,
                        )
                        if spans:
                            self.timeline.extend(
                                ("compute", f"L{j} {n}", a, b) for n, a, b in spans
                            )
                        if counting:
                            c.stall_miss += st_miss
                            c.stall_late += st_late
                            c.layer_stall[j] += st_miss + st_late
                    if end > t:
                        yield end - t
                    if lt:
                        self._tau = tau_end
                    # Completions are applied lazily at the next advance: until then only
                    # this layer's (pinned) experts can be in flight, unless prefetches are.
                    if hook_end or link._queued:
                        link.advance(self._tau if lt else clock.now)
                if pin:
                    cache.pinned.clear()
                if hook_end:
                    pf.on_layer_end(ctx, j)
            pf.on_step_end(ctx)
            for ev in cache.evictors:
                ev.on_step_end()
            if step_times is not None:
                step_times.append(clock.now - step_start)
            if ct is not None:  # CPU layers' host work (cpu_busy: the whole run)
                c.cpu_busy += float(ct.busy[s])
                if counting:
                    c.cpu_execs += int(ct.execs[s])
                    c.demand_started += int(ct.copied[s])  # offloaded layers' expert copies
            if counting:
                c.steps += 1
                c.out_tokens += int(w.out_tokens[s])
                c.tokens += int(w.tokens[s])
                c.pairs += int(w.pairs[s].sum())
                c.time += clock.now - step_start
            progress.update(1)
        progress.close()

    def _cpu_layer(self, s: int, j: int, row: list[int], last: int, counting: bool
                   ) -> Generator[float, None, None]:
        """MoE layer ``j`` of step ``s`` run whole on the host (placement ``cpu_layers``; with
        ``layer_offload`` the same walk over an offloaded layer's copy-and-compute times):
        its time before routing (the hidden state host-ward at the first CPU layer, CPU dense
        layers, attention and router), the routing hooks, then its shared and routed experts
        (``sim.cpu_layers.cpu_layer_times``). Every routed expert is a miss computed on the
        host: no access reaches the cache and nothing is copied or pinned. Prefetch hooks run
        as on a GPU layer (prefetches of CPU-layer experts are dropped by ``prefetch``);
        ``copy.host_s`` for prefetches started meanwhile is charged at the next GPU layer.
        With copies on the compute stream the whole layer is host time: no kernel of the
        stream runs, so the link's clock runs with the wall clock.
        ``sim/compiled/kernel.py`` mirrors it line for line."""
        ct, clock, link, pf, ctx = self.cpu_times, self.clock, self.link, self.prefetcher, self.ctx
        assert ct is not None
        keep = s < self.ropts.timeline_steps
        lt = self._lt  # the link on link time (copies on the compute stream)
        runs = ct.on_cpu[j] == HOST  # host time; an offloaded layer's copies hold the stream

        def host(d: float) -> Generator[float, None, None]:
            if lt:  # host time: the link's clock runs
                self._pieces = [(clock.now, self._tau, d if runs else 0.0)]
                if self._history is not None:
                    self._history.extend(self._pieces)
            if d > 0:
                yield d
            if lt and runs:
                self._tau += d

        if self.timed:
            t0 = clock.now
            yield from host(float(ct.before[s, j]))
            link.advance(self._tau if lt else clock.now)
            if keep:
                self.timeline.append(("cpu", f"attention L{j} (cpu)", t0, clock.now))
        keys = [k for k in row if k >= 0]
        if _overrides(pf, PrefetchPolicy, "on_routed"):
            pf.on_routed(ctx, j, keys)
            if link is not None:
                link.advance(self._tau if lt else clock.now)
        if counting:
            self.c.layer_counts[MISS][j] += len(keys)
        clock.position = last
        if _overrides(pf, PrefetchPolicy, "on_demand_issued"):
            pf.on_demand_issued(ctx, j, keys)
        hook_end = _overrides(pf, PrefetchPolicy, "on_layer_end")
        if self.timed:
            if link._queued:
                link.advance(self._tau if lt else clock.now)
            t0 = clock.now
            yield from host(float(ct.experts[s, j]))
            if keep:
                self.timeline.append(("cpu", f"L{j} experts (cpu)", t0, clock.now))
            if hook_end or link._queued:
                link.advance(self._tau if lt else clock.now)
        if hook_end:
            pf.on_layer_end(ctx, j)

    def _issue_time(self, kinds: list[int]) -> float:
        """The compute thread's time to issue copies at this layer's routing (``copy.host_s``,
        ``CopyRules.issue_time``): the layer's demand copies (misses and promoted prefetches
        fetched whole, and low-precision copies; a miss the placement serves on the CPU or
        skips copies nothing) plus every prefetch copy that started on the link since the
        previous charge (``HostLink.uncharged_prefetches``, taken here: the link has been
        advanced to now). Prefetches are charged at the next routing because the executor's
        compute thread does their copier work in its loop's pumps, not on the link."""
        place = self._elsewhere if self._place else {}
        n = sum(1 for i, k in enumerate(kinds) if k >= PROMOTED
                and (i not in place or place[i][0] == LOW_PRECISION))
        link = self.link
        n += link.uncharged_prefetches
        link.uncharged_prefetches = 0
        return self.rules.issue_time(n)

    def _access(self, keys: list[int], layer: int, counting: bool) -> list[int] | None:
        """Classify and serve the layer's demand (``sim.metrics`` kinds): HIT resident, LATE a
        transfer of it already started (the GPU may wait), PROMOTED a queued prefetch that had
        not started, turned into a demand copy, MISS absent and fetched on demand."""
        cache, c, link = self.cache, self.c, self.link
        state, unused = cache.state, cache.prefetched_unused
        evictors, part = cache.evictors, cache.partition
        single = len(evictors) == 1
        ev0 = evictors[0]
        queued = link._queued if link is not None else {}
        lc = c.layer_counts
        kinds = [] if link is not None else None
        clock = self.clock
        pos = pos0 = clock.position
        place = self._place
        for key in keys:
            clock.position = pos
            pos += 1
            st = state[key]
            if st != ABSENT:  # resident, or a transfer already on an engine
                kind = HIT if st == RESIDENT else LATE
                (ev0 if single else evictors[part(key)]).on_access(key)
                came = unused[key]
                if came:  # the first use of a prefetched copy
                    unused[key] = 0
                    if came == COUNTED_PREFETCH:
                        c.prefetch_useful += 1
                    if counting:
                        c.prefetch_served += 1
            else:
                if place and self._place_miss(key, pos - 1 - pos0, counting) != FETCH:
                    if counting:  # not resident: a miss, served without a full-precision copy
                        lc[MISS][layer] += 1
                    if kinds is not None:
                        kinds.append(MISS)
                    continue
                promoted = key in queued and link.withdraw(key)
                kind = PROMOTED if promoted else MISS
                evictions = cache.evictions
                if not cache.reserve(key, False):
                    raise SimulationError(
                        f"no evictable slot for a demand fetch of layer {layer}: every slot is "
                        "pinned or in flight"
                    )
                if link is None:
                    state[key] = RESIDENT
                else:
                    if self._fifo:  # handed over by the GPU loop (CopyRules.window)
                        self._handoff.append((key, cache.evictions != evictions))
                    else:
                        link.submit_demand(key, cache.evictions != evictions)
                if counting:
                    c.demand_started += 1
            if counting:
                lc[kind][layer] += 1
            if kinds is not None:
                kinds.append(kind)
        return kinds

    # -- placement ------------------------------------------------------------------------
    def _layer_start(self, s: int, j: int, counts: list[list[int]] | None,
                     gate: tuple[np.ndarray, np.ndarray] | None, counting: bool) -> None:
        """Per-layer state the placement decisions read (routing of ``j`` just known)."""
        self._elsewhere = {}
        self._cpu_returns = []
        self._d2h_done = None
        self._step_tokens = int(self.workload.tokens[s])
        self._row_counts = None if counts is None else counts[j]
        self._gate_rows = None if gate is None else (gate[0][s, j], gate[1][s, j])
        if counting and self._track_gate and gate is not None:
            # In float64, as the parts (gate_low, gate_skip) are added: a float32 row sum
            # could round below its own parts and make gate_mass_full negative.
            self.c.gate_total += float(gate[0][s, j].sum(dtype=np.float64))

    def _d2h_at(self) -> float:
        """When this layer's hidden states are (or would be) on the host."""
        if self._d2h_done is None:
            return self.clock.now + self.link_model.transfer_time(
                self._step_tokens * self.host.activation_bytes)
        return self._d2h_done

    def _place_miss(self, key: int, i: int, counting: bool) -> int:
        """Ask the placement about the ``i``-th access of the layer (not resident); serve it
        unless the answer is FETCH (then the caller fetches it as ever)."""
        rows = self._gate_rows
        weight = float(rows[1][i]) if rows is not None else float("nan")
        n = 1 if self._row_counts is None else int(self._row_counts[i])
        act = self.placement.decide(self.pctx, key, weight, n)
        if act == FETCH:
            return FETCH
        c, timed = self.c, self.timed
        mass = float(rows[0][i]) if rows is not None else 0.0
        if act == CPU:
            if counting:
                c.cpu_execs += 1
            end = 0.0
            if timed:
                d2h = self._d2h_done = self._d2h_at()
                lanes = self._cpu_free
                lane = lanes.index(min(lanes))
                start = max(lanes[lane], d2h)
                dur = self.host.cpu.expert_time(n)
                end = lanes[lane] = start + dur
                c.cpu_busy += dur
                self._cpu_returns.append((end, i, n))
                if self.clock.step < self.ropts.timeline_steps:
                    self.timeline.append(("cpu", f"L{self.clock.layer} cpu e{key}", start, end))
            self._elsewhere[i] = (CPU, end)
        elif act == LOW_PRECISION:
            bits = self.placement.low_precision_bits()
            nbytes = int(self.shape.expert_bytes * bits / self.host.dtype_bits)
            if counting:
                c.low_fetches += 1
                c.low_bytes += nbytes
                c.gate_low += mass
            ready = 0.0
            if timed:
                ready = self.link.submit_copy(self.link_model.transfer_time(nbytes), LOW_COPY)
            self._elsewhere[i] = (LOW_PRECISION, ready)
        elif act == SKIP:
            if counting:
                c.skipped += 1
                c.gate_skip += mass
            self._elsewhere[i] = (SKIP, 0.0)
        else:
            raise SimulationError(f"placement {self.placement_spec.name!r} answered {act!r}; "
                                  "expected FETCH, CPU, LOW_PRECISION or SKIP")
        return act

    def _book_cpu_returns(self) -> None:
        """The CPU experts' outputs go back over the host link, in the order they finish."""
        link, tt, act = self.link, self.link_model.transfer_time, self.host.activation_bytes
        for end, i, n in sorted(self._cpu_returns):
            self._elsewhere[i] = (CPU, link.submit_copy(tt(n * act), ACTIVATION, end))

    # -- running ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._counting = True
        if self.ropts.engine not in ("auto", "python", "compiled"):
            raise SimulationError(
                f"engine must be 'auto', 'python' or 'compiled', got {self.ropts.engine!r}")
        if self.ropts.engine != "python":
            reason = compiled.why_not(self)
            if reason is None:
                compiled.run(self)
                self.engine_used = "compiled"
                return build_result(self)
            if self.ropts.engine == "compiled":
                raise SimulationError(f"engine=compiled cannot replay this run: {reason}")
        self.engine_used = "python"
        if not self.timed:
            for _ in self._gpu():
                pass
        else:
            duration = self.link_model.transfer_time(self.shape.expert_bytes)
            self.link = HostLink(
                duration,
                self.link_model.copy_engines,
                self.cache,
                on_done=self._on_done_hook(),
                record=self.ropts.record_transfers or self.ropts.timeline_steps > 0,
                rules=self.rules,
            )
            self.env = env = simpy.Environment()
            clock = self.clock

            def gpu_process() -> Generator[simpy.Event, None, None]:
                for d in self._gpu():
                    yield env.timeout(d)
                    clock.now = env.now

            env.process(gpu_process())
            env.run()
            if self._lt:
                self.link_end = self._tau
                if self._history is not None:
                    self._records_to_wall()
        self.c.unused_prefetches = self.cache.unused_prefetches()
        self.c.wasted_prefetches += self.cache.wasted_prefetches
        self.c.evictions += self.cache.evictions
        return build_result(self)

    def _discard(self, cache: ExpertCache) -> None:
        """A cache replaced by a fresh one (``reset_per_request``): its counts carry over, and
        its unused prefetched copies (landed or still in flight) are wasted."""
        self.c.wasted_prefetches += cache.wasted_prefetches + cache.unused_prefetches()
        self.c.evictions += cache.evictions

    def _on_done_hook(self) -> Callable[[int, bool], None] | None:
        pf = self.prefetcher
        if not _overrides(pf, PrefetchPolicy, "on_transfer_done"):
            return None
        return lambda key, was_prefetch: pf.on_transfer_done(self.ctx, key, was_prefetch)


def _schedule(
    t: float,
    keys: list[int],
    kinds: list[int],
    counts: list[int] | None,
    link: HostLink,
    comp: ComputeTimes,
    cost: dict[int, float],
    shared: float,
    keep_spans: bool,
    issue: float = 0.0,
) -> tuple[float, float, float, list[tuple[str, float, float]]]:
    """Experts run one after another on the GPU: resident ones first, then as they arrive.

    Returns the layer's end time and the idle time spent waiting on demand copies (misses and
    promoted prefetches) and on prefetch transfers that had started before the demand.
    """
    waiting = [i for i, k in enumerate(kinds) if k]
    ready = link.ready_times([keys[i] for i in waiting]) if waiting else []
    return _run_gpu(t, keys, kinds, counts, comp, cost, shared, keep_spans, ready, waiting,
                    issue)


def _run_gpu(
    t: float,
    keys: list[int],
    kinds: list[int],
    counts: list[int] | None,
    comp: ComputeTimes,
    cost: dict[int, float],
    shared: float,
    keep_spans: bool,
    ready: list[float],
    waiting: list[int],
    issue: float = 0.0,
) -> tuple[float, float, float, list[tuple[str, float, float]]]:
    """The GPU's order within a layer, shared by both schedulers: the host issuing the
    layer's demand copies (``issue``: ``CopyRules.issue_time``, 0 without ``copy.host_s``),
    the shared experts, the resident ones, then each awaited one (index ``waiting[n]``,
    weights there at ``ready[n]``) in arrival order; the wait before each is stall, on a
    started prefetch (LATE) or on a demand copy."""

    def dur(i: int) -> float:
        n = 1 if counts is None else counts[i]
        if n not in cost:
            cost[n] = comp.expert_time(n)
        return cost[n]

    spans: list[tuple[str, float, float]] = []
    if issue:
        if keep_spans:
            spans.append(("issue copies", t, t + issue))
        t = t + issue
    now = t + shared
    if keep_spans and shared > 0:
        spans.append(("shared", t, now))
    for i, k in enumerate(kinds):
        if not k:
            d = dur(i)
            if keep_spans:
                spans.append((f"e{keys[i]}", now, now + d))
            now += d
    st_miss = st_late = 0.0
    for r, i in sorted(zip(ready, waiting, strict=True)):
        if r > now:
            if kinds[i] == LATE:
                st_late += r - now
            else:  # a demand copy: a miss, a promoted prefetch or a low-precision copy
                st_miss += r - now
            now = r
        d = dur(i)
        if keep_spans:
            spans.append((f"e{keys[i]}", now, now + d))
        now += d
    return now, st_miss, st_late, spans


def _run_gpu_stream(
    t: float,
    tau: float,
    kinds: list[int],
    counts: list[int] | None,
    comp: ComputeTimes,
    cost: dict[int, float],
    host: dict[int, float],
    shared: float,
    shared_host: float,
    ready: list[float],
    waiting: list[int],
    keys: list[int] | None = None,
    spans: list[tuple[str, float, float]] | None = None,
    issue: float = 0.0,
) -> tuple[float, float, float, float, list[tuple[float, float, float]]]:
    """:func:`_run_gpu` with the copies on the compute stream (``CopyRules.compute_stream``):
    the same order (shared experts, resident ones, then each awaited one by arrival), each
    compute time laid out as its host part (the link runs: link time ``tau`` advances with
    the wall clock ``t``) then its kernel (the link waits). An awaited expert's host part is
    issued at once; its kernel starts when its copy has landed (``ready``, link times), and
    the wait in between is stall. The host issuing the layer's demand copies (``issue``) comes
    first, host time like the shared experts' host part. Returns the wall end, the link time
    at the end, the stalls
    (miss, late) and the pieces of the layout (``Simulation.link_time``); ``spans`` (if
    given) gets each expert's wall span, host part and kernel.
    ``sim/compiled/kernel.py`` mirrors it line for line."""

    def dur(n: int) -> tuple[float, float]:
        if n not in cost:
            cost[n] = comp.expert_time(n)
        if n not in host:
            host[n] = host_time(comp, "expert", n)
        return cost[n], host[n]

    pieces = [(t, tau, issue + shared_host)]
    if issue and spans is not None:
        spans.append(("issue copies", t, t + issue))
    now = t + issue + shared
    tau += issue + shared_host
    if spans is not None and shared > 0:
        spans.append(("shared", t + issue, now))
    for i, k in enumerate(kinds):
        if not k:
            d, h = dur(1 if counts is None else counts[i])
            pieces.append((now, tau, h))
            if spans is not None and keys is not None:
                spans.append((f"e{keys[i]}", now, now + d))
            now += d
            tau += h
    st_miss = st_late = 0.0
    for r, i in sorted(zip(ready, waiting, strict=True)):
        d, h = dur(1 if counts is None else counts[i])
        w0, tau0 = now, tau
        now += h
        tau += h
        if r > tau:
            if kinds[i] == LATE:
                st_late += r - tau
            else:
                st_miss += r - tau
            now += r - tau
            tau = r
        pieces.append((w0, tau0, tau - tau0))
        now += d - h
        if spans is not None and keys is not None:
            spans.append((f"e{keys[i]}", w0, now))
    return now, tau, st_miss, st_late, pieces


def _run_gpu_fifo(
    t: float,
    tau: float,
    kinds: list[int],
    counts: list[int] | None,
    comp: ComputeTimes,
    cost: dict[int, float],
    host: dict[int, float],
    shared: float,
    shared_host: float,
    issue: float,
    link: HostLink,
    deferred: list[tuple[int, bool]],
    sync: bool = False,
    keys: list[int] | None = None,
    spans: list[tuple[str, float, float]] | None = None,
    gate: float | None = None,
) -> tuple[float, float, float, float, list[tuple[float, float, float]]]:
    """:func:`_run_gpu_stream` on a stream that runs in issue order (``copy.order: fifo``,
    ``CopyRules.window``): a kernel starts only once every copy handed to the link before it
    has landed (``gate``, link time: the latest finish booked on any copy engine; a prefetch
    counts from when it starts on the link). The layer's first ``window`` demand copies were
    handed when it routed, so the shared and resident experts' kernels wait for them and for
    every copy already in flight; then come the started prefetches it uses (LATE) and its
    demand copies in issue order, and after each demand expert's kernel the next of
    ``deferred`` (key, evicted) is handed over, starting no earlier than that kernel's end
    (the link time at its start: the link clock stops during kernels). Each expert is laid
    out as its host part, the wait for ``gate``, its kernel; with ``sync`` (``copy.sync:
    expert``) the wait comes first, as the host waits for the stream before the expert's
    host work (the shared experts' too). A wait is stall on demand copies
    (a hit's or shared expert's wait when the layer has any demand copy) or on prefetches
    (LATE; a hit's when it has none).

    ``gate`` given: prefetches run on a stream of their own (``CopyRules.own_prefetch``), so
    only demand copies hold kernels: ``gate`` is when the window's copies land (no earlier
    demand copy is in flight: each was waited for by a kernel of its layer), and ``tau`` is
    wall time (``t``), which also runs during kernels. An expert whose prefetch is in flight
    (LATE) then waits after its host part for that copy too (``max(gate, its arrival)``,
    stall on prefetches); before each later demand copy is handed over, the link is advanced
    to that moment, so a queued prefetch that could start earlier on a free engine has (the
    demand copy then queues behind it). ``sim/compiled/kernel.py`` mirrors it line for line."""

    def dur(n: int) -> tuple[float, float]:
        if n not in cost:
            cost[n] = comp.expert_time(n)
        if n not in host:
            host[n] = host_time(comp, "expert", n)
        return cost[n], host[n]

    demand = [i for i, k in enumerate(kinds) if k >= PROMOTED]
    order = ([i for i, k in enumerate(kinds) if k == HIT]
             + [i for i, k in enumerate(kinds) if k == LATE] + demand)
    own = gate is not None
    if gate is None:
        gate = max(link._free)
    st_miss = st_late = 0.0
    # the host issues the demand copies, then the shared experts' host part and kernel
    h = issue + shared_host
    now = t
    tau0 = tau
    if sync and shared > 0:
        now, tau, st_miss, st_late = wait_for_gate(gate, now, tau, not demand, st_miss, st_late)
    now += h
    tau += h
    if shared > 0:
        now, tau, st_miss, st_late = wait_for_gate(gate, now, tau, not demand, st_miss, st_late)
    pieces = [(t, tau0, tau - tau0)]
    if spans is not None:
        if issue:
            spans.append(("issue copies", t, t + issue))
        if shared > 0:
            spans.append(("shared", t + issue, now + (shared - shared_host)))
    now += shared - shared_host
    if own:  # the link's clock is the wall clock: it runs during kernels
        tau += shared - shared_host
    nxt = 0
    for i in order:
        d, h = dur(1 if counts is None else counts[i])
        w0, tau0 = now, tau
        late = kinds[i] == LATE or (kinds[i] == HIT and not demand)
        if sync:
            now, tau, st_miss, st_late = wait_for_gate(gate, now, tau, late, st_miss, st_late)
        now += h
        tau += h
        now, tau, st_miss, st_late = wait_for_gate(gate, now, tau, late, st_miss, st_late)
        if own and kinds[i] == LATE:  # its own copy, on the prefetch stream
            assert keys is not None  # the engine passes the layer's keys
            r = link.ready_times([keys[i]])[0]
            if r > tau:
                st_late += r - tau
                now += r - tau
                tau = r
        pieces.append((w0, tau0, tau - tau0))
        now += d - h
        if own:
            tau += d - h
        if spans is not None and keys is not None:
            spans.append((f"e{keys[i]}", w0, now))
        if kinds[i] >= PROMOTED and nxt < len(deferred):  # the next copy, behind this kernel
            key, evicted = deferred[nxt]
            nxt += 1
            if own and link._queued:  # prefetches that start first on a free engine
                link.advance(tau)
            ready = link.submit_demand(key, evicted, tau)
            if ready > gate:
                gate = ready
    return now, tau, st_miss, st_late, pieces


def _schedule_placed(
    t: float,
    keys: list[int],
    kinds: list[int],
    counts: list[int] | None,
    link: HostLink,
    comp: ComputeTimes,
    cost: dict[int, float],
    shared: float,
    keep_spans: bool,
    elsewhere: dict[int, tuple[int, float]],
    c: Counters,
    layer: int,
    issue: float = 0.0,
) -> tuple[float, float, float, list[tuple[str, float, float]]]:
    """:func:`_schedule` for a layer where the placement served some misses otherwise: CPU
    experts and skipped ones take no GPU time, a low-precision copy is waited for like a demand
    copy; the layer then waits for the last CPU output (``stall_cpu``, counted here for
    ``layer``; -1 in warm-up steps)."""
    on_link = [i for i, k in enumerate(kinds) if k and i not in elsewhere]
    ready = link.ready_times([keys[i] for i in on_link]) if on_link else []
    low = [i for i, (a, _) in elsewhere.items() if a == LOW_PRECISION]
    ready += [elsewhere[i][1] for i in low]
    now, st_miss, st_late, spans = _run_gpu(t, keys, kinds, counts, comp, cost, shared,
                                            keep_spans, ready, on_link + low, issue)
    cpu_done = max((r for a, r in elsewhere.values() if a == CPU), default=now)
    if cpu_done > now:
        if layer >= 0:
            c.stall_cpu += cpu_done - now
            c.layer_stall[layer] += cpu_done - now
        now = cpu_done
    return now, st_miss, st_late, spans


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="simulating", mininterval=0.5, leave=False)


__all__ = ["CacheOptions", "RunOptions", "Simulation"]
