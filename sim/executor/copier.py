"""Copy workers: ``copy_engines`` threads moving experts into their slots.

The rules are the simulator's host link (``sim.link.HostLink``): demand copies go first, in
issue order; queued prefetches follow by priority, then submission order; a prefetch takes its
cache slot when its copy starts and is dropped if no slot can be freed then; a queued prefetch
can be cancelled or withdrawn (promoted to demand); a copy that started is never preempted.

Threads only move bytes. Everything that touches the cache or a policy (reserving a prefetch's
slot, marking a copy complete, ``on_transfer_done``) runs on the main thread in :meth:`drain`
and :meth:`dispatch`, so policies stay single-threaded as under SimPy. Workers take jobs from
one FIFO that the main thread fills with demand copies at once and with prefetches only while
an engine is idle and no demand waits, which is "demand before prefetch, no preemption". The
price: an engine that frees while the main thread computes starts its next prefetch only when
the main thread next drains (between two experts), which the run reports as dispatch delay.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from moesim.sim.cache import ABSENT, ExpertCache, SimulationError
from moesim.sim.link import DEMAND, PREFETCH, PrefetchQueue

LoadFn = Callable[[int, int, int], None]  # (key, slot, engine index) -> bytes are in the slot


@dataclass(frozen=True)
class Completion:
    """One finished copy, as a worker reports it (times in seconds of the run clock)."""

    key: int
    kind: int
    slot: int
    start: float
    end: float
    error: BaseException | None = None


class Copier:
    """Queues and workers. All public methods are for the main thread only."""

    def __init__(
        self,
        load: LoadFn,
        engines: int,
        cache: ExpertCache,
        slot_of: Callable[[int], int],
        now: Callable[[], float],
        on_done: Callable[[int, bool], None] | None = None,
        record: bool = False,
    ) -> None:
        if engines < 1:
            raise SimulationError(f"copy_engines must be >= 1, got {engines}")
        self.engines = engines
        self.cache = cache
        self._load = load
        self._slot_of = slot_of
        self._now = now
        self.on_done = on_done
        # The workers' FIFO; submissions of one moment go in as one batch with one wake-up
        # (a runtime issues a layer's missing experts together: one thread hand-off per
        # batch instead of one per expert, which costs ~0.1 ms each on a loaded machine).
        self._jobs: deque[tuple[int, int, int] | None] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[tuple[int, int, int] | None] = []
        self._done: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._queued = PrefetchQueue()
        self._inflight: dict[int, int] = {}  # key -> kind, from dispatch until drained
        self._seq = 0
        self._arrivals = 0
        self.arrival: dict[int, int] = {}  # key -> order in which its copy was drained
        self.finished_at: dict[int, float] = {}  # key -> when its worker finished the copy
        self.counting = True
        self.started = [0, 0]  # per kind, counted steps only
        self.dropped = 0
        self.cancelled = 0
        self.busy = 0.0
        self.records: list[tuple[int, int, float, float]] | None = [] if record else None
        self._threads = [
            threading.Thread(target=self._worker, args=(e,), name=f"moesim-copy-{e}",
                             daemon=True)
            for e in range(engines)
        ]
        for t in self._threads:
            t.start()

    # -- the workers ------------------------------------------------------------------------
    def _worker(self, engine: int) -> None:
        jobs, cond = self._jobs, self._cond
        while True:
            with cond:
                while not jobs:
                    cond.wait()
                job = jobs.popleft()
            if job is None:
                return
            key, slot, kind = job
            t0 = self._now()
            try:
                self._load(key, slot, engine)
            except BaseException as exc:  # reported on the main thread, which raises it
                self._done.put(Completion(key, kind, slot, t0, self._now(), exc))
                continue
            self._done.put(Completion(key, kind, slot, t0, self._now()))

    def close(self) -> None:
        """Stop the workers (after the copies they already took)."""
        self._pending.extend([None] * len(self._threads))
        self.flush()
        for t in self._threads:
            t.join()

    def flush(self) -> None:
        """Hand the submitted copies to the workers (one lock, one wake-up per batch)."""
        if self._pending:
            batch, self._pending = self._pending, []
            with self._cond:
                self._jobs.extend(batch)
                self._cond.notify(len(batch))

    # -- queries ----------------------------------------------------------------------------
    def is_queued(self, key: int) -> bool:
        return key in self._queued

    def is_running(self, key: int) -> bool:
        """Dispatched to the workers and not yet drained."""
        return key in self._inflight

    @property
    def queued_prefetches(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- submissions --------------------------------------------------------------------------
    def submit_demand(self, key: int, evicted: bool = False) -> None:
        """Start a demand copy (at the next ``flush``/``dispatch``, which the caller makes right
        after issuing the layer's demand); its slot is already reserved in the cache.
        ``evicted`` (the reservation evicted a resident expert: the simulator's link copies it
        back under a swapping runtime) changes nothing here: both backends keep every expert's
        host copy, so an evicted slot is simply overwritten."""
        if key in self._inflight:
            raise SimulationError(f"expert key {key} is already being copied")
        self._inflight[key] = DEMAND
        self._seq += 1  # the simulator's link numbers every copy, so default priorities match
        self._pending.append((key, self._slot_of(key), DEMAND))
        if self.counting:
            self.started[DEMAND] += 1

    def submit_prefetch(self, key: int, priority: float | None = None) -> bool:
        """Queue a prefetch of an absent key (default priority: submission order)."""
        if key in self._queued or key in self._inflight or self.cache.state[key] != ABSENT:
            return False
        prio = float(self._seq) if priority is None else float(priority)
        self._seq += 1
        self._queued.push(key, prio, self._seq)
        return True

    def default_priority(self) -> float:
        """The priority a prefetch request without one gets: the submission counter, as the
        simulator's link gives it, so explicit and default priorities interleave alike."""
        return float(self._seq)

    def withdraw(self, key: int) -> bool:
        """Remove a queued prefetch (before promoting it to demand)."""
        return self._queued.withdraw(key)

    def cancel(self, keys: Iterable[int] | None = None) -> int:
        n = self._queued.cancel(keys)
        self.cancelled += n
        return n

    def discard_queued(self) -> None:
        """Drop queued prefetches at the end of a run without counting them as cancelled (the
        simulator's link simply never starts them)."""
        self._queued.clear()

    def dispatch(self) -> int:
        """Start queued prefetches while an engine is idle and no demand waits (demand
        copies submitted since the last flush go first)."""
        n = 0
        while self._queued and len(self._inflight) < self.engines:
            key = self._queued.pop()
            if not self.cache.reserve(key, prefetch=True):
                self.dropped += 1
                continue
            self._inflight[key] = PREFETCH
            self._seq += 1
            self._pending.append((key, self._slot_of(key), PREFETCH))
            if self.counting:
                self.started[PREFETCH] += 1
            n += 1
        self.flush()
        return n

    # -- completions --------------------------------------------------------------------------
    def drain(self, timeout: float | None = 0.0) -> int:
        """Apply finished copies (waiting up to ``timeout`` s for the first one; None: until
        one arrives), then start prefetches on idle engines. Returns copies applied."""
        self.flush()
        done = self._done
        n = 0
        try:
            if timeout is None:
                item = done.get()
            elif timeout > 0:
                item = done.get(timeout=timeout)
            else:
                item = done.get_nowait()
            while True:
                self._apply(item)
                n += 1
                item = done.get_nowait()
        except queue.Empty:
            pass
        self.dispatch()
        return n

    def _apply(self, c: Completion) -> None:
        if c.error is not None:
            raise SimulationError(f"copy of expert key {c.key} failed: {c.error}") from c.error
        kind = self._inflight.pop(c.key)
        self.cache.complete(c.key)
        self._arrivals += 1
        self.arrival[c.key] = self._arrivals
        self.finished_at[c.key] = c.end
        self.busy += c.end - c.start
        if self.records is not None:
            self.records.append((c.key, kind, c.start, c.end))
        if self.on_done is not None:
            self.on_done(c.key, kind == PREFETCH)

    def wait_idle(self, limit_s: float = 60.0) -> None:
        """Drain until no copy is in flight (queued prefetches stay queued)."""
        deadline = time.perf_counter() + limit_s
        while self._inflight:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise SimulationError("copies did not finish in time")
            self.drain(timeout=min(left, 1.0))

    @property
    def copies(self) -> int:
        """Copies finished and drained (warm-up steps included, as ``busy``)."""
        return self._arrivals

    def busy_until(self, end: float) -> float:
        """Busy time of all finished copies (the metrics' link interface)."""
        return self.busy
