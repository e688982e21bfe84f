"""Many runs per cluster task: Hydra's submitit launchers with ``runs_per_task``.

Hydra's submitit launcher makes every run of a sweep one SLURM array task (or one local
process): a task pays Python's and the simulator's start-up, the trace load and Hydra's
set-up each time, seconds per run, while a run on a small trace simulates in well under one.
Here ``hydra.launcher.runs_per_task=k`` hands each task ``k`` consecutive runs, which it runs
one after the other in one process (the trace is loaded once there, see
:func:`moesim.experiments.sim_app.run_trace`). Each run is still a run of its own: its own
folder, config hash, ``status.json`` and return value; one run's failure does not stop the
others. A task killed or preempted is resubmitted whole (submitit's checkpointing) or by
rerunning the command, and its finished runs are skipped by config hash, as every sweep's are.

The launchers are Hydra's own (``LocalLauncher``, ``SlurmLauncher``): a pack is handed to them
as one job whose override list carries each run's index and overrides, and unpacked in the
task. Hydra instantiates launchers only from its plugin registry (classes under
``hydra_plugins.``); :func:`register_launchers` adds these two there under
``hydra_plugins.moesim_packing.*``, the names the launcher YAMLs in
``experiments/conf/hydra/launcher/`` use. Joblib needs none of this: its workers live for the
whole sweep and each runs many configs (``hydra/launcher=joblib``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MARK = "moesim_run#"  # starts each run's overrides inside a pack (no override starts so)
PLUGIN_PREFIX = "hydra_plugins.moesim_packing."


def pack(job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
         runs_per_task: int) -> list[list[str]]:
    """Consecutive runs in groups of ``runs_per_task``, each group one override list:
    ``[MARK<num>, *overrides, MARK<num+1>, *overrides, ...]``."""
    if runs_per_task < 1:
        raise ValueError(f"hydra.launcher.runs_per_task must be >= 1, not {runs_per_task}")
    packs: list[list[str]] = []
    for start in range(0, len(job_overrides), runs_per_task):
        group: list[str] = []
        for i, overrides in enumerate(job_overrides[start:start + runs_per_task], start):
            group += [f"{MARK}{initial_job_idx + i}", *overrides]
        packs.append(group)
    return packs


def unpack(packed: Sequence[str]) -> list[tuple[int, list[str]]]:
    """The (job number, overrides) of each run of a pack (:func:`pack`'s inverse)."""
    runs: list[tuple[int, list[str]]] = []
    for item in packed:
        if item.startswith(MARK):
            runs.append((int(item[len(MARK):]), []))
        else:
            runs[-1][1].append(item)
    return runs


class _Packed:
    """Mixed into a submitit launcher: ``runs_per_task`` runs per submitted task."""

    def __init__(self, runs_per_task: int = 1, **params: Any) -> None:
        self.runs_per_task = int(runs_per_task)
        if self.runs_per_task < 1:
            raise ValueError(
                f"hydra.launcher.runs_per_task must be >= 1, not {runs_per_task}")
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        if self.runs_per_task == 1:
            return list(super().launch(job_overrides, initial_job_idx))
        packs = pack(job_overrides, initial_job_idx, self.runs_per_task)
        results = super().launch(packs, initial_job_idx)  # one list of returns per pack
        return [ret for returns in results for ret in returns]

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict[Any, Any]) -> Any:
        if not (sweep_overrides and sweep_overrides[0].startswith(MARK)):
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id,
                                    singleton_state)
        return [super(_Packed, self).__call__(overrides, job_dir_key, num, job_id,
                                              singleton_state)
                for num, overrides in unpack(sweep_overrides)]


try:  # Hydra's submitit plugin: the cluster extra (moesim[cluster])
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        LocalLauncher,
        SlurmLauncher,
    )
except ImportError:
    LAUNCHERS: dict[str, type] = {}
    CONFIGS: dict[str, Any] = {}
else:
    class PackedLocalLauncher(_Packed, LocalLauncher):
        """submitit's local executor (every task its own process on this machine), packed."""

    class PackedSlurmLauncher(_Packed, SlurmLauncher):
        """SLURM array tasks through submitit, packed."""

    @dataclass
    class PackedLocalConf(LocalQueueConf):
        _target_: str = field(default=PLUGIN_PREFIX + "PackedLocalLauncher")
        runs_per_task: int = 1  # consecutive runs of the sweep per task (one process)

    @dataclass
    class PackedSlurmConf(SlurmQueueConf):
        _target_: str = field(default=PLUGIN_PREFIX + "PackedSlurmLauncher")
        runs_per_task: int = 1  # consecutive runs of the sweep per array task

    LAUNCHERS = {"PackedLocalLauncher": PackedLocalLauncher,
                 "PackedSlurmLauncher": PackedSlurmLauncher}
    CONFIGS = {"packed_local": PackedLocalConf, "packed_slurm": PackedSlurmConf}


def register_launchers() -> None:
    """Put the packed launchers into Hydra's plugin registry and their configs into the
    ``hydra/launcher`` group (``packed_local``, ``packed_slurm``: the submitit plugin's
    ``submitit_local`` and ``submitit_slurm`` plus ``runs_per_task``); idempotent. Every class
    here is a module attribute: a sweep's config store and launcher are pickled into its
    workers and tasks."""
    if not LAUNCHERS:
        return
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    registry = Plugins.instance().class_name_to_class
    for name, cls in LAUNCHERS.items():
        registry.setdefault(PLUGIN_PREFIX + name, cls)
    cs = ConfigStore.instance()
    for name, conf in CONFIGS.items():
        cs.store(group="hydra/launcher", name=name, node=conf(), provider="moesim")
