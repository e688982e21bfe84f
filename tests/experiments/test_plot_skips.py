"""Issue 25: moesim-plot skips and names a run folder whose table cannot be read (a 0-byte
summary of a run killed mid-write was a traceback that stopped the whole plot)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from moesim.experiments.plot import collect, collect_per_request


def test_unreadable_run_folders_are_skipped_and_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, rate in (("good_a", 0.5), ("good_b", 0.7)):
        (tmp_path / name).mkdir()
        pd.DataFrame([{"policy.name": "lru", "hit_rate": rate}]).to_parquet(
            tmp_path / name / "summary.parquet")
        pd.DataFrame([{"request_id": 0}]).to_parquet(tmp_path / name / "per_request.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "summary.parquet").write_bytes(b"")
    (tmp_path / "good_b" / "per_request.parquet").write_bytes(b"PAR1 truncated")
    df = collect(tmp_path)
    assert sorted(df["run_dir"]) == ["good_a", "good_b"]
    per_request = collect_per_request(tmp_path)
    assert list(per_request["run_dir"]) == ["good_a"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("moesim-plot: skipped ") for line in err)
    assert "empty: unreadable summary.parquet" in err[0]
    assert "good_b: unreadable per_request.parquet" in err[1]


def test_no_readable_summary_is_the_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no readable summary\.parquet below"):
        collect(tmp_path)
