"""Optional parts of moesim and the extra that installs each, so a base install (no torch) that
reaches one says in one line what to install instead of ending in a ``ModuleNotFoundError``.

A base install simulates, sweeps and plots; torch (the ``predictors`` extra) trains predictors
and builds their tables; transformers (the ``collect`` extra) records traces and regenerates
the embedded trace's hidden states; submitit (the ``cluster`` extra) runs sweeps on SLURM.
"""

from __future__ import annotations

import importlib.util

# top-level module -> the extra that installs it
EXTRA_OF: dict[str, str] = {
    "torch": "predictors",
    "transformers": "collect",
    "safetensors": "collect",
    "submitit": "cluster",
    "hydra_plugins.hydra_submitit_launcher": "cluster",
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message is the one line to print."""

    def __init__(self, module: str, extra: str, what: str) -> None:
        super().__init__(f"{what} needs {module}, which is not installed: "
                         f"pip install 'moesim[{extra}]'", name=module)
        self.extra = extra


def require(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` for the first of ``modules`` that is not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(module, extra, what)


def as_missing_extra(exc: ModuleNotFoundError, what: str = "this run") -> ModuleNotFoundError:
    """``exc`` as a :class:`MissingExtra` when it is an optional dependency, else ``exc``."""
    if isinstance(exc, MissingExtra):
        return exc
    name = exc.name or ""
    for module, extra in EXTRA_OF.items():
        if name == module or name.startswith(module + "."):
            return MissingExtra(module, extra, what)
    return exc
