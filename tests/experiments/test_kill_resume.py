"""Kill a running ``moesim-sim`` sweep with SIGKILL, rerun the same command, and check that it
resumes: finished runs are skipped and left untouched, the rest run, nothing partial is left
behind, and the results equal those of a sweep that was never interrupted."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from moesim.traces import write_trace
from tests.helpers import random_trace

ROOT = Path(__file__).resolve().parents[2]
# The subprocesses import this checkout, whatever else is installed (or not) as ``moesim``.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
TIMEOUT_S = 180.0  # generous: only ever reached when something is broken
METRICS = [
    "config_hash", "accesses", "hits", "late_hits", "misses", "hit_rate", "stall_time_s",
    "stall_miss_s", "stall_late_s", "total_time_s", "stall_per_output_token_s",
    "demand_fetches", "demand_bytes", "evictions",
]
ALREADY_DONE = re.compile(r"^already done \((\w+)\): (.+)$", re.MULTILINE)


def _trace(path: Path, num_requests: int, tokens: int) -> Path:
    """Synthetic routing with DeepSeek-V2-Lite's shape, as in ``test_app.py``."""
    tr = random_trace(num_requests=num_requests, tokens=tokens, layers=26, experts=64,
                      top_k=6, seed=3)
    meta = tr.meta.__class__(
        model="deepseek_v2_lite", moe_layers=tuple(range(1, 27)), num_experts=64, top_k=6,
        expert_bytes=17301504, source="synthetic test fixture",
    )
    write_trace(path, meta, tr.requests)
    return path


@pytest.fixture(scope="module")
def slow_trace(tmp_path_factory) -> Path:
    """Large enough that one run takes a few tenths of a second in the Python engine, so a
    five-run sweep is still busy for well over a second after its first run has finished."""
    return _trace(tmp_path_factory.mktemp("trace") / "slow.parquet", num_requests=6, tokens=100)


def _sweep_args(trace: Path, sweep: Path, fractions=FRACTIONS) -> list[str]:
    return [
        "-m", "hydra/launcher=basic", "trace=file", f"trace.path={trace}", "policy=lru",
        "mode=timed", "engine=python", "seed=0", "progress=false",
        f"cache.fraction={','.join(map(str, fractions))}", f"hydra.sweep.dir={sweep}",
    ]


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """The app in its own process group (so the whole group can be killed), output to a file
    (a pipe nobody reads could fill up and stall it)."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "moesim.experiments.sim_app", *args],
                                cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim.experiments.sim_app", *args], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited between poll and kill
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)


def _poll(condition: Callable[[], bool], proc: subprocess.Popen) -> bool:
    """Poll ``condition`` until it holds, ``proc`` exits or the timeout passes."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.005)
    return False


def _run_dirs(sweep: Path) -> list[Path]:
    """Every run directory Hydra created (each holds ``.hydra/config.yaml``)."""
    return sorted(p.parent.parent for p in sweep.rglob("config.yaml") if p.parent.name == ".hydra")


def _finished(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("summary.parquet"))


def _temp_files(sweep: Path) -> list[Path]:
    """Leftovers of ``traces.store.atomic_path``: ``.<name>.<12 hex>.tmp`` beside the target."""
    return sorted(p for p in sweep.rglob("*") if p.name.endswith(".tmp"))


def _summaries(sweep: Path) -> pd.DataFrame:
    df = pd.concat([pd.read_parquet(d / "summary.parquet").assign(run=str(d.relative_to(sweep)))
                    for d in _finished(sweep)], ignore_index=True)
    return df.sort_values("cache.fraction").reset_index(drop=True)


def test_killed_sweep_resumes_and_matches_an_uninterrupted_one(slow_trace, tmp_path):
    sweep, fresh = tmp_path / "sweep", tmp_path / "fresh"
    # The uninterrupted reference sweep runs beside the one that gets killed (two cores).
    ref = _start(_sweep_args(slow_trace, fresh), tmp_path, tmp_path / "fresh.log")
    try:
        _kill_resume_and_compare(slow_trace, tmp_path, sweep, fresh, ref)
    finally:
        _kill_group(ref)  # only still running if the test failed


