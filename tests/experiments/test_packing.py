"""Sweeps without start-up tax: a trace is loaded once per process (by content), Hydra's config
store is not copied per composition, and packed launchers run many runs per task."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from moesim.experiments import sim_app
from moesim.experiments.api import simulate
from moesim.experiments.configs import register_configs
from moesim.traces.cache import ProcessMemo
from tests.helpers import sweep_tables, write_deepseek_shaped


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


# ---- hydra/launcher=packed_local and packed_slurm: configs composed once, inputs hashed once --

SUBMITIT = "hydra_plugins.hydra_submitit_launcher"  # the cluster extra

_RAN: list[tuple[str, str]] = []  # (policy, input hash) of each run the stand-in task ran


def _record_run(cfg: DictConfig) -> str:
    """A stand-in for the app's task function: what ran, with the input hash it saw."""
    _RAN.append((str(cfg.policy.name), sim_app.input_digest(cfg)))
    if cfg.policy.name == "fifo":
        raise RuntimeError("this run fails")
    return str(cfg.policy.name)


class _NeverComposes:
    def load_sweep_config(self, master_config: object, sweep_overrides: list[str]) -> None:
        raise AssertionError(f"composed in the task: {sweep_overrides}")


def _composed(sweep: Path, trace: Path, policies: list[str]) -> tuple[object, list[bytes]]:
    """The sweep's master config and each run's config as Hydra's sweeper composes them."""
    import pickle

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from moesim.experiments.configs import CONF_DIR

    register_configs()
    common = ["trace=file", f"trace.path={trace}", "mode=zero_latency", "progress=false",
              f"hydra.sweep.dir={sweep}", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose("config", overrides=common, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        runs = [pickle.dumps(loader.load_configuration(
            "config", [*common, f"policy={p}"], run_mode=RunMode.RUN)) for p in policies]
    GlobalHydra.instance().clear()
    return master, runs


def test_a_submitit_pack_runs_the_configs_the_sweep_composed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The task never composes (its loader refuses), reads each input's hash from the sweep
    unless the input's files changed since (then hashes it once for the whole pack), and runs
    every run of its pack even when one fails."""
    pytest.importorskip(SUBMITIT)
    import pickle
    from types import SimpleNamespace

    import submitit
    from hydra._internal.callbacks import Callbacks
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus
    from hydra.types import HydraContext
    from omegaconf.basecontainer import BaseContainer

    from moesim.experiments import packing
    from moesim.predictors.data import _digest_of

    # The task installs the shipped Hydra state (Singleton.set_state: a HydraConfig that is
    # set): this process's own comes back after the test, as it would in a real task's exit.
    monkeypatch.setattr(Singleton, "_instances", Singleton._instances)
    monkeypatch.setattr(BaseContainer, "_resolvers", BaseContainer._resolvers)
    trace = write_deepseek_shaped(tmp_path / "t.parquet", requests=2, tokens=4, seed=3)
    sweep = tmp_path / "sweep"
    master, configs = _composed(sweep, trace, ["lru", "fifo", "belady"])
    hashed: list[str] = []
    real = sim_app.hash_inputs
    monkeypatch.setattr(sim_app, "hash_inputs",
                        lambda cfg: hashed.append(cfg.policy.name) or real(cfg))
    reads = _digest_of.cache_info().misses
    shipped = packing.hash_inputs_once(configs)
    assert _digest_of.cache_info().misses == reads + 1  # the trace file read once per sweep
    assert hashed == ["lru", "lru"]  # the first config's, checked once; the rest: known
    ((digest, files, _stamps),) = shipped.values()
    assert files == [str(trace)] and digest == real(pickle.loads(configs[0]))

    launcher = packing.PackedLocalLauncher(runs_per_task=3, submitit_folder=str(tmp_path))
    context = HydraContext(config_loader=_NeverComposes(), callbacks=Callbacks())
    launcher.setup(hydra_context=context, task_function=_record_run, config=master)
    assert isinstance(context.config_loader, packing.ComposingLoader)  # the sweeper's keeps
    task = pickle.loads(pickle.dumps(launcher))  # as submitit ships it: the plain loader
    assert isinstance(task.hydra_context.config_loader, _NeverComposes)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: SimpleNamespace(job_id="77_0"))
    runs = [(i, [f"policy={p}"], configs[i]) for i, p in enumerate(["lru", "fifo", "belady"])]
    path = sweep / ".packs" / "x" / "0.pkl"

    def run_task() -> list:
        _RAN.clear()
        hashed.clear()
        packing.write_pack(path, runs, shipped)
        return task([f"{packing.PACK_FILE}{path}"], "hydra.sweep.dir", 0, "job_id_for_0",
                    Singleton.get_state())

    returns = run_task()
    assert not path.exists()  # its runs returned (a failed one too): the task removed it
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED,
                                           JobStatus.COMPLETED]
    assert [r.return_value for r in returns if r.status == JobStatus.COMPLETED] == \
        ["lru", "belady"]
    assert [p for p, _ in _RAN] == ["lru", "fifo", "belady"]
    assert {h for _, h in _RAN} == {digest} and hashed == []
    folders = {Path(r.hydra_cfg.hydra.runtime.output_dir) for r in returns}
    assert len(folders) == 3 and all(f.parent == sweep for f in folders)
    for i, r in enumerate(returns):  # each run its own folder, number, saved config
        assert r.hydra_cfg.hydra.job.num == i and r.hydra_cfg.hydra.job.id == "77_0"
        saved = Path(r.hydra_cfg.hydra.runtime.output_dir) / ".hydra" / "config.yaml"
        assert f"name: {_RAN[i][0]}" in saved.read_text()

    write_deepseek_shaped(trace, requests=3, tokens=4, seed=5)  # rewritten after the sweep
    run_task()
    assert hashed == ["lru"]  # its hash is stale: hashed again, once for the pack
    assert {h for _, h in _RAN} == {real(pickle.loads(configs[0]))} != {digest}

    # The file gone (a requeued copy after the task removed it, or removed by hand): the runs
    # are composed in the task from the overrides that travel beside the file.
    assert not path.exists()
    by_policy = dict(zip(["policy=lru", "policy=fifo", "policy=belady"], configs, strict=True))

    class _ComposesKnown:
        def load_sweep_config(self, master_config: object, sweep_overrides: list[str]) -> object:
            return pickle.loads(by_policy[sweep_overrides[0]])

    task.hydra_context = HydraContext(config_loader=_ComposesKnown(), callbacks=Callbacks())
    _RAN.clear()
    listed = packing.pack([[o] for o in by_policy], 0, 3)[0]
    again = task([f"{packing.PACK_FILE}{path}", *listed], "hydra.sweep.dir", 0, "job_id_for_0",
                 Singleton.get_state())
    assert [p for p, _ in _RAN] == ["lru", "fifo", "belady"] and len(again) == 3
    assert "composing its runs from their overrides" in capsys.readouterr().err


def _age(*paths: Path) -> None:
    """As if written before ``packing.SETTLED_S``: a launch long gone, not one writing now."""
    import os

    from moesim.experiments import packing

    for p in paths:
        old = p.stat().st_mtime - 2 * packing.SETTLED_S
        os.utime(p, (old, old))


def test_tidy_packs_removes_empty_folders_and_counts_the_files_left(tmp_path: Path) -> None:
    """A launcher killed before its tasks returned: the folders whose tasks all removed their
    files go, the files of tasks that never finished (or are still queued) are counted."""
    from moesim.experiments import packing

    packs = tmp_path / ".packs"
    assert not packing.tidy_packs(packs)  # no folder: nothing left
    (packs / "done").mkdir(parents=True)
    (packs / "writing").mkdir()  # a concurrent launch between its mkdir and its first file
    packing.write_pack(packs / "killed" / "0.pkl", [(0, ["policy=lru"], None)], {})
    packing.write_pack(packs / "killed" / "3.pkl", [(3, ["policy=fifo"], None)], {})
    (packs / "cut" / ".0.pkl.tmp").parent.mkdir()
    (packs / "cut" / ".0.pkl.tmp").write_bytes(b"half a pickle")  # a launcher killed mid-write
    (packs / "stray.txt").write_text("not a launch's folder")
    _age(packs / "cut" / ".0.pkl.tmp", packs / "done", packs / "killed", packs / "cut")
    left = packing.tidy_packs(packs)
    assert not (packs / "done").exists() and (packs / "killed").is_dir()
    assert (packs / "writing").is_dir()  # too fresh to be anyone's leftover
    assert not (packs / "cut").exists()
    assert left.files == 2 and left
    size = sum(f.stat().st_size for f in (packs / "killed").glob("*.pkl"))
    assert left.mb == pytest.approx(size / 1e6)


def test_input_files_and_stamps_name_what_a_hash_reads(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from moesim.experiments.packing import file_stamps, input_files

    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.csv").write_text("1")
    (raw / "sub" / "b.csv").write_text("22")
    stamps = file_stamps([str(raw)])
    assert [(Path(n).name, size) for n, size, _ in stamps] == [("a.csv", 1), ("b.csv", 2)]
    (raw / "c.csv").write_text("")
    assert file_stamps([str(raw)]) != stamps  # a file added to a raw folder is a change
    assert file_stamps([str(tmp_path / "gone")])[0][1] == -1
    trace = write_deepseek_shaped(tmp_path / "t.parquet", requests=1, tokens=2, seed=1)
    table = tmp_path / "p.parquet"
    table.write_bytes(b"x")
    cfg = OmegaConf.create({"trace": {"path": str(trace), "format": "parquet"},
                            "predictions": {"path": str(table)}})
    assert input_files(cfg) == sorted([str(trace), str(table)])
    cfg.predictions.path = "predictor:freq"  # its hash covers more than files: not shipped
    assert input_files(cfg) == []


@pytest.mark.slow
def test_packed_local_runs_what_submitit_local_runs_and_resumes(tmp_path: Path) -> None:
    """The same sweep through ``submitit_local`` (every run its own task and process, composed
    there) and ``packed_local`` (composed once, in the sweep's process, several runs one after
    the other in one task): the same folders, saved configs, config hashes and tables; a failing
    run fails alone; both draw the sweep's progress bar from the sweep's own process (counting
    the status files the tasks write); a rerun skips the finished runs.

    (Also what tests/experiments/test_submitit.py's two sweeps checked: a plain submitit_local
    sweep and a packed_local one with two runs per task.)"""
    pytest.importorskip(SUBMITIT)
    import os
    import re

    import pandas as pd

    trace = write_deepseek_shaped(tmp_path / "t.parquet", requests=2, tokens=4, seed=4)
    base = [sys.executable, "-m", "moesim", "sim", "-m", "trace=file", f"trace.path={trace}",
            "policy=lru,belady", "cache.fraction=0.5,-1", "mode=zero_latency", "progress=true",
            "hydra.launcher.timeout_min=5"]
    env = {**os.environ, "COLUMNS": "120"}
    found = {}
    for launcher, extra in (("submitit_local", []),
                            ("packed_local", ["hydra.launcher.runs_per_task=3"])):
        sweep = tmp_path / launcher
        cmd = [*base, f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={sweep}"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]  # a sweep with failed runs
        assert f"sweep {sweep}: 2 done, 0 skipped, 2 failed" in proc.stdout, proc.stdout
        # the bar counts every finished run, failed ones included
        assert re.search(r"sweep: 100%\|[^\n\r]*\| 4/4 ", proc.stderr), proc.stderr[-2000:]
        found[launcher] = (sweep_tables(sweep, status=True), cmd)
    plain, packed = found["submitit_local"][0], found["packed_local"][0]
    assert sorted(plain) == sorted(packed)
    assert sum(k.endswith("/summary.parquet") for k in plain) == 2
    rows = pd.concat([v for k, v in plain.items() if k.endswith("/summary.parquet")])
    assert sorted(rows["policy.name"]) == ["belady", "lru"]
    assert (rows["trace.requests"] == 2).all() and rows["config_hash"].nunique() == 2
    for name, value in plain.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(value, packed[name])  # config hash included
        else:
            assert value == packed[name], name  # the config that ran is Hydra's composition
    # submitit ran every run of the plain sweep as its own task, not Hydra in-process
    assert len(list((tmp_path / "submitit_local").glob(".submitit/*/*_result.pkl"))) == 4
    sweep = tmp_path / "packed_local"
    tasks = sorted(p.parent for p in sweep.glob(".submitit/*/*_result.pkl"))
    assert len(tasks) == 2  # 4 runs, 2 tasks
    # the first task ran lru@0.5, lru@-1 (failed) and belady@0.5 one after the other in its
    # one process: both good runs' results; the second task only belady@-1, which failed
    results = sorted(next(t.glob("*_log.out")).read_text().count("  results: ") for t in tasks)
    assert results == [0, 2], results
    assert not (sweep / ".packs").exists()  # pack files removed once every task returned
    from moesim.experiments import packing

    # a launcher killed earlier: one folder its tasks emptied, one task that never finished
    (sweep / ".packs" / "emptied").mkdir(parents=True)
    packing.write_pack(sweep / ".packs" / "killed" / "1.pkl", [(1, ["policy=lru"], None)], {})
    _age(sweep / ".packs" / "emptied", sweep / ".packs" / "killed")
    again = subprocess.run(found["packed_local"][1], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "note: 1 pack file(s) of earlier launches" in again.stderr, again.stderr[-3000:]
    assert sorted(p.name for p in (sweep / ".packs").iterdir()) == ["killed"]
    assert f"sweep {sweep}: 0 done, 2 skipped, 2 failed" in again.stdout
