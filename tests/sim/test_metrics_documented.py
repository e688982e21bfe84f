"""The docs' metrics page is the one place metrics are defined: every summary column and
per-layer column the simulator (and the app's provenance) writes is named there."""

from __future__ import annotations

import re
from pathlib import Path

from moesim.experiments.provenance import provenance
from moesim.sim import FixedCompute, FixedLink, simulate
from tests.helpers import random_trace

METRICS_PAGE = Path(__file__).resolve().parents[2] / "experiments/docs/pages/metrics.md"


def _documented() -> set[str]:
    return set(re.findall(r"`([A-Za-z_0-9.]+)`", METRICS_PAGE.read_text()))


def test_every_written_metric_is_defined_on_the_metrics_page() -> None:
    tr = random_trace(num_requests=2, tokens=5, layers=4, experts=8, top_k=2, seed=1)
    res = simulate(tr, "lru", capacity=4, link=FixedLink(1e-3, float("inf"), 1),
                   compute=FixedCompute(expert_s=1e-4))
    names = _documented()
    assert [k for k in res.summary if k not in names] == []
    assert [c for c in res.per_layer.columns if c not in names] == []
    assert [k for k in provenance(1.0, 1.0) if k not in names] == []


def test_the_readme_defines_no_metrics_of_its_own() -> None:
    """One place: the README links to the metrics page instead of keeping a second table."""
    readme = (METRICS_PAGE.parents[3] / "README.md").read_text()
    assert "| metric | definition |" not in readme
    assert "experiments/docs/pages/metrics.md" in readme
