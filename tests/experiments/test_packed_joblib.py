"""``hydra/launcher=packed_joblib``: Hydra's joblib launcher with ``runs_per_task`` runs per
joblib task (experiments/packing.py), so a sweep pickles Hydra's state once per pack instead of
once per run; the runs themselves are the joblib launcher's, result for result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.config_store import ConfigStore

from moesim.experiments.configs import register_configs
from moesim.experiments.packing import PackedJoblibLauncher, auto_runs_per_task
from tests.helpers import write_deepseek_shaped


def test_auto_runs_per_task_leaves_about_four_tasks_per_worker() -> None:
    assert auto_runs_per_task(16, 2) == 2
    assert auto_runs_per_task(200, 2) == 25
    assert auto_runs_per_task(3, 2) == 1  # fewer runs than tasks: one run per task
    assert auto_runs_per_task(200, -1) >= 1  # all CPUs


def test_runs_per_task_below_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="runs_per_task must be >= 0"):
        PackedJoblibLauncher(runs_per_task=-1, n_jobs=2)


def test_the_launcher_config_is_registered() -> None:
    register_configs()
    node = ConfigStore.instance().load("hydra/launcher/packed_joblib.yaml").node
    assert node.runs_per_task == 0 and node.n_jobs == -1
    assert node._target_.endswith("PackedJoblibLauncher")


def _summaries(sweep: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for path in sorted(sweep.glob("*/summary.parquet")):
        df = pd.read_parquet(path)
        out[path.parent.name] = df.drop(columns=[c for c in df if c.startswith("run.")])
    return out


@pytest.mark.slow
def test_packed_joblib_sweep_equals_joblib_and_resumes(tmp_path: Path) -> None:
    trace = write_deepseek_shaped(tmp_path / "t.parquet", requests=2, tokens=4, seed=4)
    base = [sys.executable, "-m", "moesim", "sim", "-m", "trace=file", f"trace.path={trace}",
            "policy=lru,belady", "cache.fraction=0.25,0.5", "mode=zero_latency",
            "hydra.launcher.n_jobs=2"]
    runs = {}
    for launcher, extra in (("joblib", []), ("packed_joblib", ["hydra.launcher.runs_per_task=2"])):
        sweep = tmp_path / launcher
        cmd = [*base, f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={sweep}"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"sweep {sweep}: 4 done, 0 skipped, 0 failed" in proc.stdout
        runs[launcher] = (_summaries(sweep), cmd)
    plain, packed = runs["joblib"][0], runs["packed_joblib"][0]
    assert sorted(plain) == sorted(packed) and len(packed) == 4  # same folders, one per run
    for name, df in plain.items():
        pd.testing.assert_frame_equal(df, packed[name])  # config hash included
    again = subprocess.run(runs["packed_joblib"][1], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sweep {tmp_path / 'packed_joblib'}: 0 done, 4 skipped, 0 failed" in again.stdout
