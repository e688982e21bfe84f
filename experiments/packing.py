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

Each run's config is composed once, in the sweep's process: Hydra's sweeper composes every
run's config there anyway (to refuse a bad override before anything is submitted), and
:class:`ComposingLoader` keeps what it composed. The launcher writes each pack's configs,
with the sweep's input hashes, into one file under ``<sweep dir>/.packs/`` (the cluster reads
the sweep folder already: the runs write there), and the task runs those configs as they are:
the config that ran is the config Hydra composed for it. Each input (trace file or raw
folder, prediction table) is hashed once per sweep, in the sweep's process; a task uses that
hash only while the input's files still have the size and modification time they had then
(a queued task may start hours later), else it hashes the input itself.

The launchers are Hydra's own (``LocalLauncher``, ``SlurmLauncher``): a pack is handed to them
as one job whose override list names its file and, for Hydra's log, each run's index and
overrides. Hydra instantiates launchers only from its plugin registry (classes under
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

import contextlib
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim.traces.cache import ProcessMemo

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


PACK_FILE = "moesim_pack@"  # a submitted pack's first override: its file (see _Packed)
PACKS_DIR = ".packs"  # under the sweep folder: one folder of pack files per launch
# A pack folder or temporary file untouched this long belongs to no launch still writing it
# (a pack file is written in milliseconds).
SETTLED_S = 60.0


class _ComposesOnce:
    """Mixed into a packed launcher: the sweep's config loader becomes a
    :class:`ComposingLoader`, so the configs the sweeper composes are the ones that run."""

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        # the sweeper shares this context: its check of every run's config composes through it
        if not isinstance(hydra_context.config_loader, ComposingLoader):
            hydra_context.config_loader = ComposingLoader(hydra_context.config_loader)
        super().setup(hydra_context=hydra_context, task_function=task_function,  # type: ignore[misc]
                      config=config)


def composed_runs(context: Any, job_overrides: Sequence[Sequence[str]],
                  initial_job_idx: int) -> list[tuple[int, list[str], bytes | None]]:
    """(number, overrides, the pickled config the sweep's process composed for it, or None)
    of each run to launch; a config composed but not launched is forgotten."""
    loader = context.config_loader
    composed = loader if isinstance(loader, ComposingLoader) else None
    runs = [(initial_job_idx + i, list(overrides),
             composed.take(overrides) if composed else None)
            for i, overrides in enumerate(job_overrides)]
    if composed:
        composed.kept.clear()
    return runs


def plain_context(context: Any) -> Any:
    """The sweep's Hydra context with its own config loader, never a
    :class:`ComposingLoader` and the configs it keeps: what travels to workers and tasks."""
    from hydra.types import HydraContext

    loader = context.config_loader
    if not isinstance(loader, ComposingLoader):
        return context
    return HydraContext(config_loader=loader.loader, callbacks=context.callbacks)


class _Packed(_ComposesOnce):
    """Mixed into a submitit launcher: ``runs_per_task`` runs per submitted task, each run's
    config composed once (in the sweep's process) and each input hashed once per sweep."""

    def __init__(self, runs_per_task: int = 1, **params: Any) -> None:
        self.runs_per_task = int(runs_per_task)
        if self.runs_per_task < 1:
            raise ValueError(
                f"hydra.launcher.runs_per_task must be >= 1, not {runs_per_task}")
        super().__init__(**params)

    def __getstate__(self) -> dict[str, Any]:
        """submitit pickles the launcher into every task: with the plain config loader, never
        the configs the sweep keeps (each run's config travels in its pack's file only)."""
        state = dict(self.__dict__)
        if state.get("hydra_context") is not None:
            state["hydra_context"] = plain_context(state["hydra_context"])
        return state

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        import shutil
        import uuid

        assert self.config is not None and self.hydra_context is not None  # type: ignore[attr-defined]
        runs = composed_runs(self.hydra_context, job_overrides,  # type: ignore[attr-defined]
                             initial_job_idx)
        if not runs:
            return []
        hashes = hash_inputs_once([c for _, _, c in runs])
        k = self.runs_per_task
        packs_dir = (Path(str(self.config.hydra.sweep.dir)).resolve()  # type: ignore[attr-defined]
                     / PACKS_DIR)
        left = tidy_packs(packs_dir)
        if left:
            print(f"note: {left.files} pack file(s) of earlier launches ({left.mb:.1f} MB) are "
                  f"left in {packs_dir}: their tasks were killed, or are still queued (a task "
                  "removes its file when its runs return); remove them once none is queued",
                  file=sys.stderr, flush=True)
        folder = packs_dir / uuid.uuid4().hex[:12]
        packs = []
        for start in range(0, len(runs), k):
            group = runs[start:start + k]
            path = write_pack(folder / f"{start // k}.pkl", group, hashes)
            packs.append([f"{PACK_FILE}{path}",
                          *pack([o for _, o, _ in group], group[0][0], len(group))[0]])
        results = super().launch(packs, initial_job_idx)  # type: ignore[misc]
        # every task has returned: no resubmission reads the files again (a sweep that stops
        # on a failed task leaves them, for its tasks still queued)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # (if no other launch's packs are there)
        return [ret for returns in results for ret in returns]

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict[Any, Any]) -> Any:
        if not (sweep_overrides and sweep_overrides[0].startswith(PACK_FILE)):
            return super().__call__(sweep_overrides, job_dir_key,  # type: ignore[misc]
                                    job_num, job_id, singleton_state)
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import setup_globals

        Singleton.set_state(singleton_state)
        setup_globals()
        path = Path(sweep_overrides[0][len(PACK_FILE):])
        try:
            runs, shipped = read_pack(path)
            hashes = current_hashes(shipped)
        except FileNotFoundError:
            # Removed by an earlier copy of this task (a requeue signalled between the removal
            # below and submitit's result file) or by hand: the overrides travel beside the
            # file, so each run is composed here instead (and its finished runs are skipped
            # by config hash, as in any rerun).
            print(f"note: pack file {path} is gone; composing its runs from their overrides",
                  file=sys.stderr, flush=True)
            runs = [(num, overrides, None) for num, overrides in unpack(sweep_overrides[1:])]
            hashes = {}
        returns = run_pack(self.hydra_context, self.config,  # type: ignore[attr-defined]
                           self.task_function, runs, hashes,  # type: ignore[attr-defined]
                           job_id=submitit.JobEnvironment().job_id)
        # Every run of the pack has returned (a failed run too: run_job records it), so a
        # requeue has nothing left to run; a task preempted before this point keeps the file
        # for its requeued copy. A launcher killed before its tasks returned thus leaves only
        # the files of tasks that never finished (see tidy_packs).
        path.unlink(missing_ok=True)
        return returns


