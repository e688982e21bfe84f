"""Session-wide test setup: the suite never touches the user's cache.

Every test runs with ``$MOESIM_CACHE`` pointing at one temporary folder for the whole session
(the embedded trace is generated there once per session), whatever the user's ``~/.cache/moesim``
or ``$MOESIM_CACHE`` hold; ``tests/test_hermetic.py`` proves the suite passes with both poisoned.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The user's own settings, before the session replaced them (tests that prove hermeticity).
USER_CACHE_ENV = os.environ.get("MOESIM_CACHE")
# A small command-line run with cold kernels would run on SimPy and compile them in the
# background (sim.compiled.warm): off for the whole session, set before any test module builds
# a subprocess environment from os.environ, so which engine a test's run uses never depends on
# numba's cache (tests/sim/test_cold_start.py turns it on where it tests it).
os.environ["MOESIM_BACKGROUND_COMPILE"] = "0"


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache root for the session (tests may still point MOESIM_CACHE elsewhere)."""
    root = tmp_path_factory.mktemp("moesim_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOESIM_CACHE", str(root))
    try:
        yield root
    finally:
        mp.undo()
