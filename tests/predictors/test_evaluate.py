"""``predictors.evaluate`` scores any prediction table against its trace."""

from pathlib import Path

from predictors.evaluate import main, score
from tests.helpers import random_trace
from traces import write_trace
from traces.predictions import PredictionWriter


def test_perfect_and_partial_tables(tmp_path: Path, capsys) -> None:
    tr = random_trace(num_requests=2, tokens=5, layers=3, experts=8, top_k=2, seed=4)
    write_trace(tmp_path / "t.parquet", tr.meta, tr.requests)
    writer = PredictionWriter(tmp_path / "p.parquet", tr.meta.moe_layers)
    writer.add(0, tr.requests[0].experts)  # request 1 has no predictions
    writer.close({"model": "synthetic"})
    rows, missing, meta = score(tmp_path / "t.parquet", tmp_path / "p.parquet")
    overall = rows[-1]
    assert overall["layer"] == "all" and overall["exact_match"] == 1.0
    assert missing == 5 * 3 and meta["available_at"] == "routed:same_layer"
    assert main([str(tmp_path / "t.parquet"), str(tmp_path / "p.parquet")]) == 0
    assert main([str(tmp_path / "missing.parquet"), str(tmp_path / "p.parquet")]) == 2
    assert "error:" in capsys.readouterr().err