@dataclass(frozen=True)
class PacksLeft:
    """Pack files of earlier launches still under a sweep's ``.packs`` folder."""

    files: int = 0
    mb: float = 0.0

    def __bool__(self) -> bool:
        return self.files > 0


def tidy_packs(packs_dir: Path) -> PacksLeft:
    """Remove the empty pack folders of earlier launches (their tasks all returned, but the
    launcher that would have removed the folder was killed) and count the files left: those
    of tasks killed before their runs returned, or still queued, which only the user can
    tell apart (a SLURM queue is not this process's to read), so they are reported, not
    removed."""
    import time

    if not packs_dir.is_dir():
        return PacksLeft()
    files, size = 0, 0
    settled = time.time() - SETTLED_S
    for folder in sorted(packs_dir.iterdir()):
        with contextlib.suppress(FileNotFoundError):  # (its last task just removed it)
            if not folder.is_dir() or folder.stat().st_mtime > settled:
                continue  # a concurrent launch may be writing it right now
            for tmp in folder.glob(".*.tmp"):  # write_pack cut short: never handed to a task
                with contextlib.suppress(FileNotFoundError):
                    if tmp.stat().st_mtime <= settled:
                        tmp.unlink()
            left = 0
            for f in folder.glob("*.pkl"):
                with contextlib.suppress(FileNotFoundError):  # its task is removing it
                    size += f.stat().st_size
                    left += 1
            if not left:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            files += left
    return PacksLeft(files, size / 1e6)


# An input hashed in the sweep's process, shipped to its tasks: (hash, the files it was read
# from, their (name, size, modification time) then), by sim_app.input_digest's key.
Shipped = dict[tuple[str, ...], tuple[str, list[str], tuple[tuple[str, int, int], ...]]]


def input_files(cfg: Any) -> list[str]:
    """What a run's input hash is read from (its trace file, the raw source it was imported
    from, a prediction table given as a file); [] when its hash depends on more (a
    ``predictor:<name>`` table: the predictor's config and weights), which a task then
    hashes itself."""
    from moesim.experiments.inputs import run_trace_file
    from moesim.experiments.paths import resolve_path
    from moesim.predictors.tables import parse_spec

    given = (cfg.get("predictions") or {}).get("path")
    if parse_spec(given):
        return []
    paths = [run_trace_file(cfg)]
    if str(cfg.trace.get("format")) != "embedded":
        paths.append(resolve_path(cfg.trace.path))
    if given and resolve_path(given).is_file():
        paths.append(resolve_path(given))
    return sorted({str(p) for p in paths})


