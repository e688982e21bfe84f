"""moesim's discrete-event model of a GPU expert cache, the host link and layer compute.

The names below load on first use (PEP 562): ``import moesim.sim`` (or any of its submodules,
e.g. ``moesim.sim.workload`` from a trace tool) does not pay for the engine, SimPy, pandas or
the compiled kernels until a name that needs them is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moesim._lazy import lazy_names

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
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

_WHERE = {  # public name -> module that defines it
    "SimulationError": "cache",
    "CacheOptions": "engine", "RunOptions": "engine", "Simulation": "engine",
    "ComputeTimes": "hardware", "FixedCompute": "hardware", "FixedHostCpu": "hardware",
    "FixedLink": "hardware", "HostSide": "hardware", "TransferModel": "hardware",
    "RunResult": "metrics",
    "capacity_slots": "run", "dense_layers_before": "run", "simulate": "run",
    "Workload": "workload", "build_workload": "workload",
}

__all__ = [
    "CacheOptions", "ComputeTimes", "FixedCompute", "FixedHostCpu", "FixedLink", "HostSide",
    "RunOptions", "RunResult", "Simulation", "SimulationError", "TransferModel", "Workload",
    "build_workload", "capacity_slots", "dense_layers_before", "simulate",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
