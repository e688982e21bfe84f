"""Copy workers: demand before prefetch, no preemption, copy_engines in parallel, cancel."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from moesim.policies.base import ModelShape, PolicySetup
from moesim.policies.lru import LRU
from moesim.sim.cache import LOADING, RESIDENT, ExpertCache, SimulationError
from moesim.sim.executor.clock import WallClock
from moesim.sim.executor.copier import DEMAND, PREFETCH, Copier


class GatedLoad:
    """A load function that blocks each copy until the test opens its gate."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.gates: dict[int, threading.Event] = {}
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()
        self.cond = threading.Condition(self._lock)

    def gate(self, key: int) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(key, threading.Event())

    def __call__(self, key: int, slot: int, engine: int) -> None:
        with self.cond:
            self.started.append(key)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.cond.notify_all()
        self.gate(key).wait(5)
        with self.cond:
            self.running -= 1

    def wait_started(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.started) >= n, timeout=5), self.started


def _copier(load: GatedLoad, engines: int = 1, capacity: int = 8,
            done: list | None = None) -> tuple[Copier, ExpertCache]:
    shape = ModelShape(2, 8, 2, 100)
    ev = LRU(PolicySetup(shape, capacity, WallClock(), np.random.default_rng(0)))
    cache = ExpertCache(8, [0, 0], [capacity], [ev])
    cb = None if done is None else (lambda k, p: done.append((k, p)))
    return Copier(load, engines, cache, lambda k: k, time.perf_counter, on_done=cb,
                  record=True), cache


def _finish(copier: Copier, load: GatedLoad, key: int) -> None:
    load.gate(key).set()
    deadline = time.perf_counter() + 5
    while copier.is_running(key):
        assert time.perf_counter() < deadline
        copier.drain(0.5)


def test_demand_goes_before_queued_prefetches_and_never_preempts() -> None:
    load = GatedLoad()
    done: list = []
    copier, cache = _copier(load, done=done)
    try:
        assert copier.submit_prefetch(1) and copier.submit_prefetch(2)
        copier.dispatch()  # the one engine takes prefetch 1; 2 stays queued
        load.wait_started(1)
        assert cache.state[1] == LOADING and copier.is_queued(2)
        cache.reserve(5, prefetch=False)
        copier.submit_demand(5)  # waits for prefetch 1 (no preemption), then beats prefetch 2
        time.sleep(0.05)
        assert load.started == [1]
        _finish(copier, load, 1)
        load.wait_started(2)
        assert load.started == [1, 5]
        _finish(copier, load, 5)
        load.wait_started(3)
        _finish(copier, load, 2)
        assert load.started == [1, 5, 2]
        assert done == [(1, True), (5, False), (2, True)]
        assert [r[1] for r in copier.records] == [PREFETCH, DEMAND, PREFETCH]
        assert all(cache.state[k] == RESIDENT for k in (1, 2, 5))
        assert copier.started == [1, 2]
    finally:
        for g in load.gates.values():
            g.set()
        copier.close()


def test_prefetch_priority_then_submission_order() -> None:
    load = GatedLoad()
    copier, _ = _copier(load)
    try:
        copier.submit_prefetch(3, priority=5.0)
        copier.submit_prefetch(4, priority=1.0)
        copier.submit_prefetch(6, priority=1.0)
        copier.dispatch()
        load.wait_started(1)
        for key in (4, 6, 3):
            assert load.started[-1] == key
            _finish(copier, load, key)
            if key != 3:
                load.wait_started(len(load.started) + 1)
        assert load.started == [4, 6, 3]
    finally:
        for g in load.gates.values():
            g.set()
        copier.close()


def test_copy_engines_run_in_parallel() -> None:
    load = GatedLoad()
    copier, _ = _copier(load, engines=2)
    try:
        for k in (1, 2, 3):
            copier.submit_prefetch(k)
        copier.dispatch()
        load.wait_started(2)
        time.sleep(0.05)
        assert load.max_running == 2 and sorted(load.started) == [1, 2]
        assert copier.is_queued(3)  # no third engine
        _finish(copier, load, 1)
        load.wait_started(3)
        for k in (2, 3):
            _finish(copier, load, k)
        assert load.max_running == 2
    finally:
        for g in load.gates.values():
            g.set()
        copier.close()


def test_cancel_drops_queued_prefetches_only() -> None:
    load = GatedLoad()
    copier, cache = _copier(load)
    try:
        for k in (1, 2, 3, 4):
            copier.submit_prefetch(k)
        copier.dispatch()
        load.wait_started(1)
        assert copier.cancel([2, 7]) == 1
        assert not copier.is_queued(2) and copier.is_queued(3)
        assert copier.cancel() == 2  # 3 and 4; the running copy of 1 goes on
        assert copier.is_running(1) and copier.queued_prefetches == 0
        _finish(copier, load, 1)
        copier.dispatch()
        time.sleep(0.05)
        assert load.started == [1] and copier.cancelled == 3
        assert cache.state[1] == RESIDENT
    finally:
        for g in load.gates.values():
            g.set()
        copier.close()


def test_withdrawn_prefetch_is_not_started_and_resident_keys_are_not_queued() -> None:
    load = GatedLoad()
    copier, cache = _copier(load)
    try:
        cache.install(2)
        assert not copier.submit_prefetch(2)
        copier.submit_prefetch(3)
        assert copier.withdraw(3) and not copier.withdraw(3)
        assert copier.dispatch() == 0 and load.started == []
    finally:
        copier.close()


def test_prefetch_dropped_when_no_slot_can_be_freed() -> None:
    load = GatedLoad()
    copier, cache = _copier(load, engines=2, capacity=1)
    try:
        cache.reserve(0, prefetch=False)
        copier.submit_demand(0)  # holds the only slot, in flight
        copier.submit_prefetch(1)
        copier.dispatch()
        assert copier.dropped == 1 and not copier.is_queued(1)
        _finish(copier, load, 0)
    finally:
        for g in load.gates.values():
            g.set()
        copier.close()


def test_a_failed_copy_is_raised_on_the_main_thread() -> None:
    def broken(key: int, slot: int, engine: int) -> None:
        raise OSError("disk gone")

    shape = ModelShape(1, 4, 1, 100)
    ev = LRU(PolicySetup(shape, 4, WallClock(), np.random.default_rng(0)))
    cache = ExpertCache(4, [0], [4], [ev])
    copier = Copier(broken, 1, cache, lambda k: k, time.perf_counter)
    try:
        cache.reserve(1, prefetch=False)
        copier.submit_demand(1)
        with pytest.raises(SimulationError, match="disk gone"):
            copier.drain(5.0)
    finally:
        copier.close()
