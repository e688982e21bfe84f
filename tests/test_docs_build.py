"""The docs site builds in strict mode: no warning, no broken link or anchor, every API page
resolved (skipped when the docs tools are not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path: Path) -> None:
    for mod in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod)
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "-f", str(ROOT / "experiments" / "docs" / "mkdocs.yml"), "-d", str(site)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "WARNING" not in out.stderr
    api = (site / "api" / "sim.html").read_text()
    assert "moesim.sim.run" in api and "simulate" in api
    # figures linked by their repository path are published with the site
    assert (site / "_repo" / "experiments" / "figures" / "timeline_oracle_v100.png").is_file()
    assert (site / "metrics.html").is_file()
