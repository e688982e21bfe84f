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


def test_ratios_divide_by_the_anchor_of_the_rows_own_run() -> None:
    """A row re-measured in a later run is compared with that run's libCacheSim replay."""
    from moesim.experiments.bench.bench_sim import runs_of

    res = json.loads(JSON.read_text())
    runs = runs_of(res)
    assert runs[0]["id"] == 0 and runs[0]["lcs_lru_cpu_s"] > 0
    row = dict(res["engines"][0], policy="probe", run=len(runs), whole_cpu_s=2.0)
    anchor = {**runs[0], "id": len(runs), "lcs_lru_cpu_s": 0.5, "policies": ["probe"]}
    text = render({**res, "runs": [*runs, anchor], "engines": [row]})
    tl = res["trace"]["token_layers"]
    line = next(x for x in text.splitlines() if x.startswith("| probe |"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[5] == f"{tl / 2.0 / 1e6:.2f} M"
    assert cells[6] == "0.25"  # (tl / 2.0) / (tl / 0.5)
    assert cells[-2] == str(len(runs))  # the run column appears once a later run exists
