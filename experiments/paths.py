"""Paths that mean what the user meant: input paths, output folders, sweep workers.

Input paths given relative (``trace.path``, ``predictions.path``, ``$MOESIM_TRACES``) are taken
against the directory the command was started in (:func:`resolve_path`), never a run folder:
``hydra.job.chdir=true``, a joblib worker or a submitit job must read the same file.

Values become folder names (a sweep's subdir is built from its overrides: ``label=../../x``,
``trace.path=/abs/file``), so every such name goes through :func:`safe_dirname`, registered as
the OmegaConf resolver ``${moesim.dirname:...}`` that the Hydra configs use.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

MAX_NAME = 120  # bytes; filesystems allow 255, and Hydra adds nothing after the subdir
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@%-]+")


def safe_dirname(text: object) -> str:
    """One harmless path component for ``text``: separators and other unsafe characters become
    ``_``, a leading dot is escaped (no ``..``, no hidden folders), and long names are cut and
    suffixed with a hash of the full text so two long names never collide."""
    raw = str(text)
    name = _UNSAFE.sub("_", raw).strip("_") or "_"
    if name.startswith("."):
        name = "_" + name
    if len(name) > MAX_NAME:
        digest = hashlib.blake2b(raw.encode(), digest_size=4).hexdigest()
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


def register_resolvers() -> None:
    """``${moesim.dirname:<text>}`` for the Hydra configs (idempotent; called at import so
    that sweep workers, which import this module to unpickle their job, have it too)."""
    OmegaConf.register_new_resolver("moesim.dirname", safe_dirname, replace=True)


TRACES_ENV = "MOESIM_TRACES"
DEFAULT_TRACES = "../shared/traces"  # beside the checkout, as on the project's machines


def original_cwd() -> Path:
    """The directory the command was started in: Hydra's ``runtime.cwd`` inside an app (a run
    may have changed into its output folder with ``hydra.job.chdir=true``; a sweep worker or a
    submitit job starts elsewhere), else the process's own."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = HydraConfig.get().runtime.get("cwd")
        if cwd:
            return Path(cwd)
    return Path.cwd()


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A path from a config or the command line: ``~`` expanded, and a relative one taken
    against the original working directory (:func:`original_cwd`), never the run folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else original_cwd() / p


def traces_dir() -> Path:
    """Where the named real traces (``trace=deepseek_v2_lite``, ...) live: ``$MOESIM_TRACES``,
    else ``../shared/traces``; relative values are taken against the original working
    directory (:func:`resolve_path`)."""
    return resolve_path(os.environ.get(TRACES_ENV) or DEFAULT_TRACES)


register_resolvers()


_WATCHDOG = "moesim-parent-watchdog"


@contextmanager
def sweep_workers_die_with_parent() -> Iterator[None]:
    """Around a Hydra app's main: joblib sweep workers (loky) run :func:`exit_with_parent` as
    their initializer, so they watch the sweep's process from their start (a worker still
    idle when the parent dies would otherwise wait minutes for loky's idle timeout).

    Hydra's joblib launcher names the backend "loky" itself, with no way to pass an
    initializer, so for the app's lifetime "loky" names a subclass that adds one; the stock
    backend is restored on exit.
    """
    from joblib import parallel
    from joblib._parallel_backends import LokyBackend

    class _Backend(LokyBackend):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.setdefault("initializer", exit_with_parent)
            super().__init__(*args, **kwargs)

    stock = parallel.BACKENDS.get("loky")
    parallel.register_parallel_backend("loky", _Backend)
    try:
        yield
    finally:
        if stock is not None:
            parallel.BACKENDS["loky"] = stock


def exit_with_parent(poll_s: float = 0.5) -> None:
    """In a sweep worker: end this process when the process that started it is gone.

    Killing a joblib sweep's parent (SIGKILL, an OOM kill, a closed terminal) leaves its loky
    workers running jobs nobody will collect (and loky's resource trackers, which wait for
    them); a daemon thread notices the re-parenting and ends the worker. Started once per
    process.
    """
    if any(t.name == _WATCHDOG for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5.0)
                os._exit(1)  # SIGTERM was caught and ignored somewhere: go anyway

    threading.Thread(target=watch, name=_WATCHDOG, daemon=True).start()
