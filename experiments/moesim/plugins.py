"""Out-of-tree extensions: policies, placements, predictors, hardware and runtime profiles and
trace importers that live in another package.

Two ways in, both honoured in every process a run reaches (``moesim-sim``, ``moesim.simulate``
and ``moesim.sweep``, joblib workers, submitit/SLURM jobs), because each of those resolves its
policy through :func:`moesim.policies.registry.discover` and starts its run with
:func:`load_plugins`:

- **entry points** of an installed distribution, in the groups of :data:`GROUPS`, e.g. in the
  plugin's ``pyproject.toml``::

      [project.entry-points."moesim.policies"]
      my_random = "moesim_example_plugin.policies"

  A policy, placement or importer entry point names a module (or an object in one):
  loading it imports the module, whose ``@register_eviction`` / ``@register_prefetch`` /
  ``@register_placement`` / ``traces.importers.register`` decorators add its classes
  (a ``moesim.predictors`` module adds ``moesim-train`` methods with
  ``moesim.predictors.registry.register_method``). A
  ``moesim.hw_profiles`` or ``moesim.runtimes`` entry point names a package: its folder's
  ``*.yaml`` files are profiles (``hw=<file stem>``, ``runtime=<file stem>``).
- the run option ``plugins=[module, ...]`` (``moesim-sim plugins=[my_pkg.policies]``,
  ``moesim.simulate(..., plugins=["my_pkg.policies"])``): modules imported before the run,
  for code that is importable but not installed as a distribution.

Entry points are loaded once per process; a plugin that fails to load is one error line
naming the plugin, never a silent absence.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType

GROUPS = ("moesim.policies", "moesim.placements", "moesim.predictors", "moesim.hw_profiles",
          "moesim.runtimes", "moesim.importers")
_FOLDER_GROUPS = ("moesim.hw_profiles", "moesim.runtimes")


class PluginError(ImportError):
    """A plugin that cannot be loaded; the message names it and is printed as one line."""


def _entry_points(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda ep: (ep.name, ep.value))


@functools.cache
def load_entry_points() -> tuple[str, ...]:
    """Import every plugin module named by an entry point of :data:`GROUPS` (once per process;
    later calls return at once). Returns ``"group:name"`` of what was loaded."""
    loaded = []
    for group in GROUPS:
        if group in _FOLDER_GROUPS:
            continue  # folders of YAML files: read by plugin_folders, nothing to import
        for ep in _entry_points(group):
            try:
                ep.load()
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r} ({group} = {ep.value}) failed to load: "
                                  f"{type(exc).__name__}: {exc}") from exc
            loaded.append(f"{group}:{ep.name}")
    return tuple(loaded)


def import_modules(modules: Iterable[str]) -> list[ModuleType]:
    """Import the modules of a ``plugins=[...]`` option (an import that fails is a
    :class:`PluginError` naming the module)."""
    out = []
    for name in modules:
        try:
            out.append(importlib.import_module(str(name)))
        except Exception as exc:
            raise PluginError(f"plugins: cannot import {name!r}: {type(exc).__name__}: "
                              f"{exc}") from exc
    return out


def load_plugins(modules: Iterable[str] | None = ()) -> None:
    """Everything a run needs registered before its config resolves: the entry points, then
    the ``plugins=[...]`` modules. Idempotent and cheap when done."""
    load_entry_points()
    import_modules(modules or ())


def profile_files(group: str, shipped: Path) -> dict[str, Path]:
    """Profile name -> YAML file: the ``*.yaml`` in ``shipped`` (hw_profiles/ or its runtimes/),
    then those of the plugin folders of ``group``; a shipped name is never shadowed."""
    out = {p.stem: p for p in sorted(shipped.glob("*.yaml"))}
    for folder in plugin_folders(group):
        for path in sorted(folder.glob("*.yaml")):
            out.setdefault(path.stem, path)
    return out


@functools.cache
def plugin_folders(group: str) -> tuple[Path, ...]:
    """Folders named by the ``moesim.hw_profiles`` or ``moesim.runtimes`` entry points (each a
    package whose folder holds profile YAMLs), in name order; read once per process."""
    if group not in _FOLDER_GROUPS:
        raise ValueError(f"{group!r} is not a group of profile folders ({_FOLDER_GROUPS})")
    out = []
    for ep in _entry_points(group):
        try:
            target = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({group} = {ep.value}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        where = getattr(target, "__file__", None)
        if where is None:
            raise PluginError(f"plugin {ep.name!r} ({group} = {ep.value}) is not a package")
        out.append(Path(where).parent)
    return tuple(out)


def plugins_from_argv(argv: Iterable[str]) -> list[str]:
    """The modules of a ``plugins=...`` override on a command line (``plugins=[a,b]``,
    ``plugins=a``, ``+plugins=...``), so the app can import them before Hydra composes the
    config that names their policies."""
    out: list[str] = []
    for arg in argv:
        key, sep, value = str(arg).partition("=")
        if not sep or key.lstrip("+~") != "plugins":
            continue
        value = value.strip().removeprefix("[").removesuffix("]")
        out += [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
    return out
