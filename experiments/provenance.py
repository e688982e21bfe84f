"""Where a result came from: moesim version and commit, host, date, and what the run cost.

Every ``summary.parquet`` row carries these columns, so a table assembled from many sweeps still
says which code and machine produced each number (they are not part of the config hash: a rerun
of the same config on other hardware is the same experiment).
"""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    try:
        return importlib.metadata.version("moesim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def git_commit(root: Path = ROOT) -> str:
    """The checkout's commit, ``<sha>-dirty`` with uncommitted changes to tracked files, or
    ``unknown`` outside a git checkout (an installed wheel)."""
    if not (root / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def provenance(wall_s: float, cpu_s: float) -> dict[str, object]:
    """The provenance columns of one run's summary row."""
    return {
        "moesim.version": package_version(),
        "moesim.commit": git_commit(),
        "run.host": socket.gethostname(),
        "run.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run.wall_s": round(wall_s, 3),
        "run.cpu_s": round(cpu_s, 3),
    }
