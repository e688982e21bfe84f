"""``copy.host_s`` for prefetch copies: every prefetch copy that starts on the link costs the
compute thread ``host_s``, charged with the issue time at the next layer's routing
(``Simulation._issue_time``: ``HostLink.uncharged_prefetches`` taken there; the compiled
kernel mirrors it with ``I_PF_HOST``). A queued prefetch cancelled, promoted or dropped before
it starts costs nothing (a promoted one is charged once, as a demand copy).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from moesim.hw_profiles.runtime import RuntimeCompute, RuntimeLink
from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.link import HostLink
from tests.sim.test_compiled_engine import equal_on_both_engines
from tests.sim.test_copy_stream import ENGINES, _run, _trace
from tests.sim.test_link_reference import _Cache

H_C = 7e-5  # copy.host_s
PRE = {"name": "oracle_prefetch", "eviction": "lru", "point": "pre_attention", "lookahead": 0}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stream", ["compute", "own"])
def test_each_started_prefetch_costs_one_host_s(engine: str, stream: str) -> None:
    """Six tokens, each prefetching its own expert before attention, copies taking no link
    time: all six are hits on started prefetches and no demand copy is issued, so the run
    takes exactly 6 x host_s longer (charged at each routing), and nothing else moves."""
    tr = _trace([0, 1, 2, 3, 0, 1])
    base = _run(tr, PRE, stream, engine, copy_s=0.0)
    paid = _run(tr, PRE, stream, engine, copy_s=0.0, host_s=H_C)
    assert paid["demand_fetches"] == base["demand_fetches"] == 0
    assert paid["prefetch_transfers"] == base["prefetch_transfers"] == 6
    assert paid["hits"] == 6
    assert paid["total_time_s"] - base["total_time_s"] == pytest.approx(6 * H_C, rel=1e-9)
    assert paid["stall_time_s"] == base["stall_time_s"] == 0.0


def test_only_prefetches_that_start_are_charged() -> None:
    """The link's own count: a prefetch queued behind a demand copy and cancelled before the
    engine frees is never charged; one withdrawn (promoted to demand) neither; one that
    starts is charged once, and taking the count zeroes it."""
    cache = _Cache(8)
    link = HostLink(1.0, 1, cache)
    cache.reserve(0, False)
    link.submit_demand(0)  # the only engine busy until t = 1
    link.submit_prefetch(1, 0.0)
    link.submit_prefetch(2, 1.0)
    link.submit_prefetch(3, 2.0)
    link.advance(0.5)
    assert link.uncharged_prefetches == 0  # queued, not started
    link.cancel([1])
    assert link.withdraw(2)  # promoted: a demand copy now
    link.advance(1.5)  # the engine frees at 1: only 3 starts
    assert link.uncharged_prefetches == 1
    assert link.cancelled == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_demand_and_prefetch_copies_are_each_charged_once(engine: str) -> None:
    """Prefetching the next token's expert when the demand is issued (zero-time copies): the
    one miss is a demand copy, the five prefetches start at once on the idle engine, right
    after the demand (as the executor's ``copier.dispatch()`` after ``on_demand_issued``) and
    before the routing's charge, so the run takes exactly (1 + 5) x host_s longer."""
    tr = _trace([0, 1, 0, 2, 3, 3, 1, 0])
    pol = {"name": "oracle_prefetch", "eviction": "lru", "point": "demand_issued",
           "lookahead": 1}
    base = _run(tr, pol, "own", engine, copy_s=0.0)
    paid = _run(tr, pol, "own", engine, copy_s=0.0, host_s=H_C)
    assert paid["demand_fetches"] == 1 and paid["prefetch_transfers"] == 5
    assert paid["prefetch_cancelled"] == paid["prefetch_dropped"] == 0
    assert paid["total_time_s"] - base["total_time_s"] == pytest.approx(6 * H_C, rel=1e-9)


@pytest.mark.parametrize("policy", [PRE, {"name": "oracle_prefetch", "eviction": "lru",
                                          "point": "demand_issued", "lookahead": 1},
                                    {"name": "next_layer_all", "eviction": "lru"}])
@pytest.mark.parametrize("stream", ["compute", "own"])
def test_engines_equal_with_prefetches_and_host_s(policy: Any, stream: str) -> None:
    """SimPy == compiled with prefetches and host_s > 0 (real copy times, so prefetches queue
    and start during layers); host_s = 0 leaves the run exactly as it was."""
    from tests.helpers import random_trace

    tr = random_trace(num_requests=3, tokens=6, layers=3, experts=8, top_k=2, seed=11,
                      expert_bytes=2_000_000)

    def kw(host_s: float) -> dict[str, Any]:
        link = RuntimeLink(FixedLink(5e-5, math.inf), 1, 1e-5, 1.0, False, 1.0, stream,
                           False, host_s)
        comp = RuntimeCompute(FixedCompute(attention_s=2e-5, router_s=1e-6, expert_s=3e-5),
                              3, layer_s=1e-5, expert_s=2e-6)
        return dict(capacity=12, link=link, compute=comp)

    ref = equal_on_both_engines(tr, policy, kw(2e-5))
    assert ref is not None and ref.summary["prefetch_transfers"] > 0
    zero = simulate(tr, policy, **kw(0.0)).summary
    # the charge is paid: longer, or overlapping a wait it shortens (the compute stream)
    assert ref.summary["total_time_s"] >= zero["total_time_s"]
    assert (ref.summary["total_time_s"], ref.summary["stall_time_s"]) != (
        zero["total_time_s"], zero["stall_time_s"])
    plain_link = RuntimeLink(FixedLink(5e-5, math.inf), 1, 1e-5, 1.0, False, 1.0, stream)
    plain = simulate(tr, policy, **{**kw(0.0), "link": plain_link}).summary
    assert {k: v for k, v in zero.items() if k != "sim_engine"} == {
        k: v for k, v in plain.items() if k != "sim_engine"}
