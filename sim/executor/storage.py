"""Backend ``storage``: experts in one file, read with O_DIRECT into a DRAM slot pool; compute
on the CPU with torch.

This is an edge board that stages experts from NVMe into unified memory (the ``jetson_*``
profiles). The weights are real random numbers (seeded, N(0, 0.02)), written once per
(card, scale, dtype, seed) into a work folder and reused. Each read moves one expert's page-
rounded record straight into its slot's page-aligned buffer (an anonymous mmap, so no bounce
copy); the slot tensors are views of that buffer. Where O_DIRECT is unsupported (tmpfs, some
network file systems) reads fall back to buffered ``preadv`` plus
``posix_fadvise(DONTNEED)`` after each read, with one logged message; ``direct_io`` in the
results says which ran.

Paced slow tier (``pace_Bps``): every read is stretched to ``expert bytes / pace_Bps`` seconds
from its start (sleep until shortly before, then busy-wait the last ``PACE_SPIN_S`` so the end
is exact), in user space. A shared virtual disk changes speed within seconds, so an unpaced run
mixes the model's error with the disk's drift; a tier slower than the disk's slowest reads
takes the drift out and leaves the model's structural error. A read the disk itself makes
slower than the pace is not stretched, and is counted (``pace_overruns``). Not a cgroup blkio
throttle: that is a token bucket with burst credit, so short reads run at native speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moesim.sim.executor.model import PAGE, ExpertLayout

LOG = logging.getLogger("moesim.executor")

# Set (by fallback_reported) while a caller has already told the user, in its own one line,
# that reads go through the page cache: its backends then do not say it again, once each.
_FALLBACK_REPORTED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "moesim_executor_fallback_reported", default=False)


@contextlib.contextmanager
def fallback_reported() -> Iterator[None]:
    """Inside it, a backend that reads without O_DIRECT logs nothing: the caller (``moesim-
    profile storage``) has reported the fallback once for the whole measurement."""
    token = _FALLBACK_REPORTED.set(True)
    try:
        yield
    finally:
        _FALLBACK_REPORTED.reset(token)
WEIGHT_STD = 0.02
PACE_SPIN_S = 200e-6  # busy-wait this much of a paced read's tail (sleep wakes up late)


def pace_until(deadline: float) -> None:
    """Return at ``time.perf_counter() == deadline``: sleep until ``PACE_SPIN_S`` before it,
    then spin (``time.sleep`` on a loaded machine overshoots by 50-100 us or more)."""
    rest = deadline - time.perf_counter() - PACE_SPIN_S
    if rest > 0:
        time.sleep(rest)
    while time.perf_counter() < deadline:
        pass


def default_work_dir() -> Path:
    """The executor's weight files: ``executor/`` in the user cache (traces.cache)."""
    from moesim.traces.cache import cache_root

    return cache_root() / "executor"


def weights_path(work_dir: Path, card_name: str, layout: ExpertLayout, seed: int) -> Path:
    return work_dir / (f"{card_name}-h{layout.hidden}-i{layout.intermediate}-{layout.dtype}"
                       f"-seed{seed}.experts")


def _expert_bytes(layout: ExpertLayout, key: int, seed: int) -> bytes:
    rng = np.random.default_rng([seed, key])
    w = rng.standard_normal(3 * layout.matrix_elems, dtype=np.float32) * WEIGHT_STD
    if layout.dtype == "bfloat16":  # round-to-nearest-even to the upper 16 bits
        bits = w.view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(np.uint16).tobytes()
    return w.tobytes()


def ensure_weights(work_dir: Path, card_name: str, layout: ExpertLayout, seed: int) -> Path:
    """The weights file for this layout and seed, written (atomically, fsynced) if absent."""
    from filelock import FileLock

    work_dir.mkdir(parents=True, exist_ok=True)
    path = weights_path(work_dir, card_name, layout, seed)
    with FileLock(str(path) + ".lock"):
        if path.is_file() and path.stat().st_size == layout.file_bytes:
            return path
        tmp = path.with_name(f".{path.name}.tmp")
        pad = b"\0" * (layout.stride - layout.expert_bytes)
        with tmp.open("wb") as fh:
            for key in range(layout.num_keys):
                fh.write(_expert_bytes(layout, key, seed))
                fh.write(pad)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    return path


def expert_array(layout: ExpertLayout, key: int, seed: int) -> np.ndarray:
    """Expected contents of one expert (for checks): flat, float32 or raw bfloat16 bits."""
    raw = _expert_bytes(layout, key, seed)
    return np.frombuffer(raw, dtype=np.float32 if layout.dtype == "float32" else np.uint16)


