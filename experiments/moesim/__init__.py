"""moesim: trace-driven simulation of GPU expert caches and host-link transfers for MoE inference.

The repository keeps its folders at the top level (``sim``, ``traces``, ``policies``,
``predictors``, ``hw_profiles``, ``experiments``); installed, they are the subpackages of this one
package (``moesim.sim``, ``moesim.traces``, ...), so nothing generic lands in site-packages.

The Python API (:mod:`moesim.experiments.api`)::

    import moesim
    row = moesim.simulate("embedded", "lru", "v100_pcie", cache=0.25)   # one summary row
    table = moesim.sweep(policy=["lru", "belady"], cache=[0.1, 0.25],   # a grid of runs,
                         outdir="multirun/api", n_jobs=2)               # resumable, in parallel
    moesim.plot("multirun/api")                                         # moesim-plot's figure

Its names load on first use, so ``import moesim`` stays fast and never imports torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from moesim._lazy import lazy_names

try:
    __version__ = version("moesim")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_API = ("InputError", "list_policies", "list_profiles", "list_traces", "load_trace", "plot",
        "simulate", "sweep")

if TYPE_CHECKING:
    from moesim.experiments.api import (
        InputError,
        list_policies,
        list_profiles,
        list_traces,
        load_trace,
        plot,
        simulate,
        sweep,
    )


# The API's names, imported on first access (PEP 562).
__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(_API, "experiments.api"), globals())


__all__ = [
    "InputError",
    "__version__",
    "list_policies",
    "list_profiles",
    "list_traces",
    "load_trace",
    "plot",
    "simulate",
    "sweep",
]
