"""Page-cache-bypassing file reads for the storage profiler (``moesim-profile storage``).

The executor's backend (``sim/executor/storage.py``) reads the same way but with its own file
handling: it also test-reads once at open (some filesystems accept ``O_DIRECT`` at open and
refuse the read) and, in the buffered fallback, advises DONTNEED after each read rather than
before. A profile is only a prediction of the executor if both read alike, so keep the two in
step (or merge them).

An expert is read with one ``os.preadv`` per expert (looping on short reads) from a file
opened with ``O_DIRECT`` into a page-aligned anonymous ``mmap`` buffer, at an offset and
length rounded up to ``BLOCK`` (4 KiB). Where ``O_DIRECT`` is unavailable (no
``os.O_DIRECT``, or the filesystem answers ``EINVAL``, e.g. some tmpfs/overlay setups) the file
is opened normally and each read is preceded by ``posix_fadvise(DONTNEED)`` so it still goes to
the device as far as the kernel allows; the caller gets one sentence saying so
(``DirectFile.why``) to print once.

No torch here: the read path must be importable without it.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096  # alignment of O_DIRECT offsets, sizes and buffers (logical block / page)


def round_up(nbytes: int, block: int = BLOCK) -> int:
    """``nbytes`` rounded up to a whole number of blocks (what an O_DIRECT read must ask for)."""
    if nbytes <= 0:
        raise ValueError(f"a read needs a positive size, got {nbytes}")
    return -(-nbytes // block) * block


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned, zero-filled anonymous buffer of ``round_up(nbytes)`` bytes."""
    return mmap.mmap(-1, round_up(nbytes))


@dataclass
class DirectFile:
    """An open file for aligned reads. ``direct`` says whether O_DIRECT is in effect."""

    fd: int
    direct: bool
    why: str  # empty when direct, else the one-line reason for the buffered fallback
    path: Path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Read ``len(buf)`` bytes at ``offset`` (both multiples of BLOCK when direct).

        One ``preadv`` call normally; short reads (end of file, signals) continue where they
        stopped. Returns the bytes read (less than ``len(buf)`` only at end of file).
        """
        if not self.direct:
            advise = getattr(os, "posix_fadvise", None)
            if advise is not None:
                advise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)
        done = 0
        n = len(buf)
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got <= 0:
                break
            done += got
        return done


def open_direct(path: str | Path, *, want_direct: bool = True) -> DirectFile:
    """Open ``path`` read-only with O_DIRECT, or fall back to buffered reads with a reason."""
    path = Path(path)
    flag = getattr(os, "O_DIRECT", None)
    if want_direct and flag is None:
        why = ("O_DIRECT is not available on this platform (os.O_DIRECT missing); reading "
               "through the page cache with posix_fadvise(DONTNEED) instead")
    elif want_direct:
        try:
            return DirectFile(os.open(path, os.O_RDONLY | flag), True, "", path)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            why = (f"O_DIRECT is not supported for {path} ({os.strerror(exc.errno)}); reading "
                   "through the page cache with posix_fadvise(DONTNEED) instead")
    else:
        why = "O_DIRECT not requested; reading through the page cache"
    return DirectFile(os.open(path, os.O_RDONLY), False, why, path)


def write_random_file(path: str | Path, nbytes: int, seed: int, chunk: int = 16 * 2**20) -> Path:
    """Write ``round_up(nbytes)`` seeded pseudo-random bytes and fsync (not sparse, not zeros)."""
    import numpy as np

    path = Path(path)
    total = round_up(nbytes)
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, size=min(chunk, total), dtype=np.uint8).tobytes()
    with path.open("wb") as fh:
        left = total
        i = 0
        while left > 0:
            n = min(len(block), left)
            # vary each chunk cheaply so no two chunks are identical (dedup-proof)
            head = i.to_bytes(8, "little")
            fh.write(head + block[8:n] if n > 8 else block[:n])
            left -= n
            i += 1
        fh.flush()
        os.fsync(fh.fileno())
    return path
