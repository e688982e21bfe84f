"""The simulator benchmark block (on the docs' Benchmarks page) is the one rendered from the
committed results."""

from __future__ import annotations

import json
import math
import re

from moesim.experiments.bench.report_sim import JSON, render
from moesim.experiments.readme_blocks import doc_files, find_blocks


def test_docs_block_is_generated_from_the_results() -> None:
    res = json.loads(JSON.read_text())
    page = find_blocks(doc_files())["bench_sim"]
    assert page.name == "benchmarks.md"
    text = page.read_text()
    found = re.search(r"<!-- BEGIN generated:bench_sim -->\n(.*?)<!-- END generated:bench_sim -->",
                      text, re.S)
    assert found is not None, f"{page} has no bench_sim block"
    assert found.group(1) == render(res) + "\n", (
        f"{page}'s benchmark block differs from experiments/bench/results/bench_sim.json: run "
        "python -m moesim.experiments.readme_blocks"
    )


def test_results_compare_like_with_like() -> None:
    """Every subset comparison ran the same run on both engines and got the same metrics."""
    res = json.loads(JSON.read_text())
    rows = [r for r in res["engines"] if not r.get("error")]
    assert rows
    for r in rows:
        assert r["sub_same_metrics"], r["policy"]
        assert math.isfinite(r["sub_simpy_cpu_s"]) and r["sub_simpy_cpu_s"] > 0
    for z in res["zero_latency"]:
        assert math.isclose(z["moesim_hit_rate"], z["libcachesim_hit_rate"], abs_tol=1e-9), z
