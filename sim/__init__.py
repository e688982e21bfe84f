"""moesim's discrete-event model of a GPU expert cache, the host link and layer compute."""

from moesim.sim.cache import SimulationError
from moesim.sim.engine import CacheOptions, RunOptions, Simulation
from moesim.sim.hardware import (
    ComputeTimes,
    FixedCompute,
    FixedHostCpu,
    FixedLink,
    HostSide,
    TransferModel,
)
from moesim.sim.metrics import RunResult
from moesim.sim.run import capacity_slots, dense_layers_before, simulate
from moesim.sim.workload import Workload, build_workload

__all__ = [
    "CacheOptions",
    "ComputeTimes",
    "FixedCompute",
    "FixedHostCpu",
    "FixedLink",
    "HostSide",
    "RunOptions",
    "RunResult",
    "Simulation",
    "SimulationError",
    "TransferModel",
    "Workload",
    "build_workload",
    "capacity_slots",
    "dense_layers_before",
    "simulate",
]
