"""How a sweep goes and how it ended: every run writes ``status.json`` (done, skipped or failed,
with the error), and a Hydra callback draws one progress bar over the sweep's runs while it goes
and prints "N done, M skipped, K failed" when it ends, making the command exit 2 if any run
failed. A bad value in one run no longer stops the others.

The bar counts the status files that appear in the sweep folder, from the sweep's own process,
so it works with every launcher whose runs are other processes (joblib, submitit on this machine
or a cluster's shared disk); with Hydra's default in-process launcher each run draws its own.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS = "status.json"
# The sweep whose jobs this process runs (set by SweepSummary in the sweep and its workers): a
# run's status also keeps its outcome under that id, so two sweeps sharing a folder each count
# what they did (the top-level status is the last writer's: every run read "skipped").
SWEEP_ENV = "MOESIM_SWEEP_ID"
_KEPT_SWEEPS = 8  # outcomes per run folder, the latest sweeps'


def write_status(outdir: Path, status: str, error: str = "") -> None:
    """Record how this run ended (one small file, replaced whole; the run folder's lock is
    held, so the sweeps' outcomes read here are not written meanwhile)."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / STATUS
    rec: dict[str, Any] = {"status": status, "error": error}
    if sweep := os.environ.get(SWEEP_ENV):
        try:
            old = json.loads(path.read_text())
            sweeps = dict(old.get("sweeps") or {}) if isinstance(old, dict) else {}
        except (OSError, ValueError, TypeError):
            sweeps = {}
        sweeps.pop(sweep, None)
        sweeps[sweep] = {"status": status, "error": error}
        rec["sweeps"] = dict(list(sweeps.items())[-_KEPT_SWEEPS:])
    tmp = path.with_name(f".{STATUS}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def read_statuses(sweep_dir: Path, sweep: str | None = None,
                  expected: int | None = None) -> dict[str, list[tuple[Path, str]]]:
    """Runs below ``sweep_dir`` by status (a run folder without a status never finished).

    With ``sweep`` (an id from :data:`SWEEP_ENV`) only that sweep's outcomes count, and of
    ``expected`` runs those it did not record are unfinished (killed or lost workers)."""
    out: dict[str, list[tuple[Path, str]]] = {"done": [], "skipped": [], "failed": [],
                                              "unfinished": []}
    for run in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        try:
            rec = json.loads((run / STATUS).read_text())
            if sweep is not None:
                rec = (rec.get("sweeps") or {}).get(sweep)
                if rec is None:  # not (or not yet) this sweep's: another's, or unfinished
                    continue
        except (OSError, ValueError, AttributeError):
            if sweep is None:
                out["unfinished"].append((run, ""))
            continue
        out.setdefault(rec.get("status", "unfinished"), []).append((run, rec.get("error", "")))
    if sweep is not None and expected is not None:
        counted = sum(len(v) for v in out.values())
        out["unfinished"] += [(sweep_dir, "")] * max(0, expected - counted)
    return out


def sweep_size(config: DictConfig) -> int | None:
    """How many runs the basic sweeper will launch: the product of the sweep lists in
    ``hydra.sweeper.params`` and the command line (a key given in both: the command line's),
    as Hydra's BasicSweeper counts them; None for other sweepers or sweeps it cannot count
    (``glob(...)`` choices, ranges resolved against the config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides(
            [*params, *config.hydra.overrides.task])
        sizes = {o.get_key_element(): (len(list(o.sweep_string_iterator()))
                                       if o.is_discrete_sweep() else 1) for o in parsed}
    except Exception:  # the sweeper itself reports what it cannot parse
        return None
    return math.prod(sizes.values())


def runs_finished(sweep_dir: Path, since: float) -> int:
    """Runs below ``sweep_dir`` whose status was written at or after ``since`` (an earlier
    sweep's runs in the same folder are not counted until this sweep reaches them)."""
    count = 0
    for path in itertools.chain(sweep_dir.glob("*/" + STATUS), sweep_dir.glob("*/*/" + STATUS)):
        try:
            count += path.stat().st_mtime >= since
        except OSError:
            continue
    return count


class _SweepBar:
    """One tqdm bar on stderr, advanced by a daemon thread polling the sweep folder."""

    def __init__(self, sweep_dir: Path, total: int | None, poll_s: float = 0.25) -> None:
        from tqdm import tqdm

        self._since = time.time() - 1.0  # filesystem timestamps may be coarser than time()
        self._dir, self._poll = sweep_dir, poll_s
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc="sweep", unit="run", file=sys.stderr,
                         dynamic_ncols=True)
        self._thread = threading.Thread(target=self._watch, name="moesim-sweep-bar",
                                        daemon=True)
        self._thread.start()

    def _advance(self) -> None:
        done = runs_finished(self._dir, self._since) if self._dir.is_dir() else 0
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        elif self._tty:
            self._bar.refresh()  # redrawn below whatever the runs printed meanwhile

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            self._advance()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._advance()
        self._bar.close()


class LineClearingStream:
    """A sweep worker's stdout while the sweep's bar is on the same terminal: every line it
    prints first erases the line the bar is drawn on (the bar is redrawn below within a poll),
    so a run's summary never starts in the middle of the bar."""

    CLEAR = "\r\x1b[K"

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._line_start:
                out.append(self.CLEAR)
            out.append(piece)
            self._line_start = piece.endswith(("\n", "\r"))
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)


class SweepSummary(Callback):
    """``hydra.callbacks.summary`` in experiments/conf/config.yaml."""

    def __init__(self) -> None:
        self._bar: _SweepBar | None = None
        self._bar_pid: int | None = None  # the sweep's process, while its bar is drawn
        self._sweep_id: str | None = None  # this sweep's id in its runs' status files

    def __getstate__(self) -> dict[str, Any]:
        """Sent to sweep workers with the job: the parent's bar (a thread) stays here."""
        return {**self.__dict__, "_bar": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_id = f"{os.getpid()}-{time.time_ns()}"
        os.environ[SWEEP_ENV] = self._sweep_id  # in-process runs and spawned workers
        launcher = str((config.hydra.get("launcher") or {}).get("_target_", ""))
        if not bool(config.get("progress", True)) or launcher.endswith("BasicLauncher"):
            return  # in-process runs draw their own bars
        self._bar = _SweepBar(Path(config.hydra.sweep.dir), sweep_size(config))
        self._bar_pid = os.getpid()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In a worker that shares the bar's terminal (joblib): its prints clear the bar line."""
        if self._sweep_id:  # a worker on another host gets it with the job
            os.environ[SWEEP_ENV] = self._sweep_id
        worker = self._bar_pid is not None and os.getpid() != self._bar_pid
        if worker and sys.stdout.isatty() and not isinstance(sys.stdout, LineClearingStream):
            sys.stdout = LineClearingStream(sys.stdout)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_pid = None, None
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        sweep, self._sweep_id = self._sweep_id, None
        os.environ.pop(SWEEP_ENV, None)
        by = read_statuses(sweep_dir, sweep, sweep_size(config) if sweep else None)
        parts = [f"{len(by['done'])} done", f"{len(by['skipped'])} skipped",
                 f"{len(by['failed'])} failed"]
        if by["unfinished"]:
            parts.append(f"{len(by['unfinished'])} unfinished")
        print(f"sweep {sweep_dir}: " + ", ".join(parts))
        for run, error in by["failed"]:
            print(f"  failed {run.name}: {error}", file=sys.stderr)
        if by["failed"] or by["unfinished"]:
            sys.exit(2)
