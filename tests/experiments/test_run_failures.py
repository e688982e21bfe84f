"""Issue 25: what a run records and how it fails. Effective values are recorded (the asked
ones beside them), a full or read-only output folder is one line before the run, a failure
while writing leaves status "failed" and no table, Hydra's own errors are one line with exit 2
and Ctrl-C is one line with exit 130."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from moesim.experiments import sim_app
from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.schema import check
from moesim.traces import write_trace
from tests.helpers import random_trace

register_configs()


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 requests of 5 tokens with the embedded model's shape (its card is found by name)."""
    from moesim.traces.collect.embedded import embedded_routing
    from moesim.traces.store import read_meta

    meta = read_meta(embedded_routing())
    tr = random_trace(num_requests=3, tokens=5, layers=meta.num_moe_layers,
                      experts=meta.num_experts, top_k=meta.top_k, seed=2)
    path = tmp_path_factory.mktemp("runfail") / "t.parquet"
    write_trace(path, meta, tr.requests)
    return path


def _cfg(trace: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["trace=file", f"trace.path={trace}",
                                           "progress=false", "engine=python", *overrides])
    assert check(cfg) == []
    return cfg


def test_effective_values_are_recorded_with_the_asked_ones_beside(small_trace: Path) -> None:
    _, row = sim_app.run(_cfg(small_trace, "batch=100", "max_requests=50", "max_tokens=4",
                              "mode=zero_latency"))
    assert (row["batch"], row["batch_requested"]) == (3, 100)
    assert (row["max_requests"], row["max_requests_requested"]) == (3, 50)
    assert row["max_tokens"] == 4 and "max_tokens_requested" not in row
    _, row = sim_app.run(_cfg(small_trace, "batch=2", "mode=zero_latency"))
    assert row["batch"] == 2 and "batch_requested" not in row


def test_a_failure_while_writing_keeps_no_table(small_trace: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    result, row = sim_app.run(_cfg(small_trace, "mode=zero_latency"))
    written = []
    real = sim_app._atomic_parquet

    def full_after_one(df: pd.DataFrame, path: Path) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        real(df, path)

    monkeypatch.setattr(sim_app, "_atomic_parquet", full_after_one)
    why = sim_app.write_run(result, row, tmp_path)
    assert why is not None and "No space left on device" in why and "none kept" in why
    assert written and not any(tmp_path.iterdir())  # the table written first is gone too
    monkeypatch.setattr(sim_app, "write_status", lambda *a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    assert isinstance(sim_app._fail(tmp_path, [why]), sim_app._RunFailed)  # no traceback


def test_the_output_folder_is_checked_before_the_run(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert sim_app.check_outdir(tmp_path / "new") is None and not list(
        (tmp_path / "new").iterdir())
    (tmp_path / "file").write_text("x")
    assert "not writable" in sim_app.check_outdir(tmp_path / "file" / "run")
    monkeypatch.setattr(sim_app.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20}))
    assert "1.0 MiB free, a run needs 64 MiB" in sim_app.check_outdir(tmp_path)


def test_a_failed_status_says_why(tmp_path: Path) -> None:
    sim_app._fail(tmp_path, ["writing the results: disk full"])
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "status": "failed", "error": "writing the results: disk full"}


@pytest.mark.parametrize(("raised", "code", "line"), [
    (KeyboardInterrupt(), 130, "interrupted; rerun resumes"),
    (ConfigCompositionException("Could not override 'foo'.\nTo append to your config use "
                                "+foo=1"), 2, "error: foo: not a moesim-sim option"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/x"), 2,
     "error: /proc/x: No such file or directory"),
])
def test_main_turns_input_errors_and_ctrl_c_into_one_line(
        raised: BaseException, code: int, line: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def boom() -> None:
        raise raised

    monkeypatch.setattr(sim_app, "_hydra_main", boom)
    monkeypatch.setattr(sys, "argv", ["moesim-sim"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it; undone after the test
    with pytest.raises(SystemExit) as exit_:
        sim_app.main()
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(line), err


def test_a_bug_inside_a_run_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_app, "_run_checked", lambda *a: 1 / 0)
    monkeypatch.setattr(sim_app, "_hydra_main", lambda: sim_app._run_in(Path("."), None))
    monkeypatch.setattr(sys, "argv", ["moesim-sim"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(ZeroDivisionError):
        sim_app.main()


@pytest.mark.parametrize(("override", "line"), [
    ("foo=1", "error: foo: not a moesim-sim option"),  # Hydra's composition error
    ("cache=null", "error: cache=null: a config group takes one of its options"),
    ("policy=nonesuch", "error: In 'config': Could not find 'policy/nonesuch'; Available "
                        "options in 'policy': belady, "),
    ("seed=${oc.env:MOESIM_T25_UNSET}", "error: KeyError raised while resolving interpolation: "
                                        "\"Environment variable 'MOESIM_T25_UNSET' not found"),
])
def test_hydra_errors_are_one_line(override: str, line: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["moesim-sim", override, f"hydra.run.dir={tmp_path}/r"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as exit_:
        sim_app.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err


def test_the_command_exits_2_with_one_line(tmp_path: Path) -> None:
    """The exit-code contract end to end, in a process of its own."""
    proc = subprocess.run(
        [sys.executable, "-c", "from moesim.experiments.sim_app import main; main()", "+foo=1",
         "progress=false", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "error: +foo=1: foo is not a moesim-sim option (moesim-sim --help " \
        "lists them)\n"
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "+foo=1" in status["error"]
    assert not (tmp_path / "run" / "summary.parquet").exists()
