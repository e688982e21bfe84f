"""How a sweep ended: every run writes ``status.json`` (done, skipped or failed, with the error),
and a Hydra callback prints "N done, M skipped, K failed" when the sweep ends and makes the
command exit 2 if any run failed. A bad value in one run no longer stops the others.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS = "status.json"


def write_status(outdir: Path, status: str, error: str = "") -> None:
    """Record how this run ended (one small file; the run folder's lock is held)."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / STATUS).write_text(json.dumps({"status": status, "error": error}) + "\n")


def read_statuses(sweep_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Runs below ``sweep_dir`` by status (a run folder without a status never finished)."""
    out: dict[str, list[tuple[Path, str]]] = {"done": [], "skipped": [], "failed": [],
                                              "unfinished": []}
    for run in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        try:
            rec = json.loads((run / STATUS).read_text())
        except (OSError, ValueError):
            out["unfinished"].append((run, ""))
            continue
        out.setdefault(rec.get("status", "unfinished"), []).append((run, rec.get("error", "")))
    return out


class SweepSummary(Callback):
    """``hydra.callbacks.summary`` in experiments/conf/config.yaml."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        by = read_statuses(sweep_dir)
        parts = [f"{len(by['done'])} done", f"{len(by['skipped'])} skipped",
                 f"{len(by['failed'])} failed"]
        if by["unfinished"]:
            parts.append(f"{len(by['unfinished'])} unfinished")
        print(f"sweep {sweep_dir}: " + ", ".join(parts))
        for run, error in by["failed"]:
            print(f"  failed {run.name}: {error}", file=sys.stderr)
        if by["failed"] or by["unfinished"]:
            sys.exit(2)
