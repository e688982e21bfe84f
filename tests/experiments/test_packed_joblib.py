"""``hydra/launcher=packed_joblib`` and ``packed_fork`` (experiments/packing.py): Hydra's joblib
launcher with ``runs_per_task`` runs per joblib task, each run's config composed once (in the
sweep's process) and Hydra's state unpickled once per worker; and the same packs run by workers
forked from the sweep's process after it imported the simulator and loaded the trace. The runs
themselves are the joblib launcher's, table for table and saved config for saved config; and
moesim-plot draws the joblib sweep's folder (tests/experiments/test_app.py's own joblib sweep
checked that, in ~7 s of the suite)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.config_store import ConfigStore

from moesim.experiments import sim_app
from moesim.experiments.configs import register_configs
from moesim.experiments.packing import ComposingLoader, PackedJoblibLauncher, auto_runs_per_task
from tests.helpers import sweep_tables, write_deepseek_shaped


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


def test_the_fork_launcher_config_is_registered() -> None:
    register_configs()
    node = ConfigStore.instance().load("hydra/launcher/packed_fork.yaml").node
    assert node.runs_per_task == 0 and node.n_jobs == -1
    assert node._target_.endswith("PackedForkLauncher")


class _CountingLoader:
    def __init__(self) -> None:
        self.composed: list[list[str]] = []

    def load_sweep_config(self, master_config: object, sweep_overrides: list[str]) -> dict:
        self.composed.append(list(sweep_overrides))
        return {"overrides": list(sweep_overrides)}

    def other(self) -> str:
        return "the wrapped loader's"


def test_composing_loader_keeps_what_the_sweeper_composed_once() -> None:
    inner = _CountingLoader()
    loader = ComposingLoader(inner, limit=2)
    for run in (["a=1"], ["a=2"], ["a=3"]):  # the sweeper's check of every run's config
        assert loader.load_sweep_config(None, run) == {"overrides": run}
    assert inner.composed == [["a=1"], ["a=2"], ["a=3"]]
    assert pickle.loads(loader.take(["a=2"])) == {"overrides": ["a=2"]}
    assert loader.take(["a=2"]) is None  # handed out once
    assert loader.take(["a=3"]) is None  # over the limit: the worker composes it
    assert loader.other() == "the wrapped loader's"
    assert len(inner.composed) == 3  # taking never composes again
    again = pickle.loads(pickle.dumps(loader))  # a sweeper may pickle its context
    assert again.other() == "the wrapped loader's" and again.kept == loader.kept


def test_inputs_hashed_once_per_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from moesim.experiments.inputs import inputs_hashed_once

    calls: list[str] = []
    monkeypatch.setattr(sim_app, "hash_inputs", lambda cfg: calls.append(cfg.trace.path) or
                        f"h{len(calls)}")
    a = OmegaConf.create({"trace": {"path": "a", "format": "parquet"}, "requests": "auto"})
    b = OmegaConf.create({"trace": {"path": "b", "format": "parquet"}, "requests": "auto"})
    assert [sim_app.input_digest(a), sim_app.input_digest(a)] == ["h1", "h2"]  # no sweep
    hashes: dict = {}
    with inputs_hashed_once(hashes):
        got = [sim_app.input_digest(c) for c in (a, b, a, b)]
    assert got == ["h3", "h4", "h3", "h4"] and calls == ["a", "a", "a", "b"]
    with inputs_hashed_once(hashes):  # the next pack of the same sweep
        assert sim_app.input_digest(a) == "h3" and len(calls) == 4
    assert sim_app.input_digest(a) == "h5"  # outside: hashed again


@pytest.mark.slow
def test_packed_sweeps_equal_joblib_and_resume(tmp_path: Path) -> None:
    trace = write_deepseek_shaped(tmp_path / "t.parquet", requests=2, tokens=4, seed=4)
    base = [sys.executable, "-m", "moesim", "sim", "-m", "trace=file", f"trace.path={trace}",
            "policy=lru,belady", "cache.fraction=0.25,0.5", "mode=zero_latency",
            "hydra.launcher.n_jobs=2"]
    runs = {}
    for launcher, extra in (("joblib", []), ("packed_joblib", ["hydra.launcher.runs_per_task=2"]),
                            ("packed_fork", ["hydra.launcher.runs_per_task=3"])):
        sweep = tmp_path / launcher
        cmd = [*base, f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={sweep}"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"sweep {sweep}: 4 done, 0 skipped, 0 failed" in proc.stdout
        runs[launcher] = (sweep_tables(sweep), cmd)
    plain = runs["joblib"][0]
    assert sum(k.endswith("/summary.parquet") for k in plain) == 4  # one folder per run
    assert sum(k.endswith("/per_layer.parquet") for k in plain) == 4
    # moesim-plot on the joblib sweep's folder: its aggregate table and capacity figure, in
    # which Belady has the best hit rate at every capacity
    from moesim.experiments.plot import main as plot_main

    assert plot_main([str(tmp_path / "joblib")]) == 0
    agg = pd.read_parquet(tmp_path / "joblib" / "aggregate.parquet")
    assert len(agg) == 4 and (tmp_path / "joblib" / "capacity.png").exists()
    best = agg.groupby("cache.capacity_fraction")["hit_rate"].max()
    assert (agg[agg["policy.name"] == "belady"].set_index("cache.capacity_fraction")["hit_rate"]
            == best).all()
    for launcher in ("packed_joblib", "packed_fork"):
        packed = runs[launcher][0]
        assert sorted(plain) == sorted(packed)  # same folders, same tables
        for name, table in plain.items():
            if isinstance(table, str):
                assert table == packed[name], name  # the saved config is the config that ran
            else:
                pd.testing.assert_frame_equal(table, packed[name])  # config hash included
    # A rerun skips every finished run (by config hash, in the run itself, as every sweep's):
    # once, through packed_fork, the subclass of packed_joblib whose workers are forked with
    # the composed packs (a rerun through packed_joblib too cost ~4 s and ran the same path).
    again = subprocess.run(runs["packed_fork"][1], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sweep {tmp_path / 'packed_fork'}: 0 done, 4 skipped, 0 failed" in again.stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_killing_a_packed_fork_sweep_leaves_no_workers(tmp_path: Path) -> None:
    from tests.experiments.test_concurrency import workers_left_after_killing

    path = write_deepseek_shaped(tmp_path / "big.parquet", 30, 40, 9)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moesim", "sim", "-m", "trace=file", f"trace.path={path}",
         "policy=belady,lfu,least_stale", "cache.fraction=0.1,0.2,0.3,0.4", "engine=python",
         "progress=false", "hydra/launcher=packed_fork", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = workers_left_after_killing(proc, tmp_path / "sweep")
    assert not left, f"forked workers outlived the killed sweep: {left}"
