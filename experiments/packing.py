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
``experiments/conf/hydra/launcher/`` use.

Joblib's workers live for the whole sweep, but Hydra's joblib launcher still sends every run
as its own task, each pickled with Hydra's whole state (its config store and context, ~450 kB:
~0.12 CPU-s to pickle and unpickle, as much as a zero-latency run on the embedded trace
simulates). ``hydra/launcher=packed_joblib`` is that launcher with ``runs_per_task``
(0, the default: as many as leave each worker about four tasks, so that the runs still
spread evenly); each run is composed, run and written exactly as by ``hydra/launcher=joblib``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


from hydra_plugins.hydra_joblib_launcher.config import (  # noqa: E402 (a base dependency)
    JobLibLauncherConf,
)
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher  # noqa: E402


def execute_pack(packed: Sequence[str], hydra_context: Any, config: Any, task_function: Any,
                 singleton_state: dict[Any, Any]) -> list[Any]:
    """In a joblib worker: the runs of one pack, one after the other, each as Hydra's joblib
    launcher runs a task (its own composed config, folder and return value)."""
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    return [execute_job(num, overrides, hydra_context, config, task_function, singleton_state)
            for num, overrides in unpack(packed)]


def auto_runs_per_task(runs: int, n_jobs: int) -> int:
    """Runs per task when ``runs_per_task=0``: about four tasks per worker."""
    import math
    import os

    workers = n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, math.ceil(runs / (4 * workers)))


class PackedJoblibLauncher(JoblibLauncher):
    """Hydra's joblib launcher, ``runs_per_task`` runs per joblib task."""

    def __init__(self, runs_per_task: int = 0, **params: Any) -> None:
        self.runs_per_task = int(runs_per_task)
        if self.runs_per_task < 0:
            raise ValueError(
                f"hydra.launcher.runs_per_task must be >= 0 (0: automatic), not {runs_per_task}")
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import configure_log, setup_globals
        from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
        from joblib import Parallel, delayed

        k = self.runs_per_task or auto_runs_per_task(len(job_overrides),
                                                     int(self.joblib.get("n_jobs") or -1))
        if k == 1:
            return list(super().launch(job_overrides, initial_job_idx))
        # as hydra_joblib_launcher._core.launch, with one task per pack
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        joblib_cfg = self.joblib
        joblib_cfg["backend"] = "loky"  # as the joblib launcher (threads cannot run Hydra)
        process_joblib_cfg(joblib_cfg)
        state = Singleton.get_state()
        packs = pack(job_overrides, initial_job_idx, k)
        results: list[list[Any]] = list(Parallel(**joblib_cfg)(
            delayed(execute_pack)(group, self.hydra_context, self.config, self.task_function,
                                  state)
            for group in packs) or [])
        return [ret for returns in results for ret in returns]


@dataclass
class PackedJoblibConf(JobLibLauncherConf):
    _target_: str = field(default=PLUGIN_PREFIX + "PackedJoblibLauncher")
    runs_per_task: int = 0  # consecutive runs per joblib task (0: about four tasks per worker)


LAUNCHERS["PackedJoblibLauncher"] = PackedJoblibLauncher
CONFIGS["packed_joblib"] = PackedJoblibConf


def register_launchers() -> None:
    """Put the packed launchers into Hydra's plugin registry and their configs into the
    ``hydra/launcher`` group (``packed_joblib``: the joblib plugin's ``joblib`` plus
    ``runs_per_task``; ``packed_local``, ``packed_slurm``: the submitit plugin's
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
