"""The wall-clock ``SimClock``: what a policy reads, with ``now`` in real seconds.

The same fields as the simulator's clock (``sim.engine.Clock``); the run loop calls
:meth:`WallClock.tick` right before every policy call, as the SimPy loop sets ``now`` at every
yield, so a policy sees the time of the moment it is called and cannot tell the drivers apart.
"""

from __future__ import annotations

import time


class WallClock:
    """``now`` = seconds since :meth:`start` (0 before), read with ``time.perf_counter``."""

    __slots__ = ("_origin", "counting", "layer", "now", "position", "step")

    def __init__(self) -> None:
        self.now = 0.0
        self.step = 0
        self.layer = 0
        self.position = 0
        self.counting = True
        self._origin: float | None = None

    def start(self) -> None:
        self._origin = time.perf_counter()
        self.now = 0.0

    def elapsed(self) -> float:
        """Seconds since start, without moving ``now``."""
        return 0.0 if self._origin is None else time.perf_counter() - self._origin

    def tick(self) -> float:
        """Set ``now`` to the current wall time and return it."""
        self.now = self.elapsed()
        return self.now
