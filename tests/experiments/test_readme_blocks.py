"""Generated blocks (README and docs pages) come from committed result files: the committed
files match them, a number edited by hand is caught, and misplaced markers are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from moesim.experiments.readme_blocks import BLOCKS, doc_files, find_blocks, update


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
