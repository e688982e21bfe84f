"""The host->GPU link: copy engines serving a demand queue before a prefetch queue.

Each copy engine serves one transfer at a time and never preempts it. Demand fetches (FIFO) go
before queued prefetches (by priority, then submission order); a queued prefetch may be
cancelled by its policy or promoted to demand when the GPU needs it. A prefetch takes its
cache slot when its transfer starts and is dropped if no slot can be freed then.

The link is an exact event-driven queue that the SimPy processes advance to the current time
(``advance``) before they act: transfers are discrete events without one SimPy event each,
which keeps replays of millions of accesses fast. ``tests/sim/test_link_reference.py`` checks it
against a plain SimPy ``PriorityResource`` model.

A runtime profile (``hw_profiles.runtime.RuntimeLink``) adds these copy rules, read once per
run by :func:`copy_rules` (both engines use it; the compiled link mirrors
:meth:`CopyRules.load_time`, the compiled kernel :meth:`CopyRules.issue_time` and the window):

- ``swap``: an install (demand or prefetch) that evicts a resident expert copies the evicted one
  back device -> host on the load's stream first. On the compute stream the load waits behind it
  (its copy takes ``load + swap_s``); on its own stream the copy back runs on the other
  direction of the full-duplex link and costs the load nothing. Either way it is counted
  (``swap_copies``, ``swap_copy_s``); an install that evicts nothing copies nothing back,
  unless ``always`` (``swap: always``: a runtime whose device slots are always full copies one
  back on every load).
- ``compute_stream``: copies share the compute stream, so they cannot run while a GPU kernel
  runs, only while the GPU waits on the host (runtime overheads) or on the copy. The engine
  then advances the link on *link time*, a clock that stops during GPU kernels (wall time
  minus the kernel time so far): every time the link holds (start, finish, ``t``, busy) is in
  link time, and the engine maps it to the GPU's wall clock (``sim.engine``).
- ``window`` (``copy.order: fifo``, compute stream only): the stream runs copies and kernels
  in the order they are handed to it, so a kernel waits for every copy handed before it (a
  prefetch counts once it has started on the link). A layer hands its first ``window``
  demand copies over when it routes (at most its group's device experts with a per-layer
  cache: :meth:`CopyRules.layer_window`), before any of its kernels, and each further one after
  the kernel of the missed expert before it (``submit_demand(..., not_before)``: no earlier
  than that kernel's end); ``sim.engine._run_gpu_fifo`` lays it out. With ``sync``
  (``copy.sync: expert``) the host also waits for the stream before each expert call's host
  work, so that work never overlaps a copy handed before it.
- ``own_prefetch`` (``copy.prefetch_stream: own``, fifo only): prefetch copies run on a stream
  of their own. They never gate a compute-stream kernel (only demand copies do), are not
  paused by kernels, and still share the copy engines with demand copies (one non-preemptive
  queue, demand first); an expert whose prefetch is still in flight waits for that copy
  before its kernel (a late hit), and a queued prefetch promoted to demand is a demand copy.
  The whole link then runs on wall time (:attr:`CopyRules.link_clock`): that leaves every
  demand copy's timing as it was, because under fifo a demand copy never overlaps a kernel
  (the layer's first ``window`` copies are handed after the attention kernel and every
  kernel waits for them; a later one is handed after a kernel and the next kernel waits for
  it), so pausing the link during kernels only ever paused prefetches.
- ``host_s`` (``copy.host_s``): the compute thread's work to issue one copy, host time in
  series with the layer (:meth:`CopyRules.issue_time`: ``n x host_s`` right after routing),
  never time on the link. ``n`` is the layer's demand copies plus every prefetch copy that
  started on the link since the previous layer's charge, up to this routing
  (``HostLink.uncharged_prefetches``; a queued prefetch cancelled, promoted or dropped before
  it started costs nothing). Why there: the executor's compute thread does a prefetch's
  copier work (reserve its slot, hand it to a worker, later drain it) in the pumps of its
  run loop, the nearest after the copy can start; the routing is the one point where both
  engines already charge host work, and a prefetch started during a layer's experts is
  charged at the next layer's routing (those started after the run's last routing are never
  charged).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.sim.cache import ABSENT, RESIDENT, ExpertCache, SimulationError

DEMAND, PREFETCH = 0, 1
# Copies that take no cache slot (key -1): a layer's activations for or from the host CPU,
# and a low-precision expert copy used once and not cached (placement policies).
ACTIVATION, LOW_PRECISION = 2, 3
COPY_KINDS = ("demand", "prefetch", "activation", "low_precision")
INF = float("inf")


@dataclass(frozen=True)
class CopyRules:
    """A run's copy rules beyond each copy's duration (see the module docstring)."""

    swap: bool = False  # an eviction copies the evicted expert back device -> host
    swap_s: float = 0.0  # that copy's time (``RuntimeLink.swap_time``)
    compute_stream: bool = False  # copies pause while a GPU kernel runs
    always: bool = False  # every install copies one back, evicting or not (``swap: always``)
    host_s: float = 0.0  # the compute thread's work to issue one copy (``copy.host_s``)
    # ``copy.order: fifo`` (compute stream only): the demand copies handed to the stream at
    # the layer's start, before any of its kernels (0: kernels wait only on their own copy)
    window: int = 0
    # the host waits for the stream before each expert call's host work (``copy.sync:
    # expert``; fifo only): an expert's host part never overlaps a copy handed before it
    sync: bool = False
    # per layer, the experts the runtime keeps on the device for it (a per-layer cache's
    # slots, staging buffers not included): ``load_experts`` hands over at most that many
    # copies at routing; empty: no such bound (a global cache)
    groups: tuple[int, ...] = ()
    # prefetches on their own stream (``copy.prefetch_stream: own``; fifo only): they gate no
    # kernel and progress on wall time, which the whole link then runs on
    own_prefetch: bool = False

    @property
    def serial(self) -> bool:
        """The copy back runs before the load on the same (compute) stream."""
        return self.swap and self.compute_stream

    def load_time(self, duration: float, evicted: bool) -> float:
        """One install's time on the link: the load, behind the copy back of the expert it
        evicted when both share the compute stream (``duration`` itself otherwise, so runs
        without these rules keep their exact times)."""
        return duration + self.swap_s if evicted and self.serial else duration

    def issue_time(self, copies: int) -> float:
        """The compute thread's time to issue ``copies`` copies at a layer's routing (its
        demand copies and the prefetches started since the last charge: host work in series
        with the layer's, never on the link); exactly 0 without ``host_s``."""
        return copies * self.host_s if copies and self.host_s else 0.0

    @property
    def fifo(self) -> bool:
        """Kernels wait for every copy handed to the compute stream before them."""
        return self.window > 0

    @property
    def link_clock(self) -> bool:
        """The link runs on link time (wall time less the kernel time so far): copies on the
        compute stream, unless prefetches have their own stream (then on wall time)."""
        return self.compute_stream and not self.own_prefetch

    def layer_window(self, layer: int) -> int:
        """The demand copies handed over when ``layer`` routes: ``window``, at most the
        experts its group keeps on the device (``groups``), at least one."""
        if not self.groups:
            return self.window
        return max(1, min(self.window, self.groups[layer]))

    def vector(self) -> np.ndarray:
        """The rules as the compiled kernel reads them (``kernel.replay``'s ``copyv``):
        [compute stream, swap mode, swap seconds, host_s, window, sync, own prefetch stream,
        then with ``groups`` each layer's :meth:`layer_window`]; the swap mode is 0 without
        swap, 1 on its own stream, 2 before the load on the compute stream, +2 with
        ``always``."""
        mode = 0 if not self.swap else (2 if self.serial else 1) + (2 if self.always else 0)
        return np.array([1.0 if self.compute_stream else 0.0, float(mode), self.swap_s,
                         self.host_s, float(self.window), 1.0 if self.sync else 0.0,
                         1.0 if self.own_prefetch else 0.0,
                         *(float(self.layer_window(j)) for j in range(len(self.groups)))])


NO_RULES = CopyRules()


def copy_rules(link_model: Any, nbytes: int) -> CopyRules:
    """The copy rules of a transfer model (a runtime's ``RuntimeLink``; none for a plain
    hardware link), for copies of ``nbytes`` (one expert)."""
    swap = bool(getattr(link_model, "swap", False))
    stream = bool(getattr(link_model, "compute_stream", False))
    host_s = float(getattr(link_model, "host_s", 0.0))
    window = int(getattr(link_model, "window", 0)) if stream else 0
    sync = bool(getattr(link_model, "sync", False)) and window > 0
    own = getattr(link_model, "prefetch_stream", "compute") == "own" and window > 0
    if not swap and not stream and not host_s:
        return NO_RULES
    swap_s = float(link_model.swap_time(nbytes)) if swap else 0.0
    return CopyRules(swap, swap_s, stream, swap and bool(getattr(link_model, "swap_always",
                                                                 False)), host_s, window,
                     sync, own_prefetch=own)


def host_time(comp: Any, part: str, n: int) -> float:
    """The host-side share of a compute time (``RuntimeCompute.<part>_host``: ``attention``,
    ``dense_layer``, ``expert``, ``shared``), during which the compute stream is idle; 0 for a
    plain roofline, which is all GPU kernel time."""
    fn = getattr(comp, f"{part}_host", None)
    return float(fn(n)) if fn is not None else 0.0


def wait_for_gate(gate: float, now: float, tau: float, late: bool, st_miss: float,
                  st_late: float) -> tuple[float, float, float, float]:
    """A kernel (or, with ``copy.sync``, a host part) that cannot start before ``gate`` (link
    time): (wall, link time, miss stall, late stall) after waiting for it, the wait counted
    as stall on prefetches (``late``) or on demand copies. Plain arithmetic, so that the
    SimPy engine calls it and the compiled kernel compiles this same function."""
    if gate > tau:
        if late:
            st_late += gate - tau
        else:
            st_miss += gate - tau
        now += gate - tau
        tau = gate
    return now, tau, st_miss, st_late


class PrefetchQueue:
    """Queued prefetches: lowest priority first, then submission order (``seq``); a withdrawn
    or cancelled entry stays in the heap and is skipped when it surfaces. One rule for the
    simulator's link and the executor's copy workers, so both order and cancel alike."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []  # (priority, seq, key)
        self._live: dict[int, int] = {}  # key -> seq of its live entry

    def __contains__(self, key: int) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def push(self, key: int, priority: float, seq: int) -> None:
        self._live[key] = seq
        heapq.heappush(self._heap, (priority, seq, key))

    def withdraw(self, key: int) -> bool:
        """Drop ``key``'s entry (cancel, or before promoting it to demand)."""
        return self._live.pop(key, None) is not None

    def clear(self) -> None:
        self._live.clear()
        self._heap.clear()

    def cancel(self, keys: Iterable[int] | None = None) -> int:
        """Drop the entries of ``keys`` (all if None); returns how many were live."""
        if keys is not None:
            return sum(self.withdraw(k) for k in keys)
        n = len(self._live)
        self.clear()
        return n

    def pop(self) -> int:
        """The next live key (the caller checks ``len`` first)."""
        while True:
            _, seq, key = heapq.heappop(self._heap)
            if self._live.get(key) == seq:
                del self._live[key]
                return key


class HostLink:
    """Copy engines plus the two queues; times in seconds.

    Demand fetches are scheduled onto the engines as soon as they are issued: nothing can
    overtake them (they have top priority, FIFO, and the GPU issues no new demand before they
    arrive), so their start is the earliest time an engine is free. Prefetches start lazily,
    in time order with completions, whenever an engine is free and no demand is waiting.
    """

    def __init__(
        self,
        duration: float,
        engines: int,
        cache: ExpertCache,
        on_done: Callable[[int, bool], None] | None = None,
        record: bool = False,
        rules: CopyRules = NO_RULES,
    ) -> None:
        if engines < 1:
            raise SimulationError(f"copy_engines must be >= 1, got {engines}")
        if duration < 0:
            raise SimulationError(f"transfer time must be >= 0, got {duration}")
        self.duration = duration
        self.engines = engines
        self.cache = cache
        self.on_done = on_done
        self.t = 0.0
        self._free = [0.0] * engines  # when each engine finishes its last scheduled copy
        self._queued = PrefetchQueue()
        # (finish, seq, key, kind, start) of every scheduled copy not yet completed
        self._running: list[tuple[float, int, int, int, float]] = []
        self._finish: dict[int, float] = {}
        self._seq = 0
        self.started = [0, 0]  # per kind, counted steps only
        # prefetch copies started (counted or not) that the engine has not yet charged
        # ``copy.host_s`` for (``Simulation._issue_time`` takes and zeroes it at routing)
        self.uncharged_prefetches = 0
        self.dropped = 0
        self.cancelled = 0
        self.busy = 0.0
        self.rules = rules
        self.swaps = 0  # copies back of evicted experts (counted steps only)
        self.swap_time = 0.0  # their seconds
        self.records: list[tuple[int, int, float, float]] | None = [] if record else None

    @property
    def counting(self) -> bool:
        """Whether transfers starting now count (the cache's flag, so a prefetch's cache slot
        and its transfer are always attributed alike)."""
        return self.cache.counting

    @counting.setter
    def counting(self, value: bool) -> None:
        self.cache.counting = value

    # -- queries -------------------------------------------------------------------------
    def is_queued(self, key: int) -> bool:
        return key in self._queued

    def is_running(self, key: int) -> bool:
        return key in self._finish

    @property
    def queued_prefetches(self) -> int:
        return len(self._queued)

    # -- submissions (the caller has advanced the link to the current time) --------------
    def submit_demand(self, key: int, evicted: bool = False,
                      not_before: float | None = None) -> float:
        """Schedule a demand fetch (its slot is already reserved; ``evicted``: reserving it
        evicted a resident expert), no earlier than ``not_before`` (default now: a copy the
        runtime hands to the compute stream later, ``CopyRules.window``); returns its
        arrival."""
        free = self._free
        e = free.index(min(free)) if self.engines > 1 else 0
        at = self.t if not_before is None or not_before < self.t else not_before
        start = free[e] if free[e] > at else at
        duration = self.duration
        if self.rules.swap and (evicted or self.rules.always):
            duration = self._swap(duration)
        finish = start + duration
        free[e] = finish
        self._seq += 1
        heapq.heappush(self._running, (finish, self._seq, key, DEMAND, start))
        self._finish[key] = finish
        self.busy += duration
        if self.counting:
            self.started[DEMAND] += 1
        return finish

    def _swap(self, duration: float) -> float:
        """The copy back of an evicted expert (``CopyRules``): counted, and the load's time."""
        if self.counting:
            self.swaps += 1
            self.swap_time += self.rules.swap_s
        return self.rules.load_time(duration, True)

    def submit_copy(self, duration: float, kind: int, not_before: float | None = None) -> float:
        """Book a copy that serves no cache slot (``ACTIVATION`` or ``LOW_PRECISION``) at
        demand priority on the engine where it starts first, no earlier than ``not_before``
        (default now); returns its arrival. A copy booked for a later start keeps its engine
        from prefetches until then (it is booked when the GPU learns of it, at routing)."""
        free = self._free
        e, start = self._copy_slot(not_before)
        finish = start + duration
        free[e] = finish
        self._seq += 1
        heapq.heappush(self._running, (finish, self._seq, -1, kind, start))
        self.busy += duration
        return finish

    def copy_start(self, not_before: float | None = None) -> float:
        """When a :meth:`submit_copy` booked now, no earlier than ``not_before``, would
        start (placement costs: a CPU expert's output waits behind the booked copies)."""
        return self._copy_slot(not_before)[1]

    def _copy_slot(self, not_before: float | None) -> tuple[int, float]:
        free = self._free
        at = self.t if not_before is None or not_before < self.t else not_before
        e = 0
        if self.engines > 1:
            e = min(range(self.engines), key=lambda i: free[i] if free[i] > at else at)
        return e, free[e] if free[e] > at else at

    def submit_prefetch(self, key: int, priority: float) -> bool:
        if key in self._queued or key in self._finish or self.cache.state[key] != ABSENT:
            return False
        self._seq += 1
        self._queued.push(key, priority, self._seq)
        return True

    def withdraw(self, key: int) -> bool:
        """Remove a queued prefetch (cancel, or before promoting it to demand)."""
        return self._queued.withdraw(key)

    def cancel(self, keys: Iterable[int] | None = None) -> int:
        n = self._queued.cancel(keys)
        self.cancelled += n
        return n

    def reset(self, cache: ExpertCache) -> None:
        """Serve a fresh cache: queued prefetches are dropped, and copies still on the engines
        keep them busy but no longer land anywhere (the new cache inherits the counting flag)."""
        cache.counting = self.cache.counting
        self.cache = cache
        self._queued.clear()
        self._running.clear()
        self._finish.clear()

    # -- time -----------------------------------------------------------------------------
    def advance(self, until: float) -> None:
        """Process completions and prefetch starts up to ``until`` in time order."""
        running = self._running
        while True:
            done = running[0][0] if running else INF
            start = INF
            if self._queued:
                start = min(self._free)
                if start < self.t:
                    start = self.t
            if done <= start:  # a completion frees its engine before a start can use it
                if done > until:
                    break
                _, _, key, kind, began = heapq.heappop(running)
                self.t = done
                if key < 0:  # activations or a low-precision copy: no cache slot
                    if self.records is not None:
                        self.records.append((key, kind, began, done))
                    continue
                del self._finish[key]
                self.cache.complete(key)
                if self.records is not None:
                    self.records.append((key, kind, began, done))
                if self.on_done is not None:
                    self.on_done(key, kind == PREFETCH)
            else:
                if start > until:
                    break
                self.t = start
                self._start_prefetch()
        if until > self.t:
            self.t = until

    def _start_prefetch(self) -> None:
        key = self._queued.pop()
        swap = self.rules.swap
        evictions = self.cache.evictions if swap else 0
        if not self.cache.reserve(key, prefetch=True):
            self.dropped += 1
            return
        duration = self.duration
        if swap and (self.rules.always or self.cache.evictions != evictions):
            duration = self._swap(duration)
        free = self._free
        e = free.index(min(free))
        finish = self.t + duration
        free[e] = finish
        self._seq += 1
        heapq.heappush(self._running, (finish, self._seq, key, PREFETCH, self.t))
        self._finish[key] = finish
        self.busy += duration
        self.uncharged_prefetches += 1
        if self.counting:
            self.started[PREFETCH] += 1

    def ready_times(self, keys: Iterable[int]) -> list[float]:
        """Arrival times of keys in flight (the GPU waits on these)."""
        out = []
        finish = self._finish
        for key in keys:
            if key in finish:
                out.append(finish[key])
            elif self.cache.state[key] == RESIDENT:  # arrived already (zero-time copies)
                out.append(self.t)
            else:
                raise SimulationError(f"expert key {key} is neither in flight nor resident")
        return out

    def records_until(self, end: float) -> list[tuple[int, int, float, float]]:
        """Every recorded copy finished by ``end``: those the last advance applied, then the
        ones that finished since without an advance (the run's last layer waits for its copies
        but nothing advances the link after it), by finish time; none unless recording."""
        if self.records is None:
            return []
        late = sorted((f, seq, key, kind, s) for f, seq, key, kind, s in self._running
                      if f <= end)
        return [*self.records, *((key, kind, s, f) for f, _, key, kind, s in late)]

    def busy_until(self, end: float) -> float:
        """Busy time up to ``end`` (transfers still running past ``end`` are clipped)."""
        return self.busy - sum(max(f - max(s, end), 0.0) for f, _, _, _, s in self._running)