def file_stamps(paths: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, modification time) of every file at or below ``paths``; a missing one
    has size -1."""
    out = []
    for root in map(Path, paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                out.append((str(f), -1, 0))
            else:
                out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def hash_inputs_once(configs: Sequence[bytes | None]) -> Shipped:
    """In the sweep's process: each distinct input of these (pickled) run configs hashed once
    (``sim_app.input_digest``; a raw source is imported into the cache first, once), with the
    stamps of the files it was read from. A config whose inputs fail is left to its run,
    which reports the error in one line."""
    from moesim.experiments import sim_app
    from moesim.experiments.inputs import inputs_hashed_once

    hashes: dict[tuple[str, ...], str] = {}
    shipped: Shipped = {}
    with inputs_hashed_once(hashes):
        for composed in configs:
            if composed is None:
                continue
            cfg = pickle.loads(composed)
            if cfg.get("published") is not None or cfg.get("validate") is not None:
                continue  # those experiments hash nothing
            known = set(hashes)
            try:
                digest = sim_app.input_digest(cfg)
                new = set(hashes) - known
                if len(new) != 1:
                    continue  # an input hashed for an earlier config
                files = input_files(cfg)
                stamps = file_stamps(files)
                # hashed again (from the file hash's memo, by size and modification time):
                # the stamps describe the very content that was hashed
                if files and sim_app.hash_inputs(cfg) == digest:
                    shipped[new.pop()] = (digest, files, stamps)
            except Exception:  # the run meets the same error and reports it
                continue
    return shipped


def current_hashes(shipped: Shipped) -> dict[tuple[str, ...], str]:
    """In a task: the sweep's input hashes whose files are unchanged since they were hashed
    (the others are hashed again by the task's first run that reads them)."""
    return {key: digest for key, (digest, files, stamps) in shipped.items()
            if file_stamps(files) == stamps}


def write_pack(path: Path, runs: Sequence[tuple[int, list[str], bytes | None]],
               hashes: Shipped) -> Path:
    """One task's runs (number, overrides, pickled composed config) and the sweep's input
    hashes, written whole or not at all; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        pickle.dump((list(runs), hashes), fh, pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path


def read_pack(path: Path) -> tuple[list[tuple[int, list[str], bytes | None]], Shipped]:
    """:func:`write_pack`'s runs and hashes."""
    with path.open("rb") as fh:
        runs, hashes = pickle.load(fh)
    return runs, hashes


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


class ComposingLoader:
    """A sweep's config loader that keeps each run's config it composes, pickled.

    Hydra's sweeper composes every run's config in the sweep's process to refuse a bad
    override before anything runs, and its joblib launcher composes it again in the worker
    (about 0.08 CPU-s each time here). The packed launcher puts this loader into the sweep's
    Hydra context, so the sweeper's check keeps what it composed, and ships that config to the
    worker, which runs it as it is: composed once, and the config that ran is the config
    Hydra composed for it. At most ``limit`` configs are kept (a huge sweep's further runs are
    composed in their worker, as before); the rest of the interface is the wrapped loader's."""

    def __init__(self, loader: Any, limit: int = 4096) -> None:
        self.loader = loader
        self.limit = limit
        self.kept: dict[tuple[str, ...], bytes] = {}

    def load_sweep_config(self, master_config: Any, sweep_overrides: list[str]) -> Any:
        cfg = self.loader.load_sweep_config(master_config, sweep_overrides)
        if len(self.kept) < self.limit:
            self.kept[tuple(sweep_overrides)] = pickle.dumps(cfg, pickle.HIGHEST_PROTOCOL)
        return cfg

    def take(self, overrides: Sequence[str]) -> bytes | None:
        """The pickled config composed for these overrides (forgotten here), if kept."""
        return self.kept.pop(tuple(overrides), None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("loader", "limit", "kept"):
            raise AttributeError(name)  # (unpickling: before __dict__ is filled)
        return getattr(self.loader, name)


# In a joblib worker: the sweep's Hydra state (context, master config, task function, config
# store and other singletons) unpickled once per sweep rather than once per task, with the
# sweep's input hashes (inputs.inputs_hashed_once), by the token of the pickled state.
_SWEEPS = ProcessMemo(size=1)


def execute_pack(token: str, shared: bytes,
                 runs: Sequence[tuple[int, Sequence[str], bytes | None]]) -> list[Any]:
    """In a joblib worker: the runs of one pack (:func:`run_pack`), with the sweep's Hydra
    state unpickled once per worker."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import setup_globals

    context, config, task_function, state, hashes = _SWEEPS.get(
        token, lambda: (*pickle.loads(shared), {}))
    setup_globals()
    Singleton.set_state(state)
    return run_pack(context, config, task_function, runs, hashes)


def run_pack(context: Any, config: Any, task_function: Any,
             runs: Sequence[tuple[int, Sequence[str], bytes | None]],
             hashes: dict[tuple[str, ...], str], job_id: str | None = None) -> list[Any]:
    """The runs of one pack, one after the other, each as Hydra's joblib launcher runs a
    task (``hydra_joblib_launcher._core.execute_job``: the job's id and number set in its
    config, then Hydra's ``run_job``: its own folder, saved config and return value), with
    the config the sweep's process composed for it when it was kept and the sweep's input
    hashes (``hashes``, see ``inputs.inputs_hashed_once``). The job id is joblib's
    ``<name>_<number>``, or ``job_id`` (a submitit task's id, as its launcher sets it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job
    from omegaconf import open_dict

    from moesim.experiments.inputs import inputs_hashed_once

    returns = []
    with inputs_hashed_once(hashes):
        for num, overrides, composed in runs:
            cfg = (pickle.loads(composed) if composed is not None
                   else context.config_loader.load_sweep_config(config, list(overrides)))
            with open_dict(cfg):
                cfg.hydra.job.id = job_id or f"{cfg.hydra.job.name}_{num}"
                cfg.hydra.job.num = num
            HydraConfig.instance().set_config(cfg)
            returns.append(run_job(hydra_context=context, config=cfg,
                                   task_function=task_function,
                                   job_dir_key="hydra.sweep.dir",
                                   job_subdir_key="hydra.sweep.subdir"))
    return returns


def auto_runs_per_task(runs: int, n_jobs: int) -> int:
    """Runs per task when ``runs_per_task=0``: about four tasks per worker."""
    import math
    import os

    workers = n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, math.ceil(runs / (4 * workers)))


class PackedJoblibLauncher(_ComposesOnce, JoblibLauncher):
    """Hydra's joblib launcher, ``runs_per_task`` runs per joblib task, each run's config
    composed once (in the sweep's process, :class:`ComposingLoader`) and Hydra's state
    unpickled once per worker."""

    def __init__(self, runs_per_task: int = 0, **params: Any) -> None:
        self.runs_per_task = int(runs_per_task)
        if self.runs_per_task < 0:
            raise ValueError(
                f"hydra.launcher.runs_per_task must be >= 0 (0: automatic), not {runs_per_task}")
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        import hashlib

        from hydra.core.singleton import Singleton
        from hydra.core.utils import configure_log, setup_globals
        from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
        from joblib import Parallel, delayed
        from joblib.externals.loky.backend.reduction import dumps

        k = self.runs_per_task or auto_runs_per_task(len(job_overrides),
                                                     int(self.joblib.get("n_jobs") or -1))
        # as hydra_joblib_launcher._core.launch, with one task per pack
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        joblib_cfg = self.joblib
        joblib_cfg["backend"] = "loky"  # as the joblib launcher (threads cannot run Hydra)
        process_joblib_cfg(joblib_cfg)
        plain = plain_context(self.hydra_context)
        # with loky's pickler, which joblib sends tasks with (the task function is the
        # undecorated app function: only cloudpickle can send it, by value)
        shared = bytes(dumps((plain, self.config, self.task_function,
                                   Singleton.get_state())))
        token = hashlib.blake2b(shared, digest_size=16).hexdigest()
        runs = composed_runs(self.hydra_context, job_overrides, initial_job_idx)
        results: list[list[Any]] = list(Parallel(**joblib_cfg)(
            delayed(execute_pack)(token, shared, runs[start:start + k])
            for start in range(0, len(runs), k)) or [])
        return [ret for returns in results for ret in returns]


def warm_up(composed: bytes | None, hashes: dict[tuple[str, ...], str]) -> None:
    """In the sweep's process, before forking its workers: import the simulator and load the
    first run's trace (as the run will: ``sim_app.run_trace``, kept by content), so that each
    forked worker starts with both (shared copy-on-write) instead of importing and loading
    them itself. A trace that cannot be loaded is left to its run, which reports it."""
    import importlib

    from moesim.experiments import inputs, sim_app

    for name in ("moesim.sim.run", "moesim.sim.engine", "moesim.sim.compiled", "pandas"):
        importlib.import_module(name)  # what a run imports: the kernels' modules, numba
    from moesim.plugins import load_plugins

    if composed is None:
        return
    cfg = pickle.loads(composed)
    if (cfg.get("run") or {}).get("stream") or cfg.get("published") is not None \
            or cfg.get("validate") is not None:
        return  # streamed runs read no trace whole; those experiments load their own
    try:
        with inputs.inputs_hashed_once(hashes):
            load_plugins(cfg.get("plugins") or ())
            sim_app.run_trace(cfg)
    except Exception:  # the run meets the same error and reports it, in one line
        return


# In a forked worker: the sweep (Hydra context, master config, task function, packs, input
# hashes), inherited from the sweep's process through the fork, never pickled.
_FORKED: dict[str, Any] = {}


def _forked_start(sweep: dict[str, Any]) -> None:
    from moesim.experiments.paths import exit_with_parent

    _FORKED.update(sweep)
    exit_with_parent()  # a killed sweep does not leave its workers running


def _forked_pack(index: int) -> list[Any]:
    s = _FORKED
    return run_pack(s["context"], s["config"], s["task_function"], s["packs"][index],
                    s["hashes"])


def _terminal_quiet() -> Any:
    """While forking: the sweep's progress bar (a thread writing to stderr) holds still, so
    that no worker starts with the terminal's lock taken."""
    import contextlib
    import sys

    tqdm = sys.modules.get("tqdm")
    return tqdm.tqdm.get_lock() if tqdm is not None else contextlib.nullcontext()


class PackedForkLauncher(PackedJoblibLauncher):
    """``n_jobs`` worker processes forked from the sweep's process once it has imported the
    simulator and loaded the first run's trace; packs of ``runs_per_task`` runs handed out
    as workers free up, each run composed once (in the sweep's process) and run as
    :class:`PackedJoblibLauncher` runs it. Off Linux it is :class:`PackedJoblibLauncher`."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        import multiprocessing
        import sys

        from hydra.core.utils import configure_log, setup_globals

        if not sys.platform.startswith("linux"):  # macOS: fork beside system threads is unsafe
            print(f"note: hydra/launcher=packed_fork forks on Linux only; on {sys.platform} "
                  "it runs as packed_joblib", file=sys.stderr)
            return super().launch(job_overrides, initial_job_idx)
        n_jobs = int(self.joblib.get("n_jobs") or -1)
        k = self.runs_per_task or auto_runs_per_task(len(job_overrides), n_jobs)
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        runs = composed_runs(self.hydra_context, job_overrides, initial_job_idx)
        if not runs:
            return []
        packs = [runs[start:start + k] for start in range(0, len(runs), k)]
        hashes: dict[tuple[str, ...], str] = {}
        warm_up(runs[0][2], hashes)
        sweep = {"context": plain_context(self.hydra_context),
                 "config": self.config, "task_function": self.task_function,
                 "packs": packs, "hashes": hashes}
        workers = n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
        with _terminal_quiet():
            pool = multiprocessing.get_context("fork").Pool(
                min(workers, len(packs)), initializer=_forked_start, initargs=(sweep,))
        try:
            results = list(pool.imap(_forked_pack, range(len(packs)), chunksize=1))
            pool.close()
        finally:
            pool.terminate()  # (after close: the idle workers exit; else they are stopped)
            pool.join()
        return [ret for returns in results for ret in returns]


@dataclass
class PackedForkConf:
    _target_: str = field(default=PLUGIN_PREFIX + "PackedForkLauncher")
    n_jobs: int = -1  # worker processes (-1: every CPU)
    runs_per_task: int = 0  # consecutive runs per task (0: about four tasks per worker)


@dataclass
class PackedJoblibConf(JobLibLauncherConf):
    _target_: str = field(default=PLUGIN_PREFIX + "PackedJoblibLauncher")
    runs_per_task: int = 0  # consecutive runs per joblib task (0: about four tasks per worker)


LAUNCHERS["PackedJoblibLauncher"] = PackedJoblibLauncher
CONFIGS["packed_joblib"] = PackedJoblibConf
LAUNCHERS["PackedForkLauncher"] = PackedForkLauncher
CONFIGS["packed_fork"] = PackedForkConf


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
