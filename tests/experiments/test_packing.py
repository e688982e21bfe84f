"""Sweeps without start-up tax: a trace is loaded once per process (by content), Hydra's config
store is not copied per composition, and packed launchers run many runs per task."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from moesim.experiments import sim_app
from moesim.experiments.api import simulate
from moesim.experiments.configs import register_configs
from moesim.traces.cache import ProcessMemo
from tests.helpers import write_deepseek_shaped


def test_process_memo_keeps_the_most_recent_and_not_failures() -> None:
    memo = ProcessMemo(size=2)
    built: list[str] = []

    def build(v: str):
        return lambda: built.append(v) or v

    assert memo.get("a", build("a")) == "a" and memo.get("b", build("b")) == "b"
    assert memo.get("a", build("A")) == "a"  # a hit: not rebuilt, and now the most recent
    memo.get("c", build("c"))  # drops "b", the least recently used
    assert memo.get("b", build("B")) == "B" and memo.get("a", build("x")) == "x"
    assert built == ["a", "b", "c", "B", "x"] and (memo.hits, memo.misses) == (1, 5)

    def boom():
        raise ValueError("no")

    with pytest.raises(ValueError):
        memo.get("d", boom)
    assert memo.get("d", build("d")) == "d"  # a failed build stored nothing


def test_config_store_is_shared_not_copied() -> None:
    register_configs()
    cs = ConfigStore.instance()
    assert copy.deepcopy(cs) is cs
    node = cs.load("policy/lru.yaml").node
    node.name = "changed"  # a loaded node is the caller's copy: the store stays as it was
    assert cs.load("policy/lru.yaml").node.name == "lru"


def test_a_trace_is_loaded_once_per_process_by_content(tmp_path: Path) -> None:
    path = write_deepseek_shaped(tmp_path / "t.parquet", requests=3, tokens=4, seed=1)
    sim_app.LOADED_TRACES.clear()
    before = sim_app.LOADED_TRACES.misses
    a = simulate(str(path), "lru", mode="zero_latency")
    b = simulate(str(path), "belady", mode="zero_latency", cache=0.5)
    assert sim_app.LOADED_TRACES.misses == before + 1  # the second run reused the first's
    c = simulate(str(path), "lru", mode="zero_latency", max_requests=2)
    assert sim_app.LOADED_TRACES.misses == before + 2  # other requests: loaded anew
    assert (a["trace.requests"].iloc[0], b["trace.requests"].iloc[0],
            c["trace.requests"].iloc[0]) == (3, 3, 2)
    # the simulation's own CPU is recorded beside the run's (a sweep's overhead is the rest)
    assert 0 < a["run.sim_cpu_s"].iloc[0] <= a["run.cpu_s"].iloc[0]
    # a trace rewritten at the same path has another content hash: never the old one's
    write_deepseek_shaped(path, requests=2, tokens=4, seed=2)
    d = simulate(str(path), "lru", mode="zero_latency")
    assert d["trace.requests"].iloc[0] == 2 and d["hits"].iloc[0] != a["hits"].iloc[0]
