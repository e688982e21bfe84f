"""README blocks are generated from committed result files: the committed README matches them,
and a number edited by hand is caught."""

from __future__ import annotations

from pathlib import Path

from moesim.experiments.readme_blocks import ROOT, update


def test_readme_blocks_are_up_to_date() -> None:
    assert update(ROOT / "README.md", check=True) == []


def test_a_hand_edited_number_is_caught(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- BEGIN generated:validation -->")
    row = text.index("| deepseek_v2_lite_test |", start)
    edited = text[:row] + text[row:].replace(" %", " % ", 1)
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    assert update(readme, check=True) == ["validation"]
    assert update(readme, check=False, figures=False) == ["validation"]
    assert readme.read_text() == text
