"""Every summary row says which code, machine and date produced it and what the run cost."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pandas as pd

from moesim.experiments.provenance import ROOT, git_commit
from moesim.traces import write_trace
from tests.helpers import random_trace


def test_summary_row_carries_provenance(tmp_path: Path) -> None:
    tr = random_trace(num_requests=2, tokens=5, layers=26, experts=64, top_k=6, seed=1)
    meta = replace(tr.meta, model="deepseek_v2_lite", moe_layers=tuple(range(1, 27)))
    write_trace(tmp_path / "t.parquet", meta, tr.requests)
    proc = subprocess.run(
        [sys.executable, "-c", "from moesim.experiments.sim_app import main; main()", "trace=file",
         f"trace.path={tmp_path / 't.parquet'}", "progress=false", f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_parquet(tmp_path / "r" / "summary.parquet").iloc[0]
    assert row["moesim.commit"] == git_commit()
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert row["moesim.commit"].removesuffix("-dirty") == head
    assert row["run.host"] and datetime.fromisoformat(row["run.date"]).tzinfo is not None
    assert 0 < row["run.wall_s"] < 300 and 0 <= row["run.cpu_s"] < 300
