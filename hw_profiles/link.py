"""One transfer path (host->GPU over PCIe, or NVMe->DRAM) as a size-dependent bandwidth.

Interpolation is linear in log(size)-log(bandwidth), i.e. a power law between measured points.
Unlike linear-in-bandwidth interpolation this keeps the copy time ``size / bandwidth``
monotone in size whenever the measured points are (which the loader checks), and it keeps the
bandwidth between its neighbouring measured values.

Latency: ``transfer_time = latency_s + nbytes / bandwidth(nbytes)``. A curve measured with
back-to-back copies (CUDA ``bandwidthTest``, ``moesim-profile``) already contains the per-copy
cost, so such profiles set ``latency_s`` to 0; profiles with only a peak bandwidth carry the
per-copy cost in ``latency_s`` instead. See experiments/docs/pages/hardware-profiles.md.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from itertools import accumulate


@dataclass(frozen=True)
class LinkModel:
    """Seconds to move ``nbytes`` over one path; ``copy_engines`` copies may run at once."""

    name: str
    latency_s: float
    curve: tuple[tuple[int, float], ...]
    peak_bandwidth_Bps: float
    copy_engines: int = 1
    _sizes: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _times: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _expo: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"link {self.name!r}: latency_s must be >= 0, got {self.latency_s}")
        if not (self.peak_bandwidth_Bps > 0 and math.isfinite(self.peak_bandwidth_Bps)):
            raise ValueError(
                f"link {self.name!r}: peak_bandwidth_Bps must be > 0, got {self.peak_bandwidth_Bps}"
            )
        if self.copy_engines < 1:
            raise ValueError(f"link {self.name!r}: copy_engines must be >= 1")
        curve = tuple((int(s), float(b)) for s, b in self.curve)
        sizes = tuple(float(s) for s, _ in curve)
        times = tuple(s / b for s, b in curve)
        for i, (s, b) in enumerate(curve):
            if s <= 0 or not b > 0:
                raise ValueError(f"link {self.name!r}: curve point {i} must be positive")
            if i and (s <= curve[i - 1][0] or times[i] < times[i - 1] * (1 - 1e-12)):
                raise ValueError(
                    f"link {self.name!r}: curve sizes must ascend and copy time must not fall "
                    f"(point {i}: {curve[i]})"
                )
        # Equal-within-rounding neighbours are allowed above; a running max keeps float noise
        # from ever making a bigger copy 1 ulp faster. Per segment, time grows as size**q.
        times = tuple(accumulate(times, max))
        expo = tuple(
            max(0.0, math.log(times[i + 1] / times[i]) / math.log(sizes[i + 1] / sizes[i]))
            for i in range(len(curve) - 1)
        )
        object.__setattr__(self, "curve", curve)
        object.__setattr__(self, "_sizes", sizes)
        object.__setattr__(self, "_times", times)
        object.__setattr__(self, "_expo", expo)

    def _wire_time(self, nbytes: float) -> float:
        """Seconds on the wire without latency_s (the curve's own time, or size / peak)."""
        sizes, times = self._sizes, self._times
        if not sizes:
            return nbytes / self.peak_bandwidth_Bps
        if nbytes <= sizes[0]:
            return nbytes / self.curve[0][1]
        if nbytes >= sizes[-1]:
            return max(nbytes / self.curve[-1][1], times[-1])
        i = bisect_right(sizes, nbytes) - 1
        t = times[i] * (nbytes / sizes[i]) ** self._expo[i]
        return min(max(t, times[i]), times[i + 1])  # guard against pow rounding at the joints

    def bandwidth(self, nbytes: int) -> float:
        """Bytes/s for one copy of ``nbytes``: interpolated on the curve, clamped at its ends."""
        if not self.curve:
            return self.peak_bandwidth_Bps
        if nbytes <= self._sizes[0]:
            return self.curve[0][1]
        if nbytes >= self._sizes[-1]:
            return self.curve[-1][1]
        return nbytes / self._wire_time(nbytes)

    def transfer_time(self, nbytes: int) -> float:
        """Seconds for one copy: ``latency_s + nbytes / bandwidth(nbytes)``; 0 bytes cost 0."""
        if nbytes <= 0:
            return 0.0
        return self.latency_s + self._wire_time(nbytes)

    def scaled_to_peak(self, peak_Bps: float) -> LinkModel:
        """The same curve shape at another plateau (what-if sweeps over link speed)."""
        if not self.curve:
            return replace(self, peak_bandwidth_Bps=peak_Bps)
        factor = peak_Bps / max(b for _, b in self.curve)
        return replace(
            self,
            curve=tuple((s, b * factor) for s, b in self.curve),
            peak_bandwidth_Bps=peak_Bps,
        )
