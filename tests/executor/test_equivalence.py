"""The executor against the simulator on the same trace, policy objects and cache.

A demand-only cache's contents do not depend on timing, so hit and miss counts (total and per
layer) must be equal exactly. With prefetching, timing decides hits vs late hits; the counts
must still add up and the accesses match.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.executor import ExecutorOptions, execute
from tests.executor.conftest import card_trace, small_card
from tests.sim.parts import check_parts

COUNTS = ("accesses", "hits", "late_hits", "misses")


def _both(policy, work_dir: Path, capacity: int, batch: int = 1, seed: int = 0,
          engines: int = 1, predictions=None):
    card = small_card()
    trace = card_trace(card, seed=seed)
    kw = dict(capacity=capacity, batch=batch, warmup_tokens=2, predictions=predictions)
    real = execute(trace, policy, card,
                   options=ExecutorOptions(work_dir=str(work_dir), copy_engines=engines), **kw)
    sim = simulate(trace, policy, link=FixedLink(1e-4, 1e9, engines),
                   compute=FixedCompute(1e-5, 0, 1e-5), **kw)
    return real, sim


def _parts(summary: dict) -> list[str]:
    return [k for k in ("hits", "late_hits", "promoted", "misses") if k in summary]


def _adds_up(res) -> None:
    s, pl = res.summary, res.per_layer
    assert sum(s[k] for k in _parts(s)) == s["accesses"]
    for k in (*_parts(s), "accesses"):
        assert pl[k].sum() == s[k]
    assert s["prefetch_bytes"] == s["prefetch_transfers"] * small_card().expert_bytes
    assert 0 <= s["wasted_prefetch_bytes"] <= s["prefetch_bytes"]
    if "promoted" in s:  # issue 12's split: a promoted prefetch is a demand copy
        assert s["demand_fetches"] == s["misses"] + s["promoted"]
    else:
        assert s["demand_fetches"] >= s["misses"]
    assert s["stall_time_s"] >= 0 and s["time_per_output_token_s"] > 0
    assert math.isclose(s["stall_time_s"], pl["stall_time_s"].sum(), rel_tol=1e-9,
                        abs_tol=1e-12)
    check_parts(res)  # the simulator's own identities, transfers included


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "belady", "least_stale"])
@pytest.mark.parametrize("capacity", [6, 14])
def test_demand_only_counts_equal_the_simulator(policy: str, capacity: int,
                                               work_dir: Path) -> None:
    real, sim = _both(policy, work_dir, capacity)
    for k in (*COUNTS, "demand_fetches", "evictions", "steps", "output_tokens"):
        assert real.summary[k] == sim.summary[k], k
    assert real.summary["late_hits"] == 0 and real.summary["prefetch_transfers"] == 0
    pd.testing.assert_frame_equal(real.per_layer[["layer", *COUNTS]],
                                  sim.per_layer[["layer", *COUNTS]])
    assert real.summary["source"] == "real" and real.summary["sim_engine"] == "executor:storage"
    _adds_up(real)


def test_batched_demand_only_counts_equal_the_simulator(work_dir: Path) -> None:
    real, sim = _both("lru", work_dir, 12, batch=2)
    for k in (*COUNTS, "token_expert_pairs", "tokens"):
        assert real.summary[k] == sim.summary[k], k


def test_summary_and_per_layer_have_the_simulator_columns(work_dir: Path) -> None:
    real, sim = _both("lru", work_dir, 8)
    assert set(sim.summary) <= set(real.summary)
    assert list(real.per_layer.columns) == list(sim.per_layer.columns)
    for k in ("executor.backend", "executor.direct_io", "executor.torch_threads",
              "executor.dtype", "executor.copy_engines"):
        assert k in real.summary
    # Per-request times come from the executor's measured step times, as from the simulator's.
    for k in ("tpot_p50_s", "tpot_p90_s", "tpot_p99_s"):
        assert real.summary[k] > 0 and sim.summary[k] > 0, k
    assert real.summary["tpot_p50_s"] <= real.summary["tpot_p99_s"]
    assert real.per_request["time_s"].sum() > 0


@pytest.mark.parametrize("policy", [
    "next_layer_all",
    {"name": "oracle_prefetch", "point": "pre_attention", "lookahead": 0},
    {"name": "oracle_prefetch", "point": "demand_issued", "lookahead": 1},
    {"name": "prediction_prefetch", "point": "pre_attention", "ahead": 0},
])
@pytest.mark.parametrize("engines", [1, 2])
def test_prefetching_runs_add_up(policy, engines: int, work_dir: Path) -> None:
    card = small_card()
    perfect = {r.request_id: r.experts for r in card_trace(card).requests}
    real, sim = _both(policy, work_dir, 12, engines=engines, predictions=perfect)
    _adds_up(real)
    _adds_up(sim)
    assert real.summary["accesses"] == sim.summary["accesses"]
    assert real.summary["prefetch_transfers"] > 0
