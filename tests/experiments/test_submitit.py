"""A sweep through Hydra's submitit launcher, for real: ``hydra/launcher=submitit_local`` runs
every job as its own process through submitit, as ``hydra/launcher=slurm`` does on a cluster
(experiments/conf/hydra/launcher/slurm.yaml, the same plugin). Also the sweep's progress bar,
which counts finished runs from the sweep's own process."""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import given, settings
from omegaconf import DictConfig, open_dict

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.packing import pack, unpack
from moesim.experiments.sweep_summary import (
    STATUS,
    LineClearingStream,
    runs_finished,
    sweep_size,
)
from tests.helpers import write_deepseek_shaped


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_deepseek_shaped(tmp_path_factory.mktemp("submitit") / "t.parquet",
                                 requests=2, tokens=4, seed=4)


@pytest.mark.slow
def test_submitit_local_sweep_runs_every_job(trace_file: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "sim", "-m", "trace=file", f"trace.path={trace_file}",
         "policy=lru,belady", "progress=true", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env={**os.environ, "COLUMNS": "120"}, capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.concat([pd.read_parquet(p) for p in sorted(sweep.glob("*/summary.parquet"))])
    assert sorted(rows["policy.name"]) == ["belady", "lru"]
    assert (rows["trace.requests"] == 2).all() and rows["config_hash"].nunique() == 2
    assert list(sweep.glob(".submitit/*/*_result.pkl"))  # submitit ran them, not Hydra in-process
    assert f"sweep {sweep}: 2 done, 0 skipped, 0 failed" in proc.stdout
    assert re.search(r"sweep: 100%\|[^\n\r]*\| 2/2 ", proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_packed_local_sweep_runs_two_runs_per_task_and_resumes(trace_file: Path,
                                                               tmp_path: Path) -> None:
    """``hydra/launcher=packed_local runs_per_task=2``: 4 runs in 2 submitit tasks (processes),
    every run its own folder and config hash; the same command again skips all 4."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "moesim", "sim", "-m", "trace=file", f"trace.path={trace_file}",
           "policy=lru,belady", "cache.fraction=0.25,0.5", "hydra/launcher=packed_local",
           "hydra.launcher.runs_per_task=2", "hydra.launcher.timeout_min=5",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.concat([pd.read_parquet(p) for p in sorted(sweep.glob("*/summary.parquet"))])
    assert len(rows) == 4 and rows["config_hash"].nunique() == 4
    tasks = sorted(p.parent for p in sweep.glob(".submitit/*/*_result.pkl"))
    assert len(tasks) == 2  # two tasks, not four
    for task in tasks:  # each ran two runs, one after the other, in its one process
        log = next(task.glob("*_log.out")).read_text()
        assert log.count("  results: ") == 2, log[-2000:]
    assert f"sweep {sweep}: 4 done, 0 skipped, 0 failed" in proc.stdout
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sweep {sweep}: 0 done, 4 skipped, 0 failed" in again.stdout


def test_pack_and_unpack_keep_every_run_and_its_number() -> None:
    runs = [["policy=lru", "seed=1"], ["policy=belady"], ["policy=fifo", "batch=2"]]
    packs = pack(runs, initial_job_idx=5, runs_per_task=2)
    assert len(packs) == 2
    assert [r for p in packs for r in unpack(p)] == [(5, runs[0]), (6, runs[1]), (7, runs[2])]
    with pytest.raises(ValueError, match="runs_per_task must be >= 1"):
        pack(runs, 0, 0)


def test_runs_finished_counts_only_this_sweeps_statuses(tmp_path: Path) -> None:
    for name, mtime in (("0_a", 100.0), ("1_b", 200.0), ("2_c", 300.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATUS).write_text(json.dumps({"status": "done"}))
        os.utime(tmp_path / name / STATUS, (mtime, mtime))
    (tmp_path / "3_d").mkdir()  # started, not finished
    assert runs_finished(tmp_path, since=0) == 3
    assert runs_finished(tmp_path, since=150) == 2
    assert runs_finished(tmp_path, since=301) == 0


_VALUES = st.lists(st.sampled_from(["1", "2", "3", "4", "5"]), min_size=1, max_size=3,
                   unique=True)


@functools.cache
def _hydra_config() -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", return_hydra_config=True)


@settings(max_examples=30, deadline=None)
@given(seed=_VALUES, batch=_VALUES, params=st.one_of(st.none(), _VALUES))
def test_sweep_size_is_what_hydras_basic_sweeper_launches(
        seed: list[str], batch: list[str], params: list[str] | None) -> None:
    """The bar's total: the product of the sweep lists (a command-line key replaces the same
    key in ``hydra.sweeper.params``), counted against the sweeper's own expansion."""
    cfg = copy.deepcopy(_hydra_config())
    task = [f"seed={','.join(seed)}", f"batch={','.join(batch)}"]
    with open_dict(cfg):
        cfg.hydra.overrides.task = task
        cfg.hydra.sweeper.params = {"seed": ",".join(params)} if params else None
    sweeper_params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides(sweeper_params + task)
    expected = sum(len(chunk) for chunk in BasicSweeper.split_arguments(parsed, None))
    assert sweep_size(cfg) == expected == len(seed) * len(batch)


def test_sweep_size_is_unknown_for_other_sweepers() -> None:
    cfg = copy.deepcopy(_hydra_config())
    with open_dict(cfg):
        cfg.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.OptunaSweeper"
    assert sweep_size(cfg) is None


def test_worker_lines_clear_the_bar_line_first() -> None:
    """A joblib worker's prints start by erasing the terminal line the parent's bar is on;
    text continuing a line is left alone."""
    out = io.StringIO()
    stream = LineClearingStream(out)
    assert stream.write("policy lru\n  hit") == len("policy lru\n  hit")
    stream.write("_rate 0.5\n")
    stream.write("")
    clear = LineClearingStream.CLEAR
    assert out.getvalue() == f"{clear}policy lru\n{clear}  hit_rate 0.5\n"
    assert stream.getvalue() == out.getvalue()  # everything else is the wrapped stream's
