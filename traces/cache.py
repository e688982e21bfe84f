"""The user cache: one root for everything moesim derives once and keeps (imported traces, the
embedded trace, prediction tables, trained predictors), and the rules that keep it healthy.

Root: ``$MOESIM_CACHE`` if set, else the platform's user cache folder (``~/.cache/moesim`` on
Linux, honouring ``$XDG_CACHE_HOME``). Every entry is keyed by the content or full fingerprint
of what made it, so a changed input or library version gets a new entry instead of a refusal.
Writers hold a lock per entry (:func:`entry_lock`) and write through a temporary file, so two
processes never see half an entry; temporaries left by a killed writer are swept by the next
writer of the same entry, under its lock, and ``moesim-traces cache`` lists and clears the rest.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from platformdirs import user_cache_path

# Folders below the root, by what they hold (``moesim-traces cache clear --only <name>``).
KINDS = {
    "traces": "imported and embedded traces (parquet), keyed by source content",
    "predictions": "prediction tables built by predictor:<name>, keyed by predictor + trace",
    "predictors": "trained predictor checkpoints, keyed by config + data",
    "executor": "expert weight files of the real executor (experiment=validate)",
}
# What moesim itself writes at the root (the embedded trace when no folder is given); anything
# else there is not moesim's and is never listed for removal, so a mis-set $MOESIM_CACHE
# cannot make ``clear`` delete someone's files.
ROOT_PATTERNS = ("moesim_tiny_moe-*",)


def cache_root() -> Path:
    """``$MOESIM_CACHE``, else the user cache folder of the platform."""
    env = os.environ.get("MOESIM_CACHE")
    return Path(env).expanduser() if env else user_cache_path("moesim", appauthor=False)


def entry_lock(path: Path, timeout: float = -1) -> FileLock:
    """The lock of one cache entry (or any output file): ``.<name>.lock`` beside it. Held while
    the entry is built; a second builder waits and then finds the entry done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.parent / f".{path.name}.lock", timeout=timeout)


def is_temporary(p: Path) -> bool:
    """A write in progress or abandoned: ``.<name>.<random>.tmp`` (see traces.store.atomic_path)."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def sweep_temporaries(path: Path) -> int:
    """Remove abandoned temporaries of the entry ``path``; call only while holding its lock
    (then no other process is writing it). Returns how many were removed."""
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


@dataclass(frozen=True)
class Entry:
    """One item of the cache, for ``moesim-traces cache info``."""

    path: Path
    kind: str  # a KINDS folder, "embedded" (moesim files at the root) or "foreign" (kept)
    files: int
    bytes: int
    mtime: float
    stale: bool  # an abandoned temporary or a collector's part folder


def _abandoned_kind(p: Path) -> bool:
    """A temporary or a collector's part folder: stale once nobody has touched it for a while."""
    return is_temporary(p) or ".parquet.parts-" in p.name


def _is_moesim_root_item(p: Path) -> bool:
    return _abandoned_kind(p) or any(p.match(pat) for pat in ROOT_PATTERNS)


def _size(p: Path) -> tuple[int, int, float]:
    if p.is_file():
        st = p.stat()
        return 1, st.st_size, st.st_mtime
    files = nbytes = 0
    mtime = p.stat().st_mtime
    for f in p.rglob("*"):
        if f.is_file():
            st = f.stat()
            files += 1
            nbytes += st.st_size
            mtime = max(mtime, st.st_mtime)
    return files, nbytes, mtime


def entries(root: Path | None = None, older_than_s: float = 3600.0) -> list[Entry]:
    """Every item one level below each kind's folder and moesim's own items at the root, with
    sizes; lock files are not listed; anything else at the root is listed as ``foreign``.
    ``stale`` marks temporaries and part folders untouched for ``older_than_s``."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    now = time.time()
    out: list[Entry] = []
    for top in sorted(root.iterdir()):
        if top.name.endswith(".lock"):
            continue
        items = [top]
        kind = "embedded" if _is_moesim_root_item(top) else "foreign"
        if top.is_dir() and top.name in KINDS:
            kind = top.name
            items = sorted(p for p in top.iterdir() if not p.name.endswith(".lock"))
        for p in items:
            try:
                files, nbytes, mtime = _size(p)
                stale = _abandoned_kind(p) and now - mtime > older_than_s
            except OSError:  # removed while we looked
                continue
            out.append(Entry(p, kind, files, nbytes, mtime, stale))
    return out


def clear(root: Path | None = None, *, only: str | None = None, stale_only: bool = False,
          older_than_s: float = 3600.0) -> tuple[int, int, int]:
    """Remove moesim's cache entries (all, one kind, or only stale ones); never a ``foreign``
    item, and never an entry another process is writing (its lock is held): those are skipped.
    Returns (items removed, bytes removed, items skipped because in use)."""
    if only is not None and only not in KINDS:
        raise ValueError(f"unknown cache kind {only!r}; one of {', '.join(KINDS)}")
    n = nbytes = busy = 0
    for e in entries(root, older_than_s):
        if e.kind == "foreign" or (only and e.kind != only) or (stale_only and not e.stale):
            continue
        lock = FileLock(e.path.parent / f".{e.path.name}.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            busy += 1
            continue
        try:
            if e.path.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
        finally:
            lock.release()  # (its lock file stays: removing it could let two writers in)
        n += 1
        nbytes += e.bytes
    return n, nbytes, busy


class ProcessMemo:
    """The last few values built in this process, by a key that names their content (a
    trace by its file's content hash and the requests taken from it): a sweep worker that runs
    many configs on one trace loads it once. Bounded (``size`` entries, least recently used
    dropped first), so a sweep over traces holds at most ``size`` of them. The values are
    shared: callers must not change them in place (the simulator never does)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: dict[Hashable, Any] = {}
        self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value stored under ``key``, else ``build()`` (stored unless it raised)."""
        if key in self._items:
            self.hits += 1
            self._items[key] = value = self._items.pop(key)  # most recent last
            return value
        self.misses += 1
        value = build()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return value

    def clear(self) -> None:
        self._items.clear()
