"""The executor's microbenchmarks produce a strict, loadable profile of this machine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from moesim.hw_profiles import profile_from_mapping
from moesim.sim.executor.calibrate import (
    CalibrationOptions,
    ReadTimes,
    calibrate,
    measure_handoff,
    measure_reads,
    with_reads,
)
from tests.executor.conftest import small_card


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> dict:
    opts = CalibrationOptions(reads=8, reps=5, min_seconds=0.05, tokens=(1, 2),
                              contexts=(1, 16), slots=4,
                              work_dir=str(tmp_path_factory.mktemp("work")))
    card = replace(small_card(), shared_intermediate_size=32, dense_intermediate_size=96)
    return calibrate(card, card.num_moe_layers, 1, opts, log=lambda _m: None)


def test_calibrated_profile_loads_strictly_and_times_every_op(mapping: dict) -> None:
    card = replace(small_card(), shared_intermediate_size=32, dense_intermediate_size=96)
    prof = profile_from_mapping(mapping, name=mapping["name"], allow_bare=False)
    assert prof.unified_memory and prof.storage is not None
    model = prof.compute_model(card)
    assert all(v != "roofline" for v in model.calibration().values()), model.calibration()
    link = prof.expert_link()
    read = mapping["machine"]["read_median_s"]
    assert link.transfer_time(card.expert_bytes) > 0 and read > 0
    assert float(link.latency_s) == mapping["storage"]["latency_s"]["value"] > 0
    assert model.expert_time(1) > 0 and model.expert_time(2) > 0  # noise may order them
    assert model.shared_time(1) > 0 and model.dense_layer_time(1, 16) > 0


def test_with_reads_sets_the_expert_read_time(mapping: dict) -> None:
    card = replace(small_card(), shared_intermediate_size=32, dense_intermediate_size=96)
    reads = ReadTimes(2e-3, 1e-3, 1e-3, 3e-3, 8, 1, True, "now")
    fresh = with_reads(mapping, card, reads, handoff_s=5e-5)
    link = profile_from_mapping(fresh, name="x", allow_bare=False).expert_link()
    assert link.transfer_time(card.expert_bytes) == pytest.approx(2e-3 + 5e-5, rel=1e-4)
    assert mapping["storage"]["latency_s"]["value"] != 5e-5  # the input is left alone


def test_reads_and_handoff_are_measured(tmp_path: Path) -> None:
    opts = CalibrationOptions(reads=6, work_dir=str(tmp_path))
    card = small_card()
    reads = measure_reads(card, opts, seed=1)
    assert reads.reads == 6 and 0 < reads.p10_s <= reads.median_s <= reads.p90_s
    assert reads.mean_s > 0
    assert 0 < measure_handoff(card, opts, seed=2, copies=6) < 1.0


def test_contention_factor_is_measured_and_scales_compute(mapping: dict) -> None:
    from moesim.sim.executor.calibrate import under_io

    card = replace(small_card(), shared_intermediate_size=32, dense_intermediate_size=96)
    factors = mapping["machine"]["compute_under_io"]
    assert set(factors) == {"expert", "attention", "router", "shared", "dense"}
    assert all(f > 0 for f in factors.values())
    slowed = profile_from_mapping(under_io(mapping, card), name="x", allow_bare=False)
    alone = profile_from_mapping(mapping, name="x", allow_bare=False)
    assert slowed.compute_model(card).expert_time(1) == pytest.approx(
        alone.compute_model(card).expert_time(1) * factors["expert"], rel=1e-4)
    assert alone.contention is not None


def test_paced_profile_has_the_pace_and_the_measured_lag(mapping: dict) -> None:
    from moesim.sim.executor.calibrate import with_paced_reads

    card = replace(small_card(), shared_intermediate_size=32, dense_intermediate_size=96)
    pace = card.expert_bytes / 2e-3
    paced = ReadTimes(2.3e-3, 2.1e-3, 2e-3, 2.5e-3, 8, 1, True, "now")
    fresh = with_paced_reads(mapping, card, paced, pace, handoff_s=5e-5)
    link = profile_from_mapping(fresh, name="x", allow_bare=False).expert_link()
    # bytes / pace + hand-off + lag = the paced reads' mean + the hand-off
    assert link.transfer_time(card.expert_bytes) == pytest.approx(2.3e-3 + 5e-5, rel=1e-4)
    assert fresh["machine"]["paced_read_lag_s"] == pytest.approx(3e-4)
    early = ReadTimes(1.9e-3, 1.9e-3, 1.9e-3, 1.9e-3, 8, 1, True, "now")  # never negative
    assert with_paced_reads(mapping, card, early, pace, 0.0)["machine"]["paced_read_lag_s"] == 0


def test_paced_reads_beside_compute_are_measured(tmp_path: Path) -> None:
    opts = CalibrationOptions(reads=5, work_dir=str(tmp_path))
    card = small_card()
    pace = card.expert_bytes / 1e-3
    calls: list[int] = []
    reads = measure_reads(card, opts, seed=1, pace_Bps=pace, busy=calls.append)
    assert reads.reads == 5 and reads.p10_s >= 1e-3 and calls  # the busy loop ran meanwhile


def test_profiler_and_calibration_time_ops_with_one_function(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``moesim-profile storage`` and the executor's calibration both measure CPU ops through
    ``calibrate.time_ops`` on the same jobs (``op_jobs``): a stand-in timer shows in both."""
    import moesim.sim.executor.calibrate as cal
    from moesim.hw_profiles.measure_storage import CpuComputeBench, executor_op_table

    seen: list[set[str]] = []

    def fake(jobs: list, rounds: int = 1, reps: int = 100, min_seconds: float = 1.0) -> tuple:
        seen.append({j[0] for j in jobs})
        means = {(k, x): 1e-3 * (1 + x) for k, x, _, _ in jobs}
        return means, {k: [m] * max(rounds, 1) for k, m in means.items()}

    monkeypatch.setattr(cal, "time_ops", fake)
    card = small_card()
    bench = CpuComputeBench(card, torch_threads=1, seed=0, rounds=2)
    got = executor_op_table(bench, card, {"expert": [1, 2], "router": [1], "attention": [4]})
    assert got[("expert", 2)] == (3e-3, [3e-3, 3e-3]) and got[("attention", 4)][0] == 5e-3
    opts = CalibrationOptions(reads=4, reps=2, min_seconds=0.0, tokens=(1, 2), contexts=(1, 4),
                              slots=2, handoff=False, contention=False, work_dir=str(tmp_path))
    m = calibrate(card, card.num_moe_layers, 0, opts, log=lambda _m: None)
    table = m["compute"]["measured"][card.name]
    assert table["expert_s"]["value"] == [[1, 2e-3], [2, 3e-3]]
    assert seen[0] == {"expert", "router", "attention"} <= seen[1]
