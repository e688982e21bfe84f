"""A first small run with cold kernels: SimPy plus a background compile, and the compile lock
that keeps two processes from compiling the same kernels side by side (sim.compiled.warm,
sim.compiled.stamp)."""

from __future__ import annotations

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


@pytest.mark.parametrize(("engine", "accesses", "single", "cached", "env", "want"), [
    ("auto", 80_000, True, False, "1", "python"),
    ("auto", warm.SMALL_RUN_ACCESSES, True, False, "1", "python"),
    ("auto", warm.SMALL_RUN_ACCESSES + 1, True, False, "1", "auto"),  # worth compiling
    ("auto", 80_000, False, False, "1", "auto"),  # a sweep compiles once for its runs
    ("auto", 80_000, True, True, "1", "auto"),  # compiled already
    ("auto", 80_000, True, False, "0", "auto"),  # the rule is off
    ("compiled", 80_000, True, False, "1", "compiled"),  # asked for: kept
    ("python", 80_000, True, False, "1", "python"),
])
def test_cold_start_engine(monkeypatch: pytest.MonkeyPatch, engine: str, accesses: int,
                           single: bool, cached: bool, env: str, want: str) -> None:
    monkeypatch.setenv(warm.ENV, env)
    monkeypatch.setattr(warm, "kernels_cached", lambda: cached)
    assert warm.cold_start_engine(engine, accesses, single) == want


def test_cli_engine_small_cold_run_starts_one_background_compile(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    started: list[int] = []
    monkeypatch.setenv(warm.ENV, "1")
    monkeypatch.setattr(warm, "kernels_cached", lambda: False)
    monkeypatch.setattr(warm, "start", lambda: started.append(1) or True)
    monkeypatch.setattr(sim_app.HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(sim_app.HydraConfig, "get", staticmethod(
        lambda: OmegaConf.create({"mode": "RUN"})))
    monkeypatch.setattr(sim_app, "RunMode", type("RunMode", (), {"RUN": "RUN"}))
    cfg = OmegaConf.create({"engine": "auto"})
    small = _trace(tokens=10)  # 10 x 2 layers x top-2 = 40 accesses
    assert sim_app._engine(cfg, small, streamed=False) == "python"
    assert started == [1] and capsys.readouterr().err.strip() == warm.NOTICE
    big = _trace(tokens=warm.SMALL_RUN_ACCESSES // 4 + 1)
    assert sim_app._engine(cfg, big, streamed=False) == "auto"
    assert sim_app._engine(cfg, small, streamed=True) == "auto"  # streaming is compiled only
    monkeypatch.setattr(sim_app.HydraConfig, "initialized", staticmethod(lambda: False))
    assert sim_app._engine(cfg, small, streamed=False) == "auto"  # a library call compiles
    assert started == [1] and capsys.readouterr().err == ""


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
