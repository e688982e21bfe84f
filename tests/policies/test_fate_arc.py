"""Fate's cache: shallow-favouring allocation and per-layer ARC."""

import numpy as np
import pytest

from moesim.policies.base import ModelShape, PolicyError, PolicySetup
from moesim.policies.fate_arc import FateARC, fate_allocation
from moesim.sim import FixedCompute, FixedLink, simulate
from tests.helpers import random_trace


def test_four_full_layers_then_equal_shares():
    caps = fate_allocation(capacity=4 * 16 + 6 * 3 + 12, reserve=[3] * 10, num_experts=16)
    assert caps[:4] == [16] * 4
    assert sum(caps) == 4 * 16 + 6 * 3 + 12 and caps[4:] == [5] * 6


def test_small_budget_fills_whole_layers_from_the_first():
    caps = fate_allocation(capacity=30 + 20, reserve=[3] * 10, num_experts=16)
    assert caps[:2] == [16, 10] and caps[2:] == [3] * 8  # 20 spare: 13 fill layer 0, 7 go on
    assert sum(caps) == 50


class _Clock:
    now, step, layer, position, counting = 0.0, 0, 0, 0, True


def _arc(capacity=3, layers=(0,)):
    setup = PolicySetup(ModelShape(1, 8, 1, 1), capacity, _Clock(), np.random.default_rng(0),
                        partition_layers=list(layers), reserve=1)
    return FateARC(setup)


def test_arc_moves_reused_experts_to_t2_and_evicts_from_t1():
    arc = _arc()
    for k in (0, 1, 2):
        arc.on_insert(k, prefetch=False)
    arc.on_access(1)  # reuse: 1 moves to T2
    assert arc.victim(lambda k: True) == 0  # LRU of T1 (p = 0)
    arc.on_evict(0)
    arc.on_insert(0, prefetch=False)  # ghost hit in B1 raises p and goes to T2
    assert arc._p >= 1 and 0 in arc._t2


def test_prefetched_experts_are_transient_until_used():
    arc = _arc(capacity=4)
    arc.on_insert(0, prefetch=False)
    arc.on_insert(5, prefetch=True)
    assert arc.victim(lambda k: True) == 5
    arc.on_access(5)
    assert 5 in arc._t1 and arc.victim(lambda k: True) == 0


def test_needs_per_layer_partition():
    with pytest.raises(PolicyError, match="per_layer"):
        _arc(layers=(0, 1))
    trace = random_trace(layers=3, experts=8, top_k=2)
    with pytest.raises(Exception, match="per_layer"):
        simulate(trace, "fate_arc", capacity=12, mode="zero_latency")
    res = simulate(trace, "fate_arc", capacity=15, mode="timed", partition="per_layer",
                   link=FixedLink(1e-4, 1e9, 1), compute=FixedCompute(1e-3, expert_s=1e-4))
    s = res.summary
    assert s["hits"] + s["misses"] == s["accesses"] and s["hits"] > 0