def _kill_resume_and_compare(trace, tmp_path, sweep, fresh, ref):
    victim = _start(_sweep_args(trace, sweep), tmp_path, tmp_path / "victim.log")
    try:
        # Kill as soon as one run is complete (summary and per-layer table), so the kill lands in
        # the next run's simulation; see the crash-point tests below for kills during a write.
        first_done = _poll(
            lambda: any((d / "per_layer.parquet").is_file() for d in _finished(sweep)), victim)
    finally:
        _kill_group(victim)
    log = (tmp_path / "victim.log").read_text()
    assert first_done, f"no run finished before the sweep stopped:\n{log[-3000:]}"
    assert victim.returncode == -signal.SIGKILL, log[-3000:]

    done_before = _finished(sweep)
    assert 1 <= len(done_before) < len(FRACTIONS), "the kill must land mid-sweep"
    before = {d: ((d / "summary.parquet").stat().st_mtime_ns,
                  (d / "summary.parquet").read_bytes(),
                  (d / "per_layer.parquet").read_bytes()) for d in done_before}

    # Rerun the very same command: it skips what finished and completes the rest.
    again = _run(_sweep_args(trace, sweep), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = {Path(d).resolve(): h for h, d in ALREADY_DONE.findall(again.stdout)}
    assert set(skipped) == {d.resolve() for d in done_before}, again.stdout
    for d, digest in skipped.items():
        assert pd.read_parquet(d / "summary.parquet")["config_hash"].iloc[0] == digest
    assert again.stdout.count("  results: ") == len(FRACTIONS) - len(done_before)
    for d, (mtime, summary, per_layer) in before.items():  # not rewritten
        assert (d / "summary.parquet").stat().st_mtime_ns == mtime
        assert (d / "summary.parquet").read_bytes() == summary
        assert (d / "per_layer.parquet").read_bytes() == per_layer

    # Every run is now complete, and no temporary file of an interrupted write is left.
    runs = _run_dirs(sweep)
    assert len(runs) == len(FRACTIONS)
    for d in runs:
        assert (d / "summary.parquet").is_file() and (d / "per_layer.parquet").is_file(), d
    assert _temp_files(sweep) == []

    # Same seed, same config: the resumed sweep equals the uninterrupted one, run by run.
    ref.wait(timeout=TIMEOUT_S)
    assert ref.returncode == 0, (tmp_path / "fresh.log").read_text()[-3000:]
    resumed, reference = _summaries(sweep), _summaries(fresh)
    assert list(resumed["cache.fraction"]) == list(FRACTIONS)
    assert list(resumed["run"]) == list(reference["run"])  # same run directories
    pd.testing.assert_frame_equal(resumed[METRICS], reference[METRICS])
    for rel in resumed["run"]:
        pd.testing.assert_frame_equal(pd.read_parquet(sweep / rel / "per_layer.parquet"),
                                      pd.read_parquet(fresh / rel / "per_layer.parquet"))


# ----------------------------------------------------------------------------------------------
# Kills at exact points of a run's writes. The app is started through a wrapper that SIGKILLs
# its own process just before or just after the atomic rename (``os.replace``) of one output.

_CRASH_AT = """
import os, signal, sys
from pathlib import Path

when, name = sys.argv[1], sys.argv[2]
_replace = os.replace

def replace(src, dst, *args, **kwargs):
    hit = Path(dst).name == name
    if hit and when == "before":  # temp file fully written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
sys.argv = ["moesim-sim", *sys.argv[3:]]
from moesim.experiments.sim_app import main
main()
"""


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory) -> Path:
    return _trace(tmp_path_factory.mktemp("trace") / "tiny.parquet", num_requests=2, tokens=4)


@pytest.mark.parametrize("when, name, check", [
    # summary.parquet is written last and marks a run finished: a kill after the per-layer
    # table but before the summary must make the rerun redo that run, not skip it
    pytest.param("after", "per_layer.parquet", "outputs", id="between-per-layer-and-summary"),
    # a write killed before its rename leaves a temporary that the rerun removes
    pytest.param("before", "per_layer.parquet", "temp", id="mid-write-of-per-layer"),
])
def test_kill_at_a_write_then_resume(when, name, check, tiny_trace, tmp_path):
    sweep = tmp_path / "sweep"
    args = _sweep_args(tiny_trace, sweep, fractions=(0.1, 0.5))
    crash = subprocess.run([sys.executable, "-c", _CRASH_AT, when, name, *args], cwd=tmp_path,
                           env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    again = _run(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = _run_dirs(sweep)
    assert len(runs) == 2 and len(_finished(sweep)) == 2
    if check == "outputs":
        assert [d for d in runs if not (d / "per_layer.parquet").is_file()] == []
    else:
        assert _temp_files(sweep) == []
