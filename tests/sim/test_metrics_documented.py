"""The README's metrics table is the one place metrics are defined: every summary column and
per-layer column the simulator (and the app's provenance) writes is named there."""

from __future__ import annotations

import re
from pathlib import Path

from moesim.experiments.provenance import provenance
from moesim.sim import FixedCompute, FixedLink, simulate

from tests.helpers import random_trace

README = Path(__file__).resolve().parents[2] / "README.md"


def _documented() -> set[str]:
    text = README.read_text()
    start = text.index("### Metrics")
    section = text[start:text.index("\n## ", start)]
    return set(re.findall(r"`([A-Za-z_0-9.]+)`", section))


def test_every_written_metric_is_defined_in_the_readme() -> None:
    tr = random_trace(num_requests=2, tokens=5, layers=4, experts=8, top_k=2, seed=1)
    res = simulate(tr, "lru", capacity=4, link=FixedLink(1e-3, float("inf"), 1),
                   compute=FixedCompute(expert_s=1e-4))
    names = _documented()
    assert [k for k in res.summary if k not in names] == []
    assert [c for c in res.per_layer.columns if c not in names] == []
    assert [k for k in provenance(1.0, 1.0) if k not in names] == []
