"""``predictors.evaluate`` scores any prediction table against its trace."""

from pathlib import Path

from moesim.predictors.evaluate import main, score
from moesim.traces import write_trace
from moesim.traces.predictions import PredictionWriter, content_digest, trace_identity
from tests.helpers import random_trace


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


def test_a_table_made_for_another_trace_is_an_error(tmp_path: Path, capsys) -> None:
    """Same model and shape, other routing: the recorded content digest tells them apart."""
    mine = random_trace(num_requests=2, tokens=5, layers=3, experts=8, top_k=2, seed=4)
    other = random_trace(num_requests=2, tokens=5, layers=3, experts=8, top_k=2, seed=5)
    write_trace(tmp_path / "mine.parquet", mine.meta, mine.requests)
    write_trace(tmp_path / "other.parquet", other.meta, other.requests)
    writer = PredictionWriter(tmp_path / "p.parquet", other.meta.moe_layers,
                              trace=trace_identity(other.meta,
                                                   content_digest(tmp_path / "other.parquet")))
    for r in other.requests:
        writer.add(r.request_id, r.experts)
    writer.close({"model": "synthetic"})
    assert main([str(tmp_path / "other.parquet"), str(tmp_path / "p.parquet")]) == 0
    assert main([str(tmp_path / "mine.parquet"), str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert "content digest" in err and "mine.parquet" in err
