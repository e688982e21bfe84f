"""numba's cache of the compiled engine: dropped when any compiled module changed, and a
one-line notice when a run is about to compile the kernels.

numba's ``cache=True`` checks only the file that defines a function, but a kernel's cached
code includes every helper it calls from the sibling modules: after editing (or upgrading) one
module, a caller cached from an older version would run the old helper, or crash when the
layout of ``S`` changed. One digest over all of ``sim/compiled/*.py`` is kept beside the cache;
when it differs, the cache files of this package are removed and numba compiles afresh.

Compiling takes ~40 CPU-s and happens at the kernel's first call in a process whose cache is
cold (a fresh install or clone, or any edit under ``sim/compiled/``). numba does it silently, so
:func:`compile_notice` says so on stderr first; a warm run prints nothing. Processes that would
compile at the same time (a sweep's workers, a background compile, see
:mod:`moesim.sim.compiled.warm`) take :func:`compile_lock` first: one compiles, on tiny runs
(``compiled.ensure_compiled``), the others wait for that compile only and then load its cache
instead of compiling the same code again beside it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

_NAME = "moesim_compiled.digest"
_LOCK = "moesim_compile.lock"
WAITING = "waiting for another process that is compiling the simulator's kernels"
NOTICE = "compiling the simulator's kernels once (~40 s); later runs reuse them"


def _here() -> None:
    """A function of this folder: numba's cache locator for it is the kernels' one."""


def cache_folder(func: Any = None) -> Path | None:
    """Where numba keeps the cache files of ``func`` (a dispatcher or a plain function; default:
    the kernels of this folder): the package's ``__pycache__``, a folder under
    ``NUMBA_CACHE_DIR``, or numba's user-wide fallback when the package folder is read-only.
    Found without compiling or loading anything, so the stale cache can be dropped before the
    kernel modules load it (functions with a signature compile at import)."""
    func = getattr(func, "py_func", func) or _here
    try:
        from numba.core.caching import CompileResultCacheImpl

        return Path(CompileResultCacheImpl(func)._locator.get_cache_path())
    except Exception:  # numba's internals moved
        return None


def refresh_cache(folder: Path | None = None, cache: Path | None = None) -> bool:
    """Remove stale cache files (``*.nbi|nbc`` in ``cache``, default ``folder/__pycache__``)
    when the digest of ``folder``'s modules changed; True if any were removed. Best effort: an
    unwritable cache folder is left as it is (numba then uses its own fallback)."""
    folder = folder or Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    want = digest.hexdigest()
    cache = cache or (cache_folder() if folder == Path(__file__).parent else None) \
        or folder / "__pycache__"
    stamp = cache / _NAME
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    removed = False
    try:
        for path in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            path.unlink(missing_ok=True)
            removed = True
        cache.mkdir(parents=True, exist_ok=True)
        stamp.write_text(want)
    except OSError:
        return removed
    return removed


def will_compile(dispatcher: Any) -> bool:
    """True when calling ``dispatcher`` now compiles it: nothing compiled or loaded in this
    process yet, and numba's cache index for it is missing, from another numba version or
    for an older source file (numba's own freshness test)."""
    if not hasattr(dispatcher, "signatures"):  # a plain function (NUMBA_DISABLE_JIT=1)
        return False
    if dispatcher.signatures:  # compiled or loaded from the cache earlier in this process
        return False
    try:
        return not dispatcher._cache._cache_file._load_index()
    except Exception:  # numba's internals moved: judge by the index file alone
        folder = cache_folder(dispatcher)
        return folder is None or not any(folder.glob(f"*{dispatcher.__name__}*.nbi"))


def compile_notice(dispatcher: Any, stream: TextIO | None = None) -> bool:
    """Print :data:`NOTICE` (one line, stderr) if calling ``dispatcher`` now compiles it;
    True if printed."""
    if not will_compile(dispatcher):
        return False
    out = stream if stream is not None else sys.stderr
    print(NOTICE, file=out, flush=True)
    return True


def kernels_cached(cache: Path | None = None) -> bool:
    """True when numba's cache holds the replay kernel for this Python (its index file): a run
    then loads the kernels in about a second instead of compiling them. Judged from the files
    alone, without importing (and so compiling) anything; :func:`refresh_cache` has already
    dropped a stale cache when this package was imported. (A cache filled on another CPU
    model passes this test and still compiles: numba decides that at load time.)"""
    cache = cache or cache_folder()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache is not None and any(cache.glob(f"kernel.replay-*.{tag}.nbi"))


# The lock files this process holds: a flock belongs to one open file, so taking it again in
# the same process (the tiny runs of a compile call the engine, which takes it) would wait for
# itself; a nested take sees it here and goes on. Process-wide by nature, as the lock is.
_HELD: set[Path] = set()
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


_FAILED = "moesim_compile.failed"


def _digest(cache: Path) -> str | None:
    try:
        return (cache / _NAME).read_text()
    except OSError:
        return None


def mark_compile_failed(cache: Path | None = None) -> None:
    """Record that a background compile of the current sources failed (the sources' digest),
    so that later runs stop starting one and compile in their own process, where the error
    is reported; an edit of the sources (a new digest) clears it. Best effort."""
    cache = cache or cache_folder()
    digest = None if cache is None else _digest(cache)
    if cache is None or digest is None:
        return
    with suppress(OSError):
        (cache / _FAILED).write_text(digest)


def clear_compile_failed(cache: Path | None = None) -> None:
    """Forget a failed background compile (a later compile succeeded)."""
    cache = cache or cache_folder()
    if cache is not None:
        with suppress(OSError):
            (cache / _FAILED).unlink(missing_ok=True)


def compile_failed(cache: Path | None = None) -> bool:
    """True when a background compile of the current sources has failed
    (:func:`mark_compile_failed`)."""
    cache = cache or cache_folder()
    if cache is None:
        return False
    digest = _digest(cache)
    try:
        return digest is not None and (cache / _FAILED).read_text() == digest
    except OSError:
        return False


def take_lock_fd(cache: Path | None = None) -> tuple[str, int | None]:
    """Take the compile lock without waiting on a descriptor of its own, for a process that
    hands it to the compile (``warm.start``): ``("held", fd)`` (the caller closes ``fd``;
    a child that inherited it keeps the lock), ``("busy", None)`` (another process holds it)
    or ``("none", None)`` (no lock can be taken here, as for :func:`compile_lock`)."""
    try:
        import fcntl
    except ImportError:
        return "none", None
    cache = cache or cache_folder()
    if cache is None:
        return "none", None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError:
        return "none", None
    state = _take(fcntl, fd, False, None)
    if state != "held":
        os.close(fd)
        return state, None
    return state, fd


def lock_held_here(cache: Path | None = None) -> bool:
    """True while this process holds the compile lock (a compile of its own is running)."""
    cache = cache or cache_folder()
    return cache is not None and cache / _LOCK in _HELD


@contextmanager
def compile_lock(cache: Path | None = None, blocking: bool = True,
                 stream: TextIO | None = None) -> Iterator[str]:
    """Hold the kernels' compile lock (an exclusive ``flock`` on a file in the cache folder)
    for the block. Yields ``"held"``; ``"busy"`` when not ``blocking`` and another process
    holds it; ``"none"`` where no lock can be taken (no ``fcntl``, an unwritable cache folder,
    a file system without ``flock`` such as Lustre mounted without it), where the block runs
    unlocked, as numba would run it anyway. Blocking, it says once on ``stream`` (default
    stderr) that it waits for another process. Taken again inside the block by the same
    process, it yields ``"held"`` at once."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: numba compiles without the lock
        yield "none"
        return
    cache = cache or cache_folder()
    if cache is None:  # numba's cache locator moved: no folder to lock in
        yield "none"
        return
    path = cache / _LOCK
    if path in _HELD:
        yield "held"
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield "none"
        return
    with handle:
        state = _take(fcntl, handle, blocking, stream)
        if state != "held":
            yield state
            return
        _HELD.add(path)
        try:
            yield "held"
        finally:
            _HELD.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _take(fcntl: Any, handle: Any, blocking: bool, stream: TextIO | None) -> str:
    """Take the flock: ``"held"``, ``"busy"`` (another process has it, not blocking) or
    ``"none"`` (this file system cannot lock)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "held"
    except OSError as exc:
        if exc.errno not in _BUSY:
            return "none"
    if not blocking:
        return "busy"
    print(WAITING, file=stream if stream is not None else sys.stderr, flush=True)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        return "none"
    return "held"
