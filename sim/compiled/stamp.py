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
:mod:`moesim.sim.compiled.warm`) take :func:`compile_lock` first: one compiles, the others wait
and then load its cache instead of compiling the same code again beside it.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    """True when numba's cache holds the replay kernel (its index file): a run then loads the
    kernels in about a second instead of compiling them. Judged from the files alone, without
    importing (and so compiling) anything; :func:`refresh_cache` has already dropped a stale
    cache when this package was imported."""
    cache = cache or cache_folder()
    return cache is not None and any(cache.glob("kernel.replay-*.nbi"))


@contextmanager
def compile_lock(cache: Path | None = None, blocking: bool = True,
                 stream: TextIO | None = None) -> Iterator[bool]:
    """Hold the kernels' compile lock (an exclusive ``flock`` on a file in the cache folder)
    for the block; yields whether it is held. Blocking, it says once on ``stream`` (default
    stderr) that it waits when another process holds it. Where no lock can be taken (no
    ``fcntl``, an unwritable cache folder) the block runs unlocked and gets False, as numba
    would run it anyway."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: numba compiles without the lock
        yield False
        return
    cache = cache or cache_folder()
    try:
        assert cache is not None
        cache.mkdir(parents=True, exist_ok=True)
        handle = open(cache / _LOCK, "a")  # noqa: SIM115 (held across the yield)
    except (AssertionError, OSError):
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not blocking:
                yield False
                return
            print(WAITING, file=stream if stream is not None else sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
