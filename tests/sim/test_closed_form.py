"""Timings computed by hand for schedules small enough to reason about."""

import math

import pytest

from moesim.sim import FixedCompute, FixedLink, simulate
from tests.helpers import trace_from_lists

D = 1e-3  # one expert's transfer
A = 5e-4  # attention + router
C = 2e-4  # one expert's FFN


def _all_miss_trace(tokens: int, k: int) -> object:
    # One layer; every token uses k experts never seen before.
    routing = [[[list(range(t * k, (t + 1) * k))] for t in range(tokens)]]
    return trace_from_lists(routing, experts=tokens * k)


@pytest.mark.parametrize("engines", [1, 2, 4])
def test_all_miss_schedule(engines: int) -> None:
    tokens, k = 5, 4
    res = simulate(
        _all_miss_trace(tokens, k), "lru", capacity=k + engines, mode="timed",
        link=FixedLink(0.0, 1000 / D, engines), compute=FixedCompute(attention_s=A, expert_s=C),
    )
    s = res.summary
    assert s["misses"] == tokens * k and s["hits"] == 0
    # Copies go out in waves of `engines`; expert i arrives at (i // engines + 1) * D.
    # Experts compute in arrival order, one at a time, each taking C < D.
    now = 0.0
    stall = 0.0
    for i in range(k):
        ready = (i // engines + 1) * D
        if ready > now:
            stall += ready - now
            now = ready
        now += C
    assert s["stall_time_s"] == pytest.approx(tokens * stall)
    assert s["total_time_s"] == pytest.approx(tokens * (A + now))
    assert s["time_per_output_token_s"] == pytest.approx(A + now)
    assert s["demand_bytes"] == tokens * k * 1000
    busy = tokens * k * D
    assert s["pcie_busy_fraction"] == pytest.approx(busy / (engines * s["total_time_s"]))


def test_all_hit_after_warm_cache_has_no_stall() -> None:
    # Same 2 experts every token: 2 compulsory misses, then hits only.
    routing = [[[[0, 1]] for _ in range(6)]]
    res = simulate(
        trace_from_lists(routing, experts=4), "lru", capacity=3, mode="timed",
        link=FixedLink(0.0, 1000 / D, 1), compute=FixedCompute(attention_s=A, expert_s=C),
    )
    s = res.summary
    assert (s["hits"], s["misses"]) == (10, 2)
    # First token: experts arrive at D and 2D; compute C each.
    first = A + 2 * D + C
    assert s["stall_time_s"] == pytest.approx(2 * D - C)
    assert s["total_time_s"] == pytest.approx(first + 5 * (A + 2 * C))


def test_prefetch_hidden_behind_attention() -> None:
    # Oracle prefetch at the pre-attention point of the same layer: the copy (D) overlaps the
    # attention (A); with A >= D it is fully hidden, with A < D the GPU waits D - A.
    routing = [[[[t % 8]] for t in range(8)]]
    for attn in (2 * D, D / 2):
        res = simulate(
            trace_from_lists(routing, experts=8), {"name": "oracle_prefetch",
                                                   "point": "pre_attention", "lookahead": 0},
            capacity=3, mode="timed", link=FixedLink(0.0, 1000 / D, 1),
            compute=FixedCompute(attention_s=attn, expert_s=C),
        )
        s = res.summary
        assert s["misses"] == 0
        expected_wait = max(D - attn, 0.0)
        if expected_wait:
            assert s["late_hits"] == 8 and s["hits"] == 0
        else:
            assert s["hits"] == 8 and s["late_hits"] == 0
        assert s["stall_time_s"] == pytest.approx(8 * expected_wait)
        assert s["stall_late_s"] == pytest.approx(8 * expected_wait)
        assert s["prefetch_precision"] == 1.0 and s["prefetch_recall"] == 1.0


def test_demand_goes_before_queued_prefetch() -> None:
    # next_layer_all queues all 8 experts of layer 1 behind layer 0's demand; layer 0's miss
    # must not wait for them.
    routing = [[[[0], [0]]]]
    res = simulate(
        trace_from_lists(routing, experts=8), "next_layer_all", capacity=12, mode="timed",
        link=FixedLink(0.0, 1000 / D, 1), compute=FixedCompute(attention_s=A, expert_s=C),
        record_transfers=True,
    )
    tr = res.transfers
    first = tr.sort_values("start_s").iloc[0]
    assert first["kind"] == "demand" and first["layer"] == 0
    assert first["start_s"] == pytest.approx(A)
    # layer 0 computes its expert at A + D; layer 1's attention ends at A + D + C + A;
    # by then ceil((D + C + A) / D) prefetches finished.
    s = res.summary
    assert s["misses"] == 1 and s["hits"] + s["late_hits"] == 1
    assert not math.isnan(s["pcie_busy_fraction"])


def test_zero_latency_reports_no_time() -> None:
    res = simulate(_all_miss_trace(3, 2), "lru", capacity=4, mode="zero_latency")
    assert math.isnan(res.summary["stall_time_s"])
    assert res.summary["misses"] == 6


def test_policy_callback_runs_at_its_simulated_time() -> None:
    """``ctx.after`` models a predictor with latency: the prefetch starts `delay` later."""
    from moesim.policies.base import PrefetchPolicy
    from moesim.policies.registry import resolve

    delay = 3e-4

    class Delayed(PrefetchPolicy):
        name = "delayed_test"

        def on_pre_attention(self, ctx, layer):
            if layer == 0:
                ctx.after(delay, lambda: ctx.prefetch([ctx.shape.key(1, 0)]))

    base = resolve({"name": "lru"})
    spec = type(base)("delayed", base.eviction, Delayed, {}, {})
    routing = [[[[1], [0]]]]  # one token: layer 0 uses expert 1, layer 1 expert 0
    res = simulate(
        trace_from_lists(routing, experts=4), spec, capacity=4, mode="timed",
        link=FixedLink(0.0, 1000 / D, 2), compute=FixedCompute(attention_s=A, expert_s=C),
        record_transfers=True,
    )
    tr = res.transfers.set_index("kind")
    assert tr.loc["prefetch", "start_s"] == pytest.approx(delay)
    assert res.summary["late_hits"] + res.summary["hits"] == 1  # layer 1's expert came by prefetch
