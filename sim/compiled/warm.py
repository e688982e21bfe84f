"""A first run, or a first sweep, that does not wait for the compiler.

Compiling the kernels costs ~40-70 CPU-s once (a fresh install, or any edit under
``sim/compiled/``), while a small run, such as the README's first command on the embedded trace
(~80 k expert accesses), takes the SimPy engine about a second: the same results, run for run
(the engine-equality tests). So a ``moesim-sim`` run with ``engine=auto`` and at most
:data:`SMALL_RUN_ACCESSES` accesses, while the kernels are not ready (not cached, or being
compiled by another process), runs on SimPy (``summary.parquet``'s ``sim_engine`` says so) and a
compile of the kernels starts in the background (``python -m moesim.sim.compiled.warm``,
detached, under :func:`~moesim.sim.compiled.stamp.compile_lock`), so that later runs find them
compiled instead of compiling beside it.

The rule covers a sweep's runs too (``-m``, every launcher: Hydra's in-process one, joblib, the
packed and forked ones), although they may add up to more than the compile: a run that starts
while the kernels compile costs SimPy about a second (a few for the slowest policies), time it
would otherwise have spent waiting for the compile, so a sweep waits at most for the compile
(plus one small run), as before, and usually much less; every run that starts after the compile
has finished (the kernels cached, the lock free) runs compiled. The compile starts once per
sweep, not once per run: a run takes the compile lock without waiting *before* it starts the
compile and hands the lock to the compile process (:func:`start`), so every other run, in this
process or another worker, finds the lock taken and only runs on SimPy, and only the run that
started the compile prints the notice (:data:`SWEEP_NOTICE`, one line per sweep). Where no lock
can be taken (no ``flock`` on the cache folder's file system), a sweep's runs compile in their
own process as before: starting one compile per run would run them side by side. A background
compile that fails marks the sources' digest (:func:`~moesim.sim.compiled.stamp.compile_failed`):
later runs compile in their own process, where the error is reported, until the sources change,
instead of each starting another compile that fails. Library calls
(:func:`moesim.simulate`) keep compiling in the process. ``MOESIM_BACKGROUND_COMPILE=0`` turns
the rule off (the test suite does, so that which engine ran never depends on the state of
numba's cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Literal

import numpy as np

from moesim.sim.compiled import stamp
from moesim.sim.compiled.stamp import compile_lock, kernels_cached

# Largest run (expert accesses: tokens x MoE layers x top-k) worth its SimPy time while the
# kernels compile: the SimPy engine replays ~100-150 k accesses per CPU-s with LRU and ~15 k
# with MoE-Infinity's prefetcher (embedded trace, this project's 2-core machine), so this is at
# most a few seconds for most policies and ~6 s for the slowest, against ~40 s of compiling.
SMALL_RUN_ACCESSES = 100_000
ENV = "MOESIM_BACKGROUND_COMPILE"
# Set inside a SLURM job: the scheduler ends every process of a job step with it (its cgroup),
# detached or not, so a background compile started by a short array task would die unfinished
# and the next task would start another. A job's runs compile in their own process, as library
# calls do; the first task's compile fills the shared cache for the others.
BATCH_JOB = "SLURM_JOB_ID"
NOTICE = ("the simulator's kernels are not compiled yet: this small run uses the SimPy engine "
          "(the same results); they compile in the background for later runs (~40 s, once)")
SWEEP_NOTICE = ("the simulator's kernels are not compiled yet: this sweep's small runs use the "
                "SimPy engine (the same results) until they are; they compile in the "
                "background (~40 s, once)")

RunKind = Literal["run", "sweep"]
Started = Literal["started", "busy", "ready", "unlocked", "failed"]


def compiling() -> bool:
    """True while another process holds the compile lock: it is compiling the kernels (the
    lock is held for a compile only), and a run that wanted them would wait for it."""
    with compile_lock(blocking=False) as state:
        return state == "busy"


def cold_start_engine(engine: str, accesses: int, kind: RunKind | None) -> str:
    """The engine a ``moesim-sim`` run (``kind``: ``"run"`` alone, ``"sweep"`` one of a
    sweep's; None: a library call) should ask for: ``python`` for a small run with
    ``engine=auto`` while the kernels are not ready (not cached, or being compiled) and the rule
    is on, else ``engine``."""
    if (engine != "auto" or kind is None or accesses > SMALL_RUN_ACCESSES
            or os.environ.get(ENV, "1") == "0" or os.environ.get(BATCH_JOB)
            or stamp.compile_failed()):  # compile here: the run reports what went wrong
        return engine
    if kernels_cached() and not compiling():
        return engine
    return "python"


def start(once: bool = False) -> Started:
    """Start the background compile, detached from this process and its terminal.

    The compile lock is taken here without waiting and handed to the compile process (an
    inherited descriptor of the same lock), so that no other run starts one meanwhile.
    Returns ``"started"``; ``"busy"`` when another process holds the lock (compiling: nothing
    started); ``"ready"`` when the lock was free and the kernels are cached after all (a compile
    has just finished); ``"failed"`` when the process could not be started. Where no lock can
    be taken (no ``fcntl``, an unwritable cache folder, a file system without ``flock``) the
    compile is started unlocked (``"started"``), or with ``once`` (a sweep, whose every run
    calls this) nothing is started and ``"unlocked"`` returned."""
    state, fd = stamp.take_lock_fd()
    if state == "busy":
        return "busy"
    if fd is None:
        return "unlocked" if once else _spawn(None)
    try:
        if kernels_cached():
            return "ready"
        return _spawn(fd)  # the child holds the lock now; closing here leaves it so
    finally:
        os.close(fd)


def _spawn(lock_fd: int | None) -> Started:
    """``python -m moesim.sim.compiled.warm [--lock-fd N]``, detached (its own session, no
    terminal), ``lock_fd`` (holding the compile lock) inherited as the same descriptor."""
    args = [sys.executable, "-m", "moesim.sim.compiled.warm"]
    if lock_fd is not None:
        args += ["--lock-fd", str(lock_fd)]
    try:
        subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            pass_fds=() if lock_fd is None else (lock_fd,))
    except OSError:
        return "failed"
    return "started"


def compile_kernels() -> None:
    """Run tiny simulations on the compiled engine, so that numba compiles and caches the
    kernels with the argument types every run passes (zero-latency and timed, Belady's next
    uses, MoE-Infinity's state)."""
    from moesim.hw_profiles import load_profile
    from moesim.sim import simulate
    from moesim.traces.model_card import load_card
    from moesim.traces.trace import DECODE, RequestRouting, Trace, TraceMeta

    rng = np.random.default_rng(0)
    layers, experts, k = 2, 8, 2
    meta = TraceMeta(model="mixtral_8x7b", moe_layers=(0, 1), num_experts=experts, top_k=k)
    reqs = []
    for r in range(3):
        ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                       for _ in range(6)]).astype(np.int16)
        reqs.append(RequestRouting(r, ex, np.full(6, DECODE, np.uint8)))
    trace = Trace(meta, reqs)
    profile = load_profile("v100_pcie")
    card = load_card("mixtral_8x7b")
    link, compute = profile.expert_link(), profile.compute_model(card)
    for policy in ("lru", "belady", "moe_infinity", "oracle_prefetch"):
        for mode in ("zero_latency", "timed"):
            timed = mode == "timed"
            simulate(trace, policy, capacity=6, mode=mode,  # type: ignore[arg-type]
                     link=link if timed else None, compute=compute if timed else None,
                     seed=0, engine="compiled")


