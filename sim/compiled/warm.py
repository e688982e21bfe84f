"""A first run that does not wait for the compiler.

Compiling the kernels costs ~40 CPU-s once (a fresh install, or any edit under
``sim/compiled/``), while a small run, such as the README's first command on the embedded trace
(~80 k expert accesses), takes the SimPy engine about a second: the same results, run for run
(the engine-equality tests). So a single command-line run with ``engine=auto``, cold kernels and
at most :data:`SMALL_RUN_ACCESSES` accesses runs on SimPy (``summary.parquet``'s ``sim_engine``
says so) and starts a compile of the kernels in the background (``python -m
moesim.sim.compiled.warm``, detached, under :func:`~moesim.sim.compiled.stamp.compile_lock`),
so the next larger run or sweep finds them compiled, or waits for that compile to finish
instead of compiling beside it. Sweeps and library calls (:func:`moesim.simulate`) keep
compiling in the process: their runs add up to more than the compile.
``MOESIM_BACKGROUND_COMPILE=0`` turns the rule off (the test suite does, so that which engine ran
never depends on the state of numba's cache).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from moesim.sim.compiled.stamp import compile_lock, kernels_cached

# Largest run (expert accesses: tokens x MoE layers x top-k) worth its SimPy time while the
# kernels compile: the SimPy engine replays ~100-150 k accesses per CPU-s with LRU and ~15 k
# with MoE-Infinity's prefetcher (embedded trace, this project's 2-core machine), so this is at
# most a few seconds for most policies and ~6 s for the slowest, against ~40 s of compiling.
SMALL_RUN_ACCESSES = 100_000
ENV = "MOESIM_BACKGROUND_COMPILE"
NOTICE = ("the simulator's kernels are not compiled yet: this small run uses the SimPy engine "
          "(the same results); they compile in the background for later runs (~40 s, once)")


def cold_start_engine(engine: str, accesses: int, single_run: bool) -> str:
    """The engine a command-line run should ask for: ``python`` for a small single run with
    ``engine=auto`` while the kernels are not compiled (and the rule is on), else ``engine``."""
    if (engine != "auto" or not single_run or accesses > SMALL_RUN_ACCESSES
            or os.environ.get(ENV, "1") == "0" or kernels_cached()):
        return engine
    return "python"


def start() -> bool:
    """Start the background compile, detached from this process and its terminal; True if
    started. It exits at once when another process holds the compile lock."""
    try:
        subprocess.Popen(
            [sys.executable, "-m", "moesim.sim.compiled.warm"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
    except OSError:
        return False
    return True


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


def main() -> int:
    """Compile the kernels unless they are cached or another process is compiling them."""
    with compile_lock(blocking=False) as state:
        if state == "busy" or kernels_cached():
            return 0
        # held (the tiny runs' own take of the lock sees it held here), or no lock can be
        # taken on this system: compile all the same
        compile_kernels()
    return 0


if __name__ == "__main__":
    sys.exit(main())
