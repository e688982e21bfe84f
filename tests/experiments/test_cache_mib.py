"""cache.mib: a cache sized in MiB, as engines size theirs (llama.cpp-style --cache-mb)."""

from __future__ import annotations

from pathlib import Path

import pytest

import moesim
from moesim.experiments.api import InputError
from moesim.traces.store import write_trace
from tests.helpers import random_trace


@pytest.fixture()
def ds_trace(tmp_path: Path) -> Path:
    tr = random_trace(num_requests=1, tokens=4, layers=26, experts=64, top_k=6, seed=3)
    meta = tr.meta.__class__(model="deepseek_v2_lite", moe_layers=tuple(range(1, 27)),
                             num_experts=64, top_k=6, expert_bytes=17_301_504)
    path = tmp_path / "t.parquet"
    write_trace(path, meta, tr.requests)
    return path


@pytest.mark.parametrize("mib", [1000, 1000.5, 4000])
def test_slots_are_whole_experts_of_the_budget(ds_trace: Path, mib: float) -> None:
    df = moesim.simulate(trace=str(ds_trace), cache={"mib": mib}, mode="zero_latency",
                         **{"cache.pin_layer": False})
    assert int(df["cache.slots"].iloc[0]) == int(mib * 2**20 // 17_301_504)  # 60, 60, 242


def test_mib_equals_the_same_budget_in_bytes(ds_trace: Path) -> None:
    a = moesim.simulate(trace=str(ds_trace), cache={"mib": 2000}, mode="zero_latency")
    b = moesim.simulate(trace=str(ds_trace), cache={"bytes": 2000 * 2**20}, mode="zero_latency")
    assert a["hit_rate"].iloc[0] == b["hit_rate"].iloc[0]
    assert a["cache.slots"].iloc[0] == b["cache.slots"].iloc[0]


def test_mib_with_another_size_or_below_one_expert_is_refused(ds_trace: Path) -> None:
    with pytest.raises(InputError, match="exactly one of"):
        moesim.simulate(trace=str(ds_trace), cache={"mib": 1000, "fraction": 0.5})
    with pytest.raises(InputError, match="below one expert"):
        moesim.simulate(trace=str(ds_trace), cache={"mib": 10})
    with pytest.raises(InputError, match=r"cache\.mib"):
        moesim.simulate(trace=str(ds_trace), cache={"mib": -5})
