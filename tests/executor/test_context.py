"""The wall-clock clock and prefetch context against the policy interface.

One probe policy, unknown to both drivers, checks every ``PrefetchContext`` promise at each
hook; it runs under the simulator and the executor and must see the same hook sequence."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from moesim.policies.base import Knowledge, PolicyError, PrefetchPolicy
from moesim.policies.lru import LRU
from moesim.policies.registry import PolicySpec
from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.cache import SimulationError
from moesim.sim.executor import ExecutorOptions, execute
from moesim.sim.executor.clock import WallClock
from tests.executor.conftest import card_trace, small_card


def test_wall_clock_ticks_forward_from_start() -> None:
    clock = WallClock()
    assert clock.now == 0.0 and clock.elapsed() == 0.0
    clock.start()
    a = clock.tick()
    time.sleep(0.01)
    b = clock.tick()
    assert 0 <= a < b and b >= 0.009 and clock.now == b
    assert clock.elapsed() >= b


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


class Probe(PrefetchPolicy):
    """Exercises the context; records the hook sequence and what it saw."""

    name = "probe"
    knows = Knowledge.ORACLE

    def __init__(self, setup) -> None:
        super().__init__(setup)
        self.log: list[tuple] = []
        self.fired: list[tuple[float, float, bool]] = []
        self.last_now = -1.0
        self.done: list[tuple[int, bool]] = []

    def _seen(self, ctx, *what) -> None:
        now = ctx.clock.now
        if now < self.last_now:
            raise PolicyError("clock went backwards")
        self.last_now = now
        self.log.append(what)

    def on_start(self, ctx) -> None:
        assert ctx.install([0, 1]) == 2
        assert ctx.is_resident(0) and not ctx.is_loading(0)
        self._seen(ctx, "start")

    def on_request_start(self, ctx, request_id) -> None:
        if ctx.clock.step:
            try:
                ctx.install([5])
            except SimulationError:
                pass
            else:
                raise PolicyError("install allowed after the first step")
        assert request_id in ctx.request_ids
        self._seen(ctx, "join", request_id)

    def on_pre_attention(self, ctx, layer) -> None:
        assert ctx.clock.layer == layer
        keys = self.setup.future.keys_at(ctx.clock.step, layer)
        n = ctx.prefetch(keys)
        absent = [k for k in keys if not ctx.is_resident(k)]
        assert all(ctx.is_loading(k) for k in absent) and n <= len(absent)
        # A second, lower-priority request for the next layer, half of it cancelled.
        nxt = self.setup.future.keys_at(ctx.clock.step, layer + 1) if (
            layer + 1 < ctx.shape.num_layers) else []
        ctx.prefetch(nxt, priority=1e9)
        ctx.cancel_prefetches(nxt[::2])
        due = ctx.clock.now + 1e-4
        ctx.after(1e-4, lambda due=due: self.fired.append((due, ctx.clock.now, _main())))
        self._seen(ctx, "pre", ctx.clock.step, layer)

    def on_routed(self, ctx, layer, keys) -> None:
        self._seen(ctx, "routed", ctx.clock.step, layer, tuple(keys))

    def on_demand_issued(self, ctx, layer, keys) -> None:
        assert all(ctx.is_resident(k) or ctx.is_loading(k) for k in keys)
        self._seen(ctx, "issued", ctx.clock.step, layer)

    def on_layer_end(self, ctx, layer) -> None:
        self._seen(ctx, "end", ctx.clock.step, layer)

    def on_step_end(self, ctx) -> None:
        self._seen(ctx, "step", ctx.clock.step)

    def on_transfer_done(self, ctx, key, prefetch) -> None:
        self.done.append((key, prefetch))
        if not _main():
            raise PolicyError("a policy was called off the main thread")


def _spec() -> PolicySpec:
    return PolicySpec("probe", LRU, Probe)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[Probe]:
    made: list[Probe] = []
    orig = Probe.__init__

    def init(self, setup) -> None:
        orig(self, setup)
        made.append(self)

    monkeypatch.setattr(Probe, "__init__", init)
    return made


def test_probe_sees_the_same_hooks_under_both_drivers(work_dir: Path,
                                                      probes: list[Probe]) -> None:
    card = small_card()
    trace = card_trace(card, seed=2)
    real = execute(trace, _spec(), card, capacity=12,
                   options=ExecutorOptions(work_dir=str(work_dir)))
    sim = simulate(trace, _spec(), capacity=12, link=FixedLink(1e-4, 1e9, 1),
                   compute=FixedCompute(1e-4, 0, 1e-5))
    assert real.summary["accesses"] == sim.summary["accesses"]
    p_real, p_sim = probes[0], probes[1]
    assert p_real.log == p_sim.log
    assert len(p_real.log) > 4 * card.num_moe_layers
    # Timers fire, not before they are due, on the main thread.
    assert p_real.fired and all(at >= due - 1e-9 and main for due, at, main in p_real.fired)
    assert p_real.done and {k for k, _ in p_real.done} <= set(range(card.routed_experts_total))
    assert any(p for _, p in p_real.done) and p_real.last_now > 0
    assert real.summary["prefetch_cancelled"] > 0
