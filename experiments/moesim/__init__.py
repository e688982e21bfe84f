"""moesim: trace-driven simulation of GPU expert caches and host-link transfers for MoE inference.

The repository keeps its folders at the top level (``sim``, ``traces``, ``policies``,
``predictors``, ``hw_profiles``, ``experiments``); installed, they are the subpackages of this one
package (``moesim.sim``, ``moesim.traces``, ...), so nothing generic lands in site-packages.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moesim")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
