"""Issue 25: a sweep's report counts what its own processes did. Two identical sweeps into one
folder ran each run once, but the report read the last writer's status: the sweep that ran
three runs printed "0 done, 4 skipped"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moesim.experiments.sweep_summary import SWEEP_ENV, SweepSummary, read_statuses, write_status


def _config(sweep_dir: Path):
    return OmegaConf.create({"progress": False, "hydra": {
        "sweep": {"dir": str(sweep_dir)},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {}},
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        "overrides": {"task": ["policy=lru,belady", "cache.fraction=0.1,0.5"]}}})


def _job(run: Path, status: str, error: str = "") -> None:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    write_status(run, status, error)


def test_two_sweeps_in_one_folder_each_count_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(SWEEP_ENV, raising=False)
    cfg = _config(tmp_path)
    runs = [tmp_path / f"{i}_run" for i in range(4)]
    first, second = SweepSummary(), SweepSummary()
    first.on_multirun_start(cfg)
    first_id = first._sweep_id
    for run in runs[:3]:  # the first sweep runs three ...
        first.on_job_start(cfg)
        _job(run, "done")
    second.on_multirun_start(cfg)
    second.on_job_start(cfg)
    _job(runs[3], "done")  # ... the second the fourth, then finds the three finished
    for run in runs[:3]:
        second.on_job_start(cfg)
        _job(run, "skipped")
    first.on_job_start(cfg)
    _job(runs[3], "skipped")
    assert {json.loads((r / "status.json").read_text())["status"] for r in runs[:3]} == {
        "skipped"}  # the last writer's, as before
    second.on_multirun_end(cfg)
    assert "1 done, 3 skipped, 0 failed" in capsys.readouterr().out
    first._sweep_id = first_id
    first.on_multirun_end(cfg)
    assert "3 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert not list(tmp_path.rglob(".*.tmp"))


def test_runs_a_sweep_never_recorded_are_unfinished(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWEEP_ENV, "a")
    _job(tmp_path / "0_x", "done")
    _job(tmp_path / "1_x", "failed", "bad value")
    monkeypatch.setenv(SWEEP_ENV, "b")
    _job(tmp_path / "2_x", "done")  # another sweep's run in the same folder: not counted
    by = read_statuses(tmp_path, "a", expected=3)
    assert [len(by[k]) for k in ("done", "skipped", "failed", "unfinished")] == [1, 0, 1, 1]
    assert by["failed"][0][1] == "bad value"
    monkeypatch.delenv(SWEEP_ENV)
    _job(tmp_path / "3_x", "done")  # a single run: no sweep record
    assert "sweeps" not in json.loads((tmp_path / "3_x" / "status.json").read_text())