def _let_go(lock_fd: int) -> None:
    """Release the compile lock handed over by :func:`start`, once this process has imported
    what the compile needs: :func:`main` takes it again at once, in the way the engine's own
    takes of it recognise (a process can not take a ``flock`` twice through two descriptors).
    Between the two, a process waiting for the lock may take it and compile instead of this one
    (then this one steps aside): either way one compile."""
    import fcntl
    from importlib import import_module

    for name in ("moesim.hw_profiles", "moesim.sim", "moesim.traces.model_card"):
        import_module(name)  # what compile_kernels imports: the lock is free for microseconds
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
    finally:
        os.close(lock_fd)


def main(args: Sequence[str] = ()) -> int:
    """Compile the kernels unless they are cached or another process is compiling them
    (``--lock-fd N``: :func:`start` handed this process the compile lock as descriptor N)."""
    if list(args[:1]) == ["--lock-fd"] and len(args) == 2:
        _let_go(int(args[1]))
    with compile_lock(blocking=False) as state:
        if state == "busy" or kernels_cached():
            return 0
        # held (the tiny runs' own take of the lock sees it held here), or no lock can be
        # taken on this system: compile all the same
        try:
            compile_kernels()
        except Exception:  # an interrupted compile (a signal, ^C) is not a failed one
            stamp.mark_compile_failed()  # later runs compile in their process and say why
            raise
        stamp.clear_compile_failed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
