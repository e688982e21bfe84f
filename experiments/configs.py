"""Register the plug-in folders as Hydra config groups, so each thing lives in one place.

``hw=<name>`` is a YAML in ``hw_profiles/``, ``model=<name>`` a card in ``traces/models/`` and
``policy=<name>`` a class registered in ``policies/`` (its node lists every parameter default).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore

import hw_profiles
from policies.registry import default_config, policy_names
from traces.model_card import MODELS_DIR

CONF_DIR = Path(__file__).parent / "conf"


def _yaml(path: Path) -> dict:
    with path.open() as fh:
        return yaml.safe_load(fh)


def register_configs() -> None:
    """Store the hw, model and policy groups (idempotent)."""
    cs = ConfigStore.instance()
    for name in hw_profiles.list_profiles():
        cs.store(group="hw", name=name, node=_yaml(hw_profiles.profile_path(name)))
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        cs.store(group="model", name=path.stem, node=_yaml(path))
    for name in policy_names():
        cs.store(group="policy", name=name, node=default_config(name))
