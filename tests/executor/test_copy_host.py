"""What copies cost the executor's compute thread (``sim.executor.overhead.measure_copy_host``)
as a runtime term (``copy.host_s``) and a profile factor (``machine.compute_under_io``): the
measurement, its record with provenance, and the profiler writing both."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from moesim.hw_profiles.runtime import runtime_from_mapping
from moesim.sim.executor.overhead import (
    CopyHost,
    LoopOverhead,
    compute_under_copies,
    copies_record,
    host_s_supported,
    measure_copy_host,
    runtime_mapping,
)
from tests.executor.conftest import small_card

pytest.importorskip("torch")


def _copies(issue: float = 20e-6) -> CopyHost:
    return CopyHost(issue_s=issue, op_factor=1.25, host_s=60e-6, alone_s=1e-3,
                    with_copies_s=1.5e-3, copies_per_pass=8.0, copy_mean_s=400e-6,
                    copy_idle_s=300e-6, read_s=290e-6, engines=2, passes=4, rounds=2,
                    at="2026-01-01T00:00:00Z", load=1.0)


def _loop() -> LoopOverhead:
    return LoopOverhead(20e-6, 6e-6, 1e-6, ((2, 4, 4e-5),), 10, 2, "t", 7e-6, ((3.0, 2e-5),))


def test_copies_are_measured_through_the_executors_copier(work_dir: Path) -> None:
    card = small_card()
    m = measure_copy_host(card, engines=2, work_dir=work_dir, rounds=2, passes=3)
    assert m.copies_per_pass > 0  # the workers were kept busy beside the ops
    for x in (m.issue_s, m.host_s, m.alone_s, m.with_copies_s, m.copy_mean_s, m.copy_idle_s,
              m.read_s):
        assert math.isfinite(x) and x >= 0
    assert m.issue_s > 0 and m.op_factor > 0 and m.alone_s > 0
    # the copier calls are part of the time with copies, never more than all of it
    assert m.issue_s * m.copies_per_pass <= m.with_copies_s
    assert m.engines == 2 and m.rounds == 2 and m.passes == 3


@pytest.mark.skipif(not host_s_supported(), reason="this simulator has no copy.host_s")
def test_runtime_charges_the_copier_calls_as_host_s_and_the_hand_off_on_the_link() -> None:
    card = small_card()
    data = runtime_mapping(_loop(), 45e-6, card, "test", copies=_copies(20e-6))
    rt = runtime_from_mapping(data, "x", allow_bare=False)
    assert rt.value("copy.host_s") == pytest.approx(20e-6)
    # the loop's per-copy work moved into host_s: the link keeps the hand-off only
    assert rt.value("copy.per_copy_s") == pytest.approx(45e-6)
    assert rt.host_s.kind == "measured" and "measure_copy_host" in rt.host_s.source
    # copies beside compute slower than plain reads: the link's share is their ratio
    assert rt.value("copy.efficiency") == pytest.approx(290 / 400, rel=1e-3)
    # copies no slower than plain reads: no efficiency term (never faster than the link)
    fast = replace(_copies(), copy_mean_s=250e-6)
    assert "efficiency" not in runtime_mapping(_loop(), 45e-6, card, "t", copies=fast)["copy"]
    # without the copies measured, the runtime is the one before (hand-off + loop per copy)
    old = runtime_from_mapping(runtime_mapping(_loop(), 45e-6, card, "test"), "x",
                               allow_bare=False)
    assert old.value("copy.per_copy_s") == pytest.approx(52e-6)
    assert old.value("copy.host_s") == 0.0


def test_profile_records_the_copies_and_their_factor_per_op() -> None:
    card = small_card()
    rec = copies_record(_copies(), card, "test")
    assert rec["engines"] == 2 and rec["op_factor"]["value"] == pytest.approx(1.25)
    assert rec["issue_s"]["unit"] == "us" and rec["issue_s"]["value"] == pytest.approx(20.0)
    assert "measure_copy_host" in rec["source"]
    f = compute_under_copies(_copies())
    assert set(f) == {"expert", "attention", "router", "shared", "dense"}
    assert all(v == pytest.approx(1.25) for v in f.values())


def test_validation_applies_the_profiles_copier_factor_before_the_reader_one() -> None:
    from moesim.experiments.validate import _with_io_factors

    mapping = {"machine": {"compute_under_io": compute_under_copies(_copies())},
               "contention": {"compute_slowdown_under_io": {"value": [[1, 1.1], [2, 1.12]]}}}
    assert _with_io_factors(mapping, 2) is mapping  # the copier's factor, as measured
    bare = {"contention": mapping["contention"]}
    got = _with_io_factors(bare, 2)["machine"]["compute_under_io"]
    assert got["expert"] == pytest.approx(1.12)


def test_real_bench_measures_the_copies_with_the_profiles_engines(tmp_path: Path) -> None:
    from moesim.hw_profiles.measure_storage import CpuStorageBench

    card = small_card()
    with CpuStorageBench(card, tmp_path / "scratch", file_bytes=2**20, torch_threads=1, seed=0,
                         rounds=2, window_s=0.02, work_dir=tmp_path / "work", loop_steps=20,
                         handoff_copies=4) as bench:
        data = bench.executor_runtime(card, engines=1)
        extra = bench.executor_copies(card)
    assert extra is not None and extra["executor_copies"]["engines"] == 1
    assert set(extra["compute_under_io"]) >= {"expert", "attention"}
    rt = runtime_from_mapping(data, "x", allow_bare=False)
    if host_s_supported():
        assert rt.value("copy.host_s") > 0 and rt.host_s.kind == "measured"