class StorageBackend:
    """Reads experts from the weights file into ``capacity`` page-aligned DRAM slots."""

    name = "storage"
    device = "cpu"

    def __init__(self, path: Path, layout: ExpertLayout, capacity: int,
                 direct_io: bool | None = None, pace_Bps: float | None = None) -> None:
        import torch

        if pace_Bps is not None and not pace_Bps > 0:
            raise ValueError(f"pace_Bps must be > 0, got {pace_Bps}")
        self.layout = layout
        self.pace_Bps = pace_Bps
        self._pace_s = layout.expert_bytes / pace_Bps if pace_Bps else 0.0
        # Paced reads: count, summed wall time and native (unstretched) time, overruns. Each
        # copy worker adds under the GIL (one += each), so the totals need no lock.
        self.paced_reads = 0
        self.paced_s = 0.0
        self.native_s = 0.0
        self.pace_overruns = 0
        self.path = Path(path)
        self.capacity = capacity
        stride = layout.stride
        self._mm = mmap.mmap(-1, capacity * stride)  # anonymous: page-aligned, zeroed
        # Touch every page now: a runtime preallocates its pool, so no read in the run pays
        # a first-touch page fault.
        np.frombuffer(self._mm, dtype=np.uint8)[::mmap.PAGESIZE] = 0
        view = memoryview(self._mm)
        self._slots = [view[s * stride:(s + 1) * stride] for s in range(capacity)]
        dt = torch.float32 if layout.dtype == "float32" else torch.bfloat16
        base = torch.frombuffer(self._mm, dtype=torch.uint8)
        n, h, i = layout.matrix_elems, layout.hidden, layout.intermediate
        self._weights = []
        for s in range(capacity):
            flat = base[s * stride:s * stride + layout.expert_bytes].view(dt)
            self._weights.append((flat[:n].view(i, h), flat[n:2 * n].view(i, h),
                                  flat[2 * n:].view(h, i)))
        # The file is opened last, so nothing after it can fail and leak its descriptor.
        self.fallback_reason = ""
        self._fd = -1
        self.direct_io = False
        if direct_io is not False:
            self._open_direct()
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if direct_io is False:
                self.fallback_reason = "O_DIRECT disabled by option"
            if not _FALLBACK_REPORTED.get():
                LOG.warning("executor: reading %s without O_DIRECT (%s); buffered reads with "
                            "posix_fadvise(DONTNEED) after each one, so the page cache may "
                            "still serve some", self.path, self.fallback_reason)

    def _open_direct(self) -> None:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            self.fallback_reason = "this OS has no O_DIRECT"
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError as exc:
            self.fallback_reason = f"open with O_DIRECT failed: {exc.strerror}"
            return
        try:  # some file systems accept the flag at open and refuse the read
            os.preadv(fd, [self._slots[0][:PAGE]], 0)
        except OSError as exc:
            os.close(fd)
            self.fallback_reason = f"O_DIRECT read failed: {exc.strerror}"
            return
        self._fd, self.direct_io = fd, True

    def load(self, key: int, slot: int, engine: int = 0) -> None:
        """Read expert ``key`` into ``slot`` (runs on a copy worker; releases the GIL); with
        ``pace_Bps`` the call returns ``expert bytes / pace_Bps`` after it started."""
        t0 = time.perf_counter() if self._pace_s else 0.0
        buf = self._slots[slot]
        off = self.layout.offset(key)
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [buf[got:]], off + got)
            if n <= 0:
                raise OSError(f"short read of expert {key} at offset {off + got}")
            got += n
        if not self.direct_io:
            os.posix_fadvise(self._fd, off, len(buf), os.POSIX_FADV_DONTNEED)
        if self._pace_s:
            native = time.perf_counter() - t0
            if native > self._pace_s:
                self.pace_overruns += 1
            else:
                pace_until(t0 + self._pace_s)
            self.paced_reads += 1
            self.native_s += native
            self.paced_s += time.perf_counter() - t0

    def pace_info(self) -> dict[str, Any]:
        """The paced tier as it ran: target and achieved rate (expert bytes / mean read time),
        the disk's own mean read time under it, and how many reads it could not stretch."""
        n = self.paced_reads
        eb = self.layout.expert_bytes
        return {"pace_Bps": self.pace_Bps or float("nan"),
                "pace_achieved_Bps": eb * n / self.paced_s if n and self.paced_s
                else float("nan"),
                "pace_native_read_s": self.native_s / n if n else float("nan"),
                "pace_reads": n, "pace_overruns": self.pace_overruns}

    def weights(self, slot: int) -> tuple[Any, Any, Any]:
        """(gate [I, H], up [I, H], down [H, I]) tensors viewing the slot."""
        return self._weights[slot]

    def slot_bytes(self, slot: int) -> memoryview:
        return self._slots[slot]

    def sync(self) -> None:
        """Nothing runs asynchronously on the CPU."""

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "direct_io": self.direct_io,
                "io_fallback_reason": self.fallback_reason,
                "read_bytes_per_expert": self.layout.stride, "weights_file": str(self.path),
                **self.pace_info()}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._weights = []
        self._slots = []
