"""``moesim-traces`` subcommands and the statistics they write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.traces import RequestRouting, TraceMeta, write_trace
from moesim.traces.cli import main
from moesim.traces.stats import MAX_DISTANCE, collect, tables
from tests.traces.fixtures import write_moe_beyond, write_qwen_folder


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_info_validate(tmp_path: Path, capsys) -> None:
    write_moe_beyond(tmp_path / "src", {1: 3, 2: 2})
    out = tmp_path / "t.parquet"
    code, text, _ = _run(
        capsys,
        "import",
        "--format",
        "moe-beyond-csv",
        str(tmp_path / "src"),
        str(out),
        "-o",
        "workers=1",
        "-q",
    )
    assert code == 0 and "2 requests, 5 tokens, 130 rows" in text
    code, text, _ = _run(capsys, "info", str(out))
    assert code == 0
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["requests"].strip() == "2"
    assert fields["tokens"].strip().startswith("5 ")
    assert fields["rows"].strip() == "130"
    assert fields["layers"].strip() == "26 (1..26)"
    assert fields["experts"].strip() == "64 (+2 shared)"
    assert fields["top-k"].strip() == "6"
    assert fields["model"].strip() == "deepseek_v2_lite"
    assert fields["partial"].strip() == "no"
    code, text, _ = _run(capsys, "info", "--notes", str(out))
    assert "note phase:" in text
    code, text, _ = _run(capsys, "validate", str(out))
    assert code == 0 and text.startswith("ok:")


def test_raw_source_with_format(tmp_path: Path, capsys) -> None:
    write_qwen_folder(tmp_path / "src", layers=(0, 8))
    code, text, _ = _run(capsys, "info", "--format", "vllm-routes-jsonl", str(tmp_path / "src"))
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}
    assert code == 0 and fields["layers"] == "2 (0, 8)" and fields["partial"] == "yes"
    code, text, _ = _run(
        capsys, "validate", "-f", "vllm-routes-jsonl", "-o", "segment=stream", str(tmp_path / "src")
    )
    assert code == 0 and "1 requests" in text
    code, _, _ = _run(
        capsys,
        "stats",
        "-f",
        "vllm-routes-jsonl",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "st"),
        "--no-plots",
    )
    assert code == 0 and (tmp_path / "st" / "stats.parquet").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "{tmp}/missing.parquet"],
        ["info", "{tmp}"],  # a folder without --format
        ["validate", "{tmp}/notparquet.parquet"],
        ["import", "-f", "moe-beyond-csv", "{tmp}/empty", "{tmp}/o.parquet"],
        ["import", "-f", "moe-beyond-csv", "{tmp}/bad", "{tmp}/o.parquet"],
        ["import", "-f", "moe-beyond-csv", "-o", "nokey", "{tmp}/bad", "{tmp}/o.parquet"],
        ["stats", "{tmp}/notparquet.parquet", "--out", "{tmp}/st"],
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, capsys, argv: list[str]) -> None:
    (tmp_path / "notparquet.parquet").write_text("hello")
    (tmp_path / "empty").mkdir()
    write_moe_beyond(tmp_path / "bad", {1: 2})
    bad = tmp_path / "bad" / "prompt_1_data.csv"
    bad.write_text(bad.read_text().replace("[", "[77, ", 1))
    code, out, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.parquet").exists()


def test_stats_outputs(tmp_path: Path, capsys) -> None:
    write_moe_beyond(tmp_path / "src", {1: 6, 2: 4})
    out = tmp_path / "t.parquet"
    assert main(["import", "-q", "-f", "moe-beyond-csv", str(tmp_path / "src"), str(out)]) == 0
    code, _text, _ = _run(capsys, "stats", str(out), "--out", str(tmp_path / "st"))
    assert code == 0
    names = {p.name for p in (tmp_path / "st").iterdir()}
    for fig in (
        "expert_freq_heatmap",
        "concentration",
        "reuse_distance_cdf",
        "coactivation",
        "routing_entropy",
    ):
        assert {f"{fig}.png", f"{fig}.pdf"} <= names
    stats = pd.read_parquet(tmp_path / "st" / "stats.parquet")
    assert list(stats["layer"]) == list(range(1, 27))
    assert (stats["entropy_bits"] <= stats["max_entropy_bits"] + 1e-9).all()
    co = pd.read_parquet(tmp_path / "st" / "stats_coactivation.parquet")
    assert len(co) == 25 and (co["mi_bits"] >= 0).all()
    summary = json.loads((tmp_path / "st" / "summary.json").read_text())
    assert summary["tokens"] == 10 and summary["rows"] == 260


def test_statistics_on_a_known_trace() -> None:
    """Hand-checkable numbers: 2 layers, 4 experts, top-1."""
    meta = TraceMeta("toy", (0, 1), num_experts=4, top_k=1)
    # layer 0 always expert 0; layer 1 alternates 1, 2 -> reuse distance 2 at layer 1
    ex = np.array([[[0], [1]], [[0], [2]], [[0], [1]], [[0], [2]]], dtype=np.int16)
    req = RequestRouting(0, ex, np.ones(4, np.uint8))
    ex2 = ex.copy()
    ex2[:, 0, 0] = 3
    st = collect(meta, [req, RequestRouting(1, ex2, np.ones(4, np.uint8))])
    tabs = tables(st)
    s = tabs["stats"].set_index("layer")
    assert s.loc[0, "entropy_bits"] == pytest.approx(1.0)  # experts 0 and 3, half each
    assert s.loc[0, "within_request_entropy_bits"] == pytest.approx(0.0)
    assert s.loc[1, "entropy_bits"] == pytest.approx(1.0)
    assert s.loc[0, "top1_share_global"] == pytest.approx(0.5)
    assert s.loc[0, "top1_share_within_request"] == pytest.approx(1.0)
    # reuse: layer 0 distance 1 (3 reuses per request), layer 1 distance 2 (2 per request)
    assert st.reuse[0, 1] == 6 and st.reuse[1, 2] == 4 and st.reuse.sum() == 10
    assert list(st.first_use) == [2, 4]
    assert s.loc[1, "reuse_distance_median"] == 2
    co = tabs["stats_coactivation"].iloc[0]
    # layer-0 expert (0 or 3) says nothing about layer 1 -> MI 0; P(f|e) max = 0.5
    assert co["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert co["top1_cond_prob"] == pytest.approx(0.5)
    assert co["baseline_top1_prob"] == pytest.approx(0.5)


def test_stats_skip_missing_rows_and_cap_distances(tmp_path: Path) -> None:
    meta = TraceMeta("toy", (0, 1), num_experts=2, top_k=1, partial=True)
    n = MAX_DISTANCE + 10
    ex = np.full((n, 2, 1), -1, dtype=np.int16)
    ex[:, 0, 0] = 1
    ex[0, 1, 0] = 0
    ex[-1, 1, 0] = 0  # reuse at distance n-1 > MAX_DISTANCE -> overflow bin
    st = collect(meta, [RequestRouting(0, ex, np.zeros(n, np.uint8))])
    assert st.rows == n + 2
    assert st.reuse[1, MAX_DISTANCE + 1] == 1
    assert st.co_tokens[0] == 2
    out = tmp_path / "p.parquet"
    write_trace(out, meta, [RequestRouting(0, ex, np.zeros(n, np.uint8))])
