"""Register the plug-in folders as Hydra config groups, so each thing lives in one place.

``hw=<name>`` is a YAML in ``hw_profiles/``, ``runtime=<name>`` one in ``hw_profiles/runtimes/``,
``model=<name>`` a card in ``traces/models/`` and
``policy=<name>`` a class registered in ``policies/`` (its node lists every parameter default).
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf.errors import OmegaConfBaseException

from moesim import hw_profiles
from moesim.experiments.packing import register_launchers
from moesim.hw_profiles.runtime import list_runtimes, runtime_path
from moesim.policies.registry import default_config, policy_names
from moesim.traces.model_card import MODELS_DIR

CONF_DIR = Path(__file__).parent / "conf"


def _yaml(path: Path) -> dict:
    """A config file, parsed by libyaml where PyYAML has it: every run of the app reads all
    profiles, runtimes and cards once, which the pure-Python parser made a second of each
    run's start-up."""
    with path.open() as fh:
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def register_configs() -> None:
    """Store the hw, runtime, model and policy groups (idempotent). Profiles and cards are read
    once per process; policies are looked up on every call, so one registered since (a plugin's,
    a user's own ``@register_eviction`` class) is a ``policy=<name>`` choice from then on."""
    _register_once()
    _register_new_policies()


def _register_new_policies() -> None:
    cs = ConfigStore.instance()
    stored = {name.removesuffix(".yaml") for name in cs.repo.get("policy", {})}
    for name in policy_names():
        if name not in stored:
            cs.store(group="policy", name=name, node=default_config(name))


@functools.cache
def _register_once() -> None:
    """Once per process: the API composes a config per run, and reading every profile, card
    and policy again each time would cost half a second per run."""
    cs = ConfigStore.instance()
    cs.__class__ = _SharedConfigStore
    for name in hw_profiles.list_profiles():
        _store_profile(cs, name)
    for name in list_runtimes():
        cs.store(group="runtime", name=name, node=_yaml(runtime_path(name)))
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        cs.store(group="model", name=path.stem, node=_yaml(path))
    cs.store(group="hydra/help", name="moesim", node=_help_node())
    register_launchers()  # hydra/launcher=packed_local, packed_slurm (runs_per_task)


# A profile file that cannot be a config node is stored as {"name": ..., BROKEN: why}: runs that
# choose it fail with that one line (experiments.inputs.hw_profile); others, and --help, run.
BROKEN = "_unreadable_profile"


def _store_profile(cs: ConfigStore, name: str) -> None:
    """Store ``hw=<name>``; a broken or non-mapping YAML in hw_profiles/ (as "Adding a
    profile" says to drop one) broke every command, ``--help`` included."""
    path = hw_profiles.profile_path(name)
    try:
        node = _yaml(path)
        if not isinstance(node, dict):
            raise ValueError(f"expected a mapping at top level, got {type(node).__name__}")
        cs.store(group="hw", name=name, node=node)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        why = " ".join(str(exc).split())
        cs.store(group="hw", name=name,
                 node={"name": name, BROKEN: f"{path}: not a readable profile: {why}"})


class _SharedConfigStore(ConfigStore):
    """Hydra's config store, never deep-copied. Every composition (each run of a sweep, in the
    sweep's process to validate it and again in its worker; each group listed by ``--help``)
    deep-copies the config repository, and with it this singleton: every hardware profile,
    model card and policy node, 0.1-0.2 CPU-s a time (80 % of a composition, 14 CPU-s of
    ``--help``). The copy protects nothing: :meth:`ConfigStore.load` returns a deep copy of the
    node it loads, so the store is never changed by a composition."""

    def __deepcopy__(self, memo: dict) -> _SharedConfigStore:
        return self


def _help_node() -> dict[str, str]:
    """``--help``: groups and their choices, then every option with its doc (experiments.schema),
    instead of Hydra's dump of the composed config (mostly one hardware profile)."""
    from moesim.experiments.schema import help_text

    groups = {
        "hw": hw_profiles.list_profiles(),
        "runtime": list_runtimes(),
        "model": sorted(p.stem for p in MODELS_DIR.glob("*.yaml")),
        "policy": policy_names(),
    }
    for sub in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[sub.name] = sorted(p.stem for p in sub.glob("*.yaml"))
    text = help_text(groups) + "\n" + ENVIRONMENT_HELP
    return {"app_name": "moesim-sim", "header": "", "footer": "", "template": text + "\n"}


# One line (the help stays under 100 lines): experiments/paths.py has the rules. No "$": the
# template goes through Hydra's string.Template.
ENVIRONMENT_HELP = ("Relative paths: from the starting directory.  MOESIM_TRACES: the named "
                    "real traces' folder (../shared/traces)")
