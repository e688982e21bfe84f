"""The README stays a short front page (the docs pages hold the rest), and every link in it
resolves: to a file of the repository and, with #anchor, to a heading of that page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_at_most_12_kb() -> None:
    assert len(README.read_bytes()) <= 12 * 1024


def _anchors(page: Path) -> set[str]:
    toc = pytest.importorskip("markdown.extensions.toc")
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", page.read_text(), re.M)
    return {toc.slugify(h, "-") for h in heads}


def test_every_readme_link_resolves() -> None:
    targets = LINK.findall(README.read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs pages"
    for target in local:
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), target
        if anchor:
            assert anchor in _anchors(file), target
