"""A real offloading executor: the simulator's policies driven on real hardware.

``execute`` replays a trace like ``sim.run.simulate`` but moves real expert weights (backend
``storage``: a file read with O_DIRECT into DRAM slots, CPU compute; backend ``cuda``: pinned
host memory to GPU slots) and computes every layer for real with torch. torch is imported only
when a run starts, never by importing this package, so the simulator stays torch-free.
"""

from moesim.sim.executor.model import ExpertLayout, scaled_card
from moesim.sim.executor.run import BACKENDS, Executor, ExecutorOptions, execute, prepare

__all__ = ["BACKENDS", "Executor", "ExecutorOptions", "ExpertLayout", "execute", "prepare",
           "scaled_card"]
