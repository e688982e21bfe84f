"""Hydra's submitit launcher and the packed launchers built on it: packing runs into tasks, the
sweep's size, and the sweep's progress bar, which counts finished runs from the sweep's own
process.

The sweeps themselves, for real (``hydra/launcher=submitit_local`` runs every job as its own
process through submitit, as ``hydra/launcher=slurm`` does on a cluster, the same plugin;
``packed_local`` several runs per task; the bar drawn over both; a rerun skipping the finished
runs), run in one test, tests/experiments/test_packing.py::
test_packed_local_runs_what_submitit_local_runs_and_resumes, which compares the two launchers
table for table (two sweeps here checked the same, at ~40 s of the suite)."""

from __future__ import annotations

import copy
import functools
import io
import json
import os
from pathlib import Path

import hypothesis.strategies as st
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
