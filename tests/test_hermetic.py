"""The suite never reads or writes the user's cache: with ``~/.cache/moesim`` and
``$MOESIM_CACHE`` both unusable (plain files where folders should be, so even root cannot write
below them), a subset of tests that build and read cached traces still passes, and the poisoned
paths are left as they were."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moesim.traces.cache import cache_root
from tests.conftest import USER_CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
# Tests that generate, import and read cache entries (embedded trace, imported CSV trace).
SUBSET = [
    "tests/predictors/test_sim_end_to_end.py::test_recency_table_replays",
    "tests/experiments/test_app.py::test_cli_bad_input_is_one_clear_line",
]


def test_session_cache_is_not_the_users(session_cache: Path) -> None:
    from platformdirs import user_cache_path

    assert cache_root() == session_cache
    users = Path(USER_CACHE_ENV) if USER_CACHE_ENV else user_cache_path("moesim",
                                                                          appauthor=False)
    assert users.resolve() != session_cache.resolve()
    assert session_cache.resolve() not in users.resolve().parents


def test_suite_passes_with_a_poisoned_user_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    poisoned_xdg = home / ".cache" / "moesim"
    poisoned_xdg.write_text("not a folder\n")
    poisoned_env = tmp_path / "moesim_cache_file"
    poisoned_env.write_text("not a folder either\n")
    env = {**os.environ, "HOME": str(home), "MOESIM_CACHE": str(poisoned_env)}
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
    assert poisoned_xdg.read_text() == "not a folder\n"
    assert poisoned_env.read_text() == "not a folder either\n"
    # (matplotlib may keep its font cache under HOME; nothing of moesim's may appear there)
    assert [p for p in home.rglob("*moesim*")] == [poisoned_xdg]
