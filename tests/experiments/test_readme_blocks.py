"""Generated blocks (README and docs pages) come from committed result files: the committed
files match them, a number edited by hand is caught, and misplaced markers are refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from moesim.experiments.readme_blocks import (
    BLOCKS,
    SWEEP_RESULTS,
    SWEEPS,
    collect_sweep,
    doc_files,
    find_blocks,
    render_prediction_point,
    render_stall_vs_link,
    update,
)


def test_generated_blocks_are_up_to_date() -> None:
    assert update(check=True) == []


def test_every_block_lives_in_exactly_one_file() -> None:
    where = find_blocks(doc_files())
    assert sorted(where) == sorted(BLOCKS)


def test_a_hand_edited_number_is_caught(tmp_path: Path) -> None:
    page = find_blocks(doc_files())["validation"]
    text = page.read_text()
    start = text.index("<!-- BEGIN generated:validation -->")
    row = text.index("| deepseek_v2_lite_test |", start)
    edited = text[:row] + text[row:].replace(" %", " % ", 1)
    copy = tmp_path / page.name
    copy.write_text(edited)
    assert update([copy], check=True) == ["validation"]
    assert update([copy], check=False, figures=False) == ["validation"]
    assert copy.read_text() == text


def test_a_marker_quoted_inside_a_line_is_not_a_block(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("A block sits between `<!-- BEGIN generated:x -->` and\n"
                    "`<!-- END generated:x -->`, as `<!-- BEGIN generated:y -->` says.\n")
    assert find_blocks([page]) == {}


@pytest.mark.parametrize("text, message", [
    ("<!-- BEGIN generated:validation -->\nx\n", "no matching pair"),
    ("<!-- BEGIN generated:nope -->\nx\n<!-- END generated:nope -->\n", "has no renderer"),
])
def test_bad_markers_are_one_error_line(tmp_path: Path, text: str, message: str) -> None:
    page = tmp_path / "p.md"
    page.write_text(text)
    with pytest.raises(SystemExit, match=message):
        find_blocks([page])


def test_a_block_in_two_files_is_refused(tmp_path: Path) -> None:
    block = "<!-- BEGIN generated:bench_sim -->\nx\n<!-- END generated:bench_sim -->\n"
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text(block)
    b.write_text(block)
    with pytest.raises(SystemExit, match="in both"):
        find_blocks([a, b])


def _summary(run: Path, **row: object) -> None:
    run.mkdir(parents=True)
    pd.DataFrame([row]).to_parquet(run / "summary.parquet")


def _stall_row(policy: str, hw: str, stall: float) -> dict[str, object]:
    return {"policy.name": policy, "hw.name": hw, "hit_rate_incl_late": 0.5,
            "stall_per_output_token_s": stall, "time_per_output_token_s": 2 * stall,
            "moesim.version": "9.9", "moesim.commit": "abc", "run.date": "2026-01-02T03:04:05",
            "unrelated": 1}


def test_collect_keeps_factors_metrics_and_provenance_sorted(tmp_path: Path) -> None:
    _summary(tmp_path / "s" / "1", **_stall_row("lru", "v100_pcie", 0.2))
    _summary(tmp_path / "s" / "0", **_stall_row("belady", "v100_pcie", 0.1))
    df = collect_sweep("stall_vs_link", [tmp_path / "s"])
    spec = SWEEP_RESULTS["stall_vs_link"]
    assert list(df.columns) == [*spec.factors, *spec.metrics, "moesim.version",
                                "moesim.commit", "run.date"]
    assert list(df["policy.name"]) == ["belady", "lru"]
    table = render_stall_vs_link(df)
    assert "| `lru` | 200.0 / 50.0 % |" in table and "moesim 9.9; commit abc" in table


@pytest.mark.parametrize("rows, message", [
    ([], "no summary.parquet"),
    ([{"policy.name": "lru", "hw.name": "x"}], "no column"),
    ([_stall_row("lru", "x", 0.1), _stall_row("lru", "x", 0.2)], "several runs with the same"),
])
def test_collect_refuses_what_cannot_be_a_table(tmp_path: Path, rows: list[dict[str, object]],
                                                message: str) -> None:
    (tmp_path / "s").mkdir()
    for i, row in enumerate(rows):
        _summary(tmp_path / "s" / str(i), **row)
    with pytest.raises(SystemExit, match=message):
        collect_sweep("stall_vs_link", [tmp_path / "s"])
    with pytest.raises(SystemExit, match="not a sweep table"):
        collect_sweep("nope", [tmp_path / "s"])


def test_every_sweep_table_has_its_committed_results() -> None:
    for name, spec in SWEEP_RESULTS.items():
        df = pd.read_csv(SWEEPS / f"{name}.csv")
        assert not df.duplicated(list(spec.factors)).any(), name
        assert set(spec.metrics) <= set(df.columns), name


def test_prediction_point_table_reports_stall_saved_against_no_prediction() -> None:
    rows = []
    for scale, base in ((1, 60e-6), (10, 40e-6)):
        for label, stall in (("none", base), ("oracle_next_layer", base / 4)):
            rows.append({"mode": "timed", "compute_scale": scale, "label": label,
                         "hit_rate": 0.5, "stall_per_output_token_s": stall,
                         "time_per_output_token_s": 2 * base})
            rows.append({"mode": "zero_latency", "compute_scale": scale, "label": label,
                         "hit_rate": 0.6 if label == "none" else 1.0,
                         "stall_per_output_token_s": float("nan"),
                         "time_per_output_token_s": float("nan")})
    table = render_prediction_point(pd.DataFrame(rows))
    assert "| `none` | 0.600 | 60.0 µs (+0 %) | 40.0 µs (+0 %) |" in table
    assert "| `oracle_next_layer` | 1.000 | 15.0 µs (+75 %) | 10.0 µs (+75 %) |" in table
    assert "| time / token, `none` | | 120.0 µs | 80.0 µs |" in table
