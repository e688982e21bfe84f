"""moesim's discrete-event model of a GPU expert cache, the host link and layer compute."""

from sim.cache import SimulationError
from sim.engine import CacheOptions, RunOptions, Simulation
from sim.hardware import ComputeTimes, FixedCompute, FixedLink, TransferModel
from sim.metrics import RunResult
from sim.run import capacity_slots, dense_layers_before, simulate
from sim.workload import Workload, build_workload

__all__ = [
    "CacheOptions",
    "ComputeTimes",
    "FixedCompute",
    "FixedLink",
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
