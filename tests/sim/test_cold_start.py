"""A first small run with cold kernels: SimPy plus a background compile, and the compile lock
that keeps two processes from compiling the same kernels side by side (sim.compiled.warm,
sim.compiled.stamp)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from moesim.experiments import sim_app
from moesim.sim.compiled import stamp, warm
from moesim.traces.trace import DECODE, RequestRouting, Trace, TraceMeta

pytest.importorskip("fcntl")


def _trace(tokens: int, layers: int = 2, k: int = 2) -> Trace:
    meta = TraceMeta(model="mixtral_8x7b", moe_layers=tuple(range(layers)), num_experts=8,
                     top_k=k)
    ex = np.zeros((tokens, layers, k), np.int16)
    ex[:, :, 1] = 1
    return Trace(meta, [RequestRouting(0, ex, np.full(tokens, DECODE, np.uint8))])


def test_kernels_cached_reads_the_replay_index(tmp_path: Path) -> None:
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert not stamp.kernels_cached(tmp_path)
    (tmp_path / f"kernel._other-3.{tag}.nbi").write_bytes(b"")
    (tmp_path / "kernel.replay-120.py29.nbi").write_bytes(b"")  # another Python's
    assert not stamp.kernels_cached(tmp_path)
    (tmp_path / f"kernel.replay-120.{tag}.nbi").write_bytes(b"")
    assert stamp.kernels_cached(tmp_path)


def _try_lock(folder: Path, blocking: bool) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from moesim.sim.compiled.stamp import compile_lock
        with compile_lock(Path({str(folder)!r}), blocking={blocking}) as state:
            print(state)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)


def test_compile_lock_excludes_another_process(tmp_path: Path) -> None:
    with stamp.compile_lock(tmp_path) as state:
        assert state == "held" and stamp.lock_held_here(tmp_path)
        assert _try_lock(tmp_path, blocking=False).stdout.strip() == "busy"
        with stamp.compile_lock(tmp_path) as again:  # this process's own compile: no wait
            assert again == "held"
        assert stamp.lock_held_here(tmp_path)
    assert not stamp.lock_held_here(tmp_path)
    after = _try_lock(tmp_path, blocking=False)
    assert after.stdout.strip() == "held" and stamp.WAITING not in after.stderr


def test_compile_lock_waits_and_says_so(tmp_path: Path) -> None:
    """The waiter says it waits, and gets the lock once the holder lets go (the holder keeps
    it until the waiter has said so: no race with a slow start)."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from moesim.sim.compiled.stamp import compile_lock
        with compile_lock(Path({str(tmp_path)!r}), blocking=True) as state:
            print(state, flush=True)
    """)
    lock = stamp.compile_lock(tmp_path)
    assert lock.__enter__() == "held"
    waiter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert waiter.stderr is not None
        assert waiter.stderr.readline().strip() == stamp.WAITING
    finally:
        lock.__exit__(None, None, None)
        out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "held"


def test_compile_lock_without_flock_runs_unlocked(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that cannot lock (Lustre without flock, NFS without locking) is not a
    lock held by someone else: the block runs unlocked, never waits, never raises."""
    import errno
    import fcntl

    def no_flock(handle: object, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    for blocking in (True, False):
        with stamp.compile_lock(tmp_path, blocking=blocking) as state:
            assert state == "none"


@pytest.mark.parametrize(("engine", "accesses", "kind", "cached", "busy", "env", "want"), [
    ("auto", 80_000, "run", False, False, "1", "python"),
    ("auto", warm.SMALL_RUN_ACCESSES, "run", False, False, "1", "python"),
    ("auto", warm.SMALL_RUN_ACCESSES + 1, "run", False, False, "1", "auto"),  # worth compiling
    ("auto", 80_000, "sweep", False, False, "1", "python"),  # a sweep's small run: no wait
    ("auto", warm.SMALL_RUN_ACCESSES + 1, "sweep", False, False, "1", "auto"),
    ("auto", 80_000, "sweep", True, True, "1", "python"),  # being compiled: it would wait
    ("auto", 80_000, "run", True, True, "1", "python"),
    ("auto", 80_000, "run", True, False, "1", "auto"),  # compiled already
    ("auto", 80_000, "sweep", True, False, "1", "auto"),
    ("auto", 80_000, None, False, False, "1", "auto"),  # a library call compiles
    ("auto", 80_000, "run", False, False, "0", "auto"),  # the rule is off
    ("auto", 80_000, "sweep", False, False, "0", "auto"),
    ("compiled", 80_000, "sweep", False, False, "1", "compiled"),  # asked for: kept
    ("python", 80_000, "run", False, False, "1", "python"),
])
def test_cold_start_engine(monkeypatch: pytest.MonkeyPatch, engine: str, accesses: int,
                           kind: warm.RunKind | None, cached: bool, busy: bool, env: str,
                           want: str) -> None:
    monkeypatch.setenv(warm.ENV, env)
    monkeypatch.delenv(warm.BATCH_JOB, raising=False)
    monkeypatch.setattr(warm, "kernels_cached", lambda: cached)
    monkeypatch.setattr(warm, "compiling", lambda: busy)
    assert warm.cold_start_engine(engine, accesses, kind) == want


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_a_slurm_job_compiles_in_its_own_process(monkeypatch: pytest.MonkeyPatch,
                                                 kind: warm.RunKind) -> None:
    """Inside a SLURM job the scheduler would kill a detached compile with the task."""
    monkeypatch.setenv(warm.ENV, "1")
    monkeypatch.setenv(warm.BATCH_JOB, "12345")
    monkeypatch.setattr(warm, "kernels_cached", lambda: False)
    monkeypatch.setattr(warm, "compiling", lambda: False)
    assert warm.cold_start_engine("auto", 80_000, kind) == "auto"


def _hydra_mode(monkeypatch: pytest.MonkeyPatch, mode: str | None) -> None:
    """``sim_app._engine`` inside a Hydra run (``RUN``), a sweep's run (``MULTIRUN``), or
    outside Hydra (None: a library call)."""
    monkeypatch.setattr(sim_app.HydraConfig, "initialized", staticmethod(lambda: mode is not None))
    monkeypatch.setattr(sim_app.HydraConfig, "get", staticmethod(
        lambda: OmegaConf.create({"mode": mode})))
    monkeypatch.setattr(sim_app, "RunMode", type("RunMode", (), {"RUN": "RUN"}))


def test_cli_engine_small_cold_run_starts_one_background_compile(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    started: list[bool] = []
    monkeypatch.setenv(warm.ENV, "1")
    monkeypatch.setattr(warm, "kernels_cached", lambda: False)
    monkeypatch.setattr(warm, "compiling", lambda: False)
    monkeypatch.setattr(warm, "start", lambda once=False: started.append(once) or "started")
    _hydra_mode(monkeypatch, "RUN")
    cfg = OmegaConf.create({"engine": "auto"})
    small = _trace(tokens=10)  # 10 x 2 layers x top-2 = 40 accesses
    assert sim_app._engine(cfg, small, streamed=False) == "python"
    assert started == [False] and capsys.readouterr().err.strip() == warm.NOTICE
    big = _trace(tokens=warm.SMALL_RUN_ACCESSES // 4 + 1)
    assert sim_app._engine(cfg, big, streamed=False) == "auto"
    assert sim_app._engine(cfg, small, streamed=True) == "auto"  # streaming is compiled only
    _hydra_mode(monkeypatch, None)
    assert sim_app._engine(cfg, small, streamed=False) == "auto"  # a library call compiles
    assert started == [False] and capsys.readouterr().err == ""


def _lock_here(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[int]:
    """The compile lock and cache in ``folder``; the background compile replaced by keeping a
    duplicate of the lock's descriptor (the lock stays taken, as the compile process would
    hold it): returns that list of descriptors."""
    held: list[int] = []
    monkeypatch.setattr(stamp, "cache_folder", lambda func=None: folder)
    monkeypatch.setattr(warm, "kernels_cached", lambda: stamp.kernels_cached(folder))

    def spawn(fd: int | None) -> str:
        assert fd is not None  # handed the lock
        held.append(os.dup(fd))
        return "started"

    monkeypatch.setattr(warm, "_spawn", spawn)
    return held


def test_cli_engine_sweep_starts_the_compile_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """A sweep's small runs with cold kernels: SimPy, one compile started and one notice for
    the sweep (the lock it holds makes the others only run on SimPy); once the compile has
    finished and the kernels are cached, the compiled engine."""
    held = _lock_here(monkeypatch, tmp_path)
    monkeypatch.setenv(warm.ENV, "1")
    _hydra_mode(monkeypatch, "MULTIRUN")
    cfg = OmegaConf.create({"engine": "auto"})
    small = _trace(tokens=10)
    try:
        assert [sim_app._engine(cfg, small, streamed=False) for _ in range(4)] == ["python"] * 4
        assert len(held) == 1 and warm.compiling()
        assert capsys.readouterr().err.strip() == warm.SWEEP_NOTICE  # once
        assert _try_lock(tmp_path, blocking=False).stdout.strip() == "busy"  # other workers
        tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        (tmp_path / f"kernel.replay-1.{tag}.nbi").write_bytes(b"")  # compiling: not done
        assert sim_app._engine(cfg, small, streamed=False) == "python"
    finally:
        for fd in held:
            os.close(fd)  # the compile has finished
    assert not warm.compiling()
    assert sim_app._engine(cfg, small, streamed=False) == "auto"
    assert len(held) == 1 and capsys.readouterr().err == ""


def test_start_hands_the_lock_to_the_compile(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """``start`` starts ``python -m moesim.sim.compiled.warm --lock-fd N`` holding the lock, and
    the lock stays taken after this process lets go of its descriptor."""
    seen: list[tuple[list[str], tuple[int, ...]]] = []

    class Popen:
        def __init__(self, args: list[str], **kw: object) -> None:
            fds = kw["pass_fds"]
            assert isinstance(fds, tuple)
            seen.append((args, fds))
            held.extend(os.dup(fd) for fd in fds)

    held: list[int] = []
    monkeypatch.setattr(stamp, "cache_folder", lambda func=None: tmp_path)
    monkeypatch.setattr(warm, "kernels_cached", lambda: False)
    monkeypatch.setattr(warm.subprocess, "Popen", Popen)
    try:
        assert warm.start(once=True) == "started"
        ((args, fds),) = seen
        assert args[-4:] == ["-m", "moesim.sim.compiled.warm", "--lock-fd", str(fds[0])]
        assert warm.start(once=True) == "busy" and len(seen) == 1
    finally:
        for fd in held:
            os.close(fd)
    monkeypatch.setattr(warm, "kernels_cached", lambda: True)
    assert warm.start(once=True) == "ready" and len(seen) == 1


def test_start_without_flock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where nothing can lock, a sweep's run starts nothing (one compile per run would run side
    by side; it compiles in its process instead), a single run starts the compile unlocked."""
    import errno
    import fcntl

    def no_flock(handle: object, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    spawned: list[int | None] = []
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(stamp, "cache_folder", lambda func=None: tmp_path)
    monkeypatch.setattr(warm, "kernels_cached", lambda: False)
    monkeypatch.setattr(warm, "_spawn", lambda fd: spawned.append(fd) or "started")
    assert warm.start(once=True) == "unlocked" and spawned == []
    assert warm.start(once=False) == "started" and spawned == [None]
    monkeypatch.setenv(warm.ENV, "1")
    _hydra_mode(monkeypatch, "MULTIRUN")
    cfg = OmegaConf.create({"engine": "auto"})
    assert sim_app._engine(cfg, _trace(tokens=10), streamed=False) == "auto"


_SWEEP = """
import os, sys
from pathlib import Path
from moesim.sim.compiled import warm

log = Path(sys.argv[1])


def spawn(fd):  # the compile process, replaced: keep the lock taken, as it would
    with log.open("a") as out:
        out.write(f"{os.getpid()}\\n")
    os.dup(fd)
    return "started"


warm._spawn = spawn
from moesim.experiments.sim_app import main

sys.argv = ["moesim-sim", "-m", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("launcher", ["basic", "packed_fork"])
def test_small_sweep_with_cold_kernels(tmp_path: Path, launcher: str) -> None:
    """A small sweep in a fresh process with an empty numba cache: its runs record SimPy as
    their engine, one compile is started for the sweep (not one per run) and one notice
    printed; the sweep's processes compiled no kernel (small helpers the SimPy engine calls,
    such as ``steps.count_valid``, compile in seconds)."""
    cache, log = tmp_path / "numba", tmp_path / "spawned.txt"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), warm.ENV: "1"}
    args = ["mode=zero_latency", "policy=lru,fifo", "cache.fraction=0.1,0.25",
            "max_requests=8", "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if launcher != "basic":
        args += [f"hydra/launcher={launcher}", "hydra.launcher.n_jobs=2"]
    done = subprocess.run([sys.executable, "-c", _SWEEP, str(log), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    import pandas as pd

    rows = pd.concat(pd.read_parquet(f) for f in (tmp_path / "sweep").rglob("summary.parquet"))
    assert len(rows) == 4 and set(rows["sim_engine"]) == {"python"}
    assert len(log.read_text().split()) == 1
    assert done.stderr.count(warm.SWEEP_NOTICE) == 1 and warm.NOTICE not in done.stderr
    assert not list(cache.rglob("kernel.*.nbi"))  # the sweep compiled no kernel itself


def test_background_compile_steps_aside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``python -m moesim.sim.compiled.warm`` compiles only with cold kernels and a free lock."""
    calls: list[int] = []
    monkeypatch.setattr(stamp, "cache_folder", lambda func=None: tmp_path)
    monkeypatch.setattr(warm, "compile_kernels", lambda: calls.append(1))
    held = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from moesim.sim.compiled.stamp import compile_lock
        with compile_lock(Path({str(tmp_path)!r})) as state:
            print(state, flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with held:  # another process compiling
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().strip() == "held"
        assert warm.main() == 0 and calls == []
        held.stdin.write("\n")
        held.stdin.flush()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    (tmp_path / f"kernel.replay-1.{tag}.nbi").write_bytes(b"")  # compiled meanwhile
    assert warm.main() == 0 and calls == []
    (tmp_path / f"kernel.replay-1.{tag}.nbi").unlink()
    assert warm.main() == 0 and calls == [1]


def test_background_compile_takes_over_the_handed_lock(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """``warm --lock-fd N`` lets go of the inherited descriptor and compiles holding the lock
    the engine's own takes recognise (no wait on itself), then frees it."""
    import fcntl

    during: list[tuple[bool, str]] = []
    monkeypatch.setattr(stamp, "cache_folder", lambda func=None: tmp_path)
    monkeypatch.setattr(warm, "compile_kernels", lambda: during.append(
        (stamp.lock_held_here(tmp_path), _try_lock(tmp_path, blocking=False).stdout.strip())))
    fd = os.open(tmp_path / stamp._LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as start() hands it over
    assert _try_lock(tmp_path, blocking=False).stdout.strip() == "busy"
    assert warm.main(["--lock-fd", str(fd)]) == 0
    assert during == [(True, "busy")]
    assert _try_lock(tmp_path, blocking=False).stdout.strip() == "held"


def test_a_failed_background_compile_is_not_started_again(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """A background compile that fails marks the current sources: later small runs compile in
    their own process (which reports the error) instead of each starting another that fails;
    an edit of the sources (a new digest) or a compile that succeeds clears the mark."""
    monkeypatch.setattr(stamp, "cache_folder", lambda func=None: tmp_path)
    monkeypatch.setenv(warm.ENV, "1")
    monkeypatch.delenv(warm.BATCH_JOB, raising=False)
    monkeypatch.setattr(warm, "kernels_cached", lambda: False)
    monkeypatch.setattr(warm, "compiling", lambda: False)
    (tmp_path / stamp._NAME).write_text("digest-1")

    def boom() -> None:
        raise RuntimeError("numba failed")

    monkeypatch.setattr(warm, "compile_kernels", boom)
    assert warm.cold_start_engine("auto", 80_000, "sweep") == "python"
    with pytest.raises(RuntimeError, match="numba failed"):
        warm.main()
    assert stamp.compile_failed(tmp_path)
    assert warm.cold_start_engine("auto", 80_000, "sweep") == "auto"
    assert warm.cold_start_engine("auto", 80_000, "run") == "auto"
    (tmp_path / stamp._NAME).write_text("digest-2")  # the sources changed: try again
    assert not stamp.compile_failed(tmp_path)
    assert warm.cold_start_engine("auto", 80_000, "sweep") == "python"
    with pytest.raises(RuntimeError):
        warm.main()
    monkeypatch.setattr(warm, "compile_kernels", lambda: None)
    assert warm.main() == 0 and not stamp.compile_failed(tmp_path)
