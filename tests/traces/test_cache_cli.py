"""``moesim-traces cache``: lists what the cache holds with sizes, clears it whole, by kind or
only what is stale."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moesim.traces.cache import entries
from moesim.traces.cli import main


def _fill(root: Path) -> None:
    (root / "traces").mkdir(parents=True)
    (root / "traces" / "moe-beyond-csv-abc.parquet").write_bytes(b"x" * 2000)
    (root / "traces" / ".moe-beyond-csv-abc.parquet.lock").write_text("")
    old_tmp = root / "traces" / ".t.parquet.0123abcd.tmp"
    old_tmp.write_bytes(b"y" * 10)
    parts = root / "traces" / ".m.parquet.parts-0f0f"
    parts.mkdir()
    (parts / "req_000000.npz").write_bytes(b"z" * 30)
    (root / "predictors").mkdir()
    (root / "predictors" / "fate-1.pt").write_bytes(b"w" * 500)
    past = time.time() - 7200
    for p in (old_tmp, parts, parts / "req_000000.npz"):
        os.utime(p, (past, past))


def test_info_lists_kinds_sizes_and_stale(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fill(tmp_path)
    assert main(["cache", "info", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "traces: 3 item(s)" in out and "predictors: 1 item(s), 500 B" in out
    assert out.count("[stale]") == 2 and ".lock" not in out
    assert "total: 2.5 KB" in out


def test_clear_stale_then_kind_then_all(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fill(tmp_path)
    assert main(["cache", "clear", "--stale", "--root", str(tmp_path)]) == 0
    assert sorted(e.path.name for e in entries(tmp_path)) == [
        "fate-1.pt", "moe-beyond-csv-abc.parquet"]
    assert main(["cache", "clear", "--only", "predictors", "--root", str(tmp_path)]) == 0
    assert [e.path.name for e in entries(tmp_path)] == ["moe-beyond-csv-abc.parquet"]
    assert main(["cache", "clear", "--root", str(tmp_path)]) == 0
    assert entries(tmp_path) == []
    assert main(["cache", "clear", "--only", "nope", "--root", str(tmp_path)]) == 2
    assert "unknown cache kind" in capsys.readouterr().err


def test_info_of_the_session_cache_never_the_users(capsys: pytest.CaptureFixture,
                                                   session_cache: Path) -> None:
    assert main(["cache", "info"]) == 0
    assert f"cache: {session_cache}" in capsys.readouterr().out


def test_clear_never_touches_what_is_not_moesims(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """A mis-set $MOESIM_CACHE (say, a home folder) must not lose anyone's files."""
    (tmp_path / "Documents").mkdir()
    (tmp_path / "Documents" / "thesis.tex").write_text("precious")
    (tmp_path / ".bashrc").write_text("precious")
    (tmp_path / "moesim_tiny_moe-abc.parquet").write_bytes(b"x")
    assert main(["cache", "info", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "foreign: 2 item(s)" in out and "embedded: 1 item(s)" in out
    assert main(["cache", "clear", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "Documents" / "thesis.tex").read_text() == "precious"
    assert (tmp_path / ".bashrc").read_text() == "precious"
    assert not (tmp_path / "moesim_tiny_moe-abc.parquet").exists()


def test_clear_skips_an_entry_being_written(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    from moesim.traces.cache import entry_lock

    (tmp_path / "traces").mkdir()
    busy = tmp_path / "traces" / "t.parquet"
    busy.write_bytes(b"x")
    with entry_lock(busy):
        assert main(["cache", "clear", "--root", str(tmp_path)]) == 0
    assert busy.exists() and "1 in use by another process" in capsys.readouterr().out
