"""Sweeps that share a folder, sweeps that are killed, and override values that would escape
the sweep folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moesim.experiments.paths import MAX_NAME, safe_dirname
from tests.helpers import write_deepseek_shaped


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_deepseek_shaped(tmp_path_factory.mktemp("conc") / "t.parquet", 3, 6, 5)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from moesim.experiments.sim_app import main; main()", *args]


def test_safe_dirname() -> None:
    assert safe_dirname("policy=lru,cache.fraction=0.1") == "policy=lru,cache.fraction=0.1"
    for bad in ("../../x", "/abs/path", "..", ".hidden", "a/../../b"):
        name = safe_dirname(bad)
        assert "/" not in name and not name.startswith(".") and name
    long = safe_dirname("x" * 500)
    assert len(long) == MAX_NAME and long != safe_dirname("x" * 499)


def test_two_identical_sweeps_into_one_folder(trace_file: Path, tmp_path: Path) -> None:
    """Each run folder is locked: the second sweep waits for a run, then skips it."""
    args = _cmd("-m", "trace=file", f"trace.path={trace_file}", "policy=lru,belady",
                "cache.fraction=0.1,0.5", "progress=false", f"hydra.sweep.dir={tmp_path}/sweep")
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert len(list((tmp_path / "sweep").rglob("summary.parquet"))) == 4
    skipped = sum(out.count("already done") for out, _ in outs)
    ran = sum(out.count("results:") for out, _ in outs)
    assert (ran, skipped) == (4, 4)  # every run folder ran exactly once
    assert not list((tmp_path / "sweep").rglob(".*.tmp"))


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie has exited; only its parent's reaping is left


def workers_left_after_killing(proc: subprocess.Popen, sweep: Path) -> list[tuple[int, bytes]]:
    """SIGKILL a sweep's process once two workers exist and one is inside a run; return the
    workers still alive 20 s later (pid, cmdline), after killing them too so that they do not
    outlive the test."""
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = {p for p in _descendants(proc.pid) if _alive(p)}
        started = list(sweep.glob("*/.hydra"))  # a worker is inside a job
        if len(workers) >= 2 and started:
            break
        time.sleep(0.2)
    assert proc.poll() is None and workers, "sweep ended before its workers could be seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    left = [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:200]) for p in workers if _alive(p)]
    for p, _ in left:  # don't leave them to the rest of the suite either
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_killing_a_joblib_sweep_leaves_no_workers(tmp_path: Path) -> None:
    path = write_deepseek_shaped(tmp_path / "big.parquet", 30, 40, 9)
    proc = subprocess.Popen(
        _cmd("-m", "trace=file", f"trace.path={path}", "policy=belady,lfu,least_stale",
             "cache.fraction=0.1,0.2,0.3,0.4", "engine=python", "progress=false",
             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
             f"hydra.sweep.dir={tmp_path}/sweep"),
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    left = workers_left_after_killing(proc, tmp_path / "sweep")
    assert not left, f"workers outlived the killed sweep: {left}"


def test_a_bad_run_fails_alone_and_the_sweep_says_so(trace_file: Path, tmp_path: Path) -> None:
    """Also: override values that would escape the sweep folder (``label=../../../x``, the
    absolute trace path) stay inside it, one folder level below it (was a sweep of its own)."""
    sweep = tmp_path / "a" / "b" / "sweep"
    args = _cmd("-m", "trace=file", f"trace.path={trace_file}", "cache.fraction=0.1,2,0.3",
                "label=../../../x", "progress=false", f"hydra.sweep.dir={sweep}")
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"sweep {sweep}: 2 done, 0 skipped, 1 failed" in proc.stdout
    assert "error: cache.fraction=2: must be <= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    found = list(tmp_path.rglob("summary.parquet"))
    assert len(found) == 2
    # One folder level below the sweep: neither ../ nor the absolute trace path nested it.
    assert all(f.parent.parent == sweep for f in found), found
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "0 done, 2 skipped, 1 failed" in again.stdout
