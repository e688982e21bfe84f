"""Optional parts of moesim and the extra that installs each, so a base install (no torch) that
reaches one says in one line what to install instead of ending in a ``ModuleNotFoundError``.

A base install simulates, sweeps and plots; torch (the ``predictors`` extra) trains predictors
and builds their tables; transformers (the ``collect`` extra) records traces and regenerates
the embedded trace's hidden states; submitit (the ``cluster`` extra) runs sweeps on SLURM.
"""

from __future__ import annotations

import importlib.util
from typing import Any

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


# The console scripts of the commands that need an extra: each checks for it first and says in
# one line what to install (a Hydra app would print its own traceback instead), then runs the
# command. pyproject's [project.scripts] and ``python -m moesim`` point here.
def _command(target: str, modules: tuple[str, ...], extra: str, name: str) -> Any:
    import sys
    from importlib import import_module

    try:
        require(modules, extra, name)
        module, func = target.split(":")
        return getattr(import_module(module), func)()
    except ModuleNotFoundError as exc:
        missing = as_missing_extra(exc, name)
        if missing is exc and not isinstance(exc, MissingExtra):
            raise
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(2)


def moesim_train() -> Any:
    """``moesim-train``: trains predictors with torch (the ``predictors`` extra)."""
    return _command("moesim.predictors.train_app:main", ("torch",), "predictors", "moesim-train")


def moesim_collect() -> Any:
    """``moesim-collect``: runs Hugging Face models (the ``collect`` extra)."""
    return _command("moesim.traces.collect.app:main", ("torch", "transformers", "safetensors"),
                    "collect", "moesim-collect")


def moesim_profile() -> Any:
    """``moesim-profile``: its measurements run torch (a missing one is named when reached;
    reading and plotting profiles needs none)."""
    return _command("moesim.hw_profiles.measure:main", (), "predictors", "moesim-profile")
