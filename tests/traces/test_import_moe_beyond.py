"""``moe-beyond-csv`` importer on small CSVs written in the exact MoE-Beyond format."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moesim.traces import (
    PREFILL,
    TraceError,
    import_trace,
    load_predictions,
    load_trace,
    read_header,
)
from moesim.traces.predictions import PRED_META_KEY, PRED_SCHEMA, read_predictions_meta
from tests.traces.fixtures import DS_HEADER, DS_LAYERS, id_list, write_moe_beyond

FMT = "moe-beyond-csv"


def test_training_variant(tmp_path: Path) -> None:
    truth = write_moe_beyond(tmp_path / "src", {10: 4, 2: 3, 7: 1})
    out = tmp_path / "ds.parquet"
    res = import_trace(FMT, tmp_path / "src", out, workers=1)
    assert (res.requests, res.tokens, res.rows) == (3, 8, 8 * 26)
    trace = load_trace(out)
    assert [r.request_id for r in trace] == [2, 7, 10]  # ordered by N, numerically
    assert trace.meta.model == "deepseek_v2_lite" and trace.meta.moe_layers == DS_LAYERS
    assert trace.meta.expert_bytes == 17_301_504 and not trace.meta.partial
    for req in trace:
        t = truth[req.request_id]
        np.testing.assert_array_equal(req.experts, t["experts"])  # regrouped per token
        assert req.tokens == t["tokens"]
        assert (req.phase == PREFILL).all()
        assert req.label == f"prompt_{req.request_id}"
        assert req.scores is None
    notes = trace.meta.notes
    assert "prefill" in notes["phase"] and "teacher-forced decode" in notes["phase"]
    assert not out.with_suffix(".predictions.parquet").exists()


def test_threaded_parse_matches_serial(tmp_path: Path) -> None:
    write_moe_beyond(tmp_path / "src", {n: 2 + n % 3 for n in range(1, 12)})
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    import_trace(FMT, tmp_path / "src", a, workers=1)
    import_trace(FMT, tmp_path / "src", b, workers=3, limit=11)
    ta, tb = load_trace(a), load_trace(b)
    assert len(ta) == len(tb) == 11
    for x, y in zip(ta, tb, strict=True):
        np.testing.assert_array_equal(x.experts, y.experts)
    assert len(load_trace(a, max_requests=2)) == 2
    assert import_trace(FMT, tmp_path / "src", tmp_path / "c.parquet", limit=3).requests == 3


def test_predicted_variant_writes_prediction_table(tmp_path: Path) -> None:
    truth = write_moe_beyond(tmp_path / "src", {1: 3, 2: 2}, variant="predicted")
    out = tmp_path / "pred.parquet"
    res = import_trace(FMT, tmp_path / "src", out)
    side = out.with_suffix(".predictions.parquet")
    assert res.side_files == {"predictions": side}
    trace = load_trace(out)
    assert trace.meta.notes["variant"] == "predicted"
    assert not read_header(out)["has_tokens"]  # Token column holds positions, not texts
    table = pq.read_table(side)
    assert table.schema.remove_metadata().equals(PRED_SCHEMA)
    assert table.num_rows == res.rows == 5 * 26
    assert set(table.column("available_at").to_pylist()) == {"routed:same_layer"}
    meta = read_predictions_meta(side)
    assert meta["width"] == 6 and meta["counts"] == {"rows": 130}
    assert PRED_META_KEY in pq.read_metadata(side).metadata
    preds = load_predictions(side, trace.meta.moe_layers)
    for req in trace:
        np.testing.assert_array_equal(req.experts, truth[req.request_id]["experts"])
        np.testing.assert_array_equal(preds[req.request_id], truth[req.request_id]["predicted"])
    other = tmp_path / "elsewhere" / "p.parquet"
    import_trace(FMT, tmp_path / "src", tmp_path / "x.parquet", predictions=other)
    assert other.exists()


def test_formatted_variant_and_folder_errors(tmp_path: Path) -> None:
    write_moe_beyond(tmp_path / "t" / "formatted_csvs", {1: 2}, variant="formatted")
    res = import_trace(FMT, tmp_path / "t" / "formatted_csvs", tmp_path / "f.parquet")
    assert res.meta.notes["variant"] == "formatted"
    with pytest.raises(TraceError, match="sub-folders with prompt files: formatted_csvs"):
        import_trace(FMT, tmp_path / "t", tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="no predictions"):
        import_trace(
            FMT, tmp_path / "t" / "formatted_csvs", tmp_path / "x.parquet", predictions="p"
        )
    write_moe_beyond(tmp_path / "t" / "formatted_csvs", {2: 2}, variant="training")
    with pytest.raises(TraceError, match="mixed file variants"):
        import_trace(FMT, tmp_path / "t" / "formatted_csvs", tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="unknown format"):
        import_trace("nope", tmp_path, tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="unexpected keyword"):
        import_trace(FMT, tmp_path / "t" / "formatted_csvs", tmp_path / "x.parquet", bogus=1)
    assert not (tmp_path / "x.parquet").exists()


# ------------------------------------------------------------------------- validation errors


def _rows(n_tok: int = 2, layers=DS_LAYERS) -> list[list[object]]:
    rng = np.random.default_rng(3)
    return [
        [layer, 0, f"tok{t}", id_list(rng.choice(64, 6, replace=False))]
        for layer in layers
        for t in range(n_tok)
    ]


def _write(folder: Path, rows: list[list[object]], n: int = 1, raw: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"prompt_{n}_data.csv"
    if raw is not None:
        path.write_text(raw, encoding="utf-8")
        return path
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(DS_HEADER)
        w.writerows(rows)
    return path


def _set(row_index: int, col: int, value: object):
    def mutate(rows: list[list[object]]) -> list[list[object]]:
        rows[row_index][col] = value
        return rows

    return mutate


CASES = [
    # (mutation, line, field, message part)
    (_set(5, 3, "[1, 2, 3, 4, 5, 64]"), 7, "Activated Expert IDs", "out of range"),
    (_set(5, 3, "[1, 2, 3, 4, 5, -1]"), 7, "Activated Expert IDs", "out of range"),
    (_set(4, 3, "[1, 2, 3, 4, 5, 5]"), 6, "Activated Expert IDs", "duplicate"),
    (_set(3, 3, "[1, 2, 3, 4, 5]"), 5, "Activated Expert IDs", "expected top_k=6"),
    (_set(3, 3, "[1, 2, 3, 4, 5, x]"), 5, "Activated Expert IDs", "not a list of integer"),
    (_set(3, 3, "1, 2, 3, 4, 5, 6"), 5, "Activated Expert IDs", "expected a [..] list"),
    (_set(6, 0, "abc"), 8, "Layer ID", "not an integer"),
    (_set(6, 1, 3), 8, "Batch Number", "batch"),
    (_set(5, 2, "other"), 7, "Token", "differs"),
    (_set(4, 0, 0), 6, "Layer ID", "not an MoE layer"),
    # duplicate row: layer 2's block appears again after layer 3
    (lambda r: r[:6] + r[2:4] + r[6:], 8, "Layer ID", "two separate blocks"),
    # one layer block shorter than the others
    (lambda r: r[:3] + r[4:], 4, "Layer ID", "cannot be aligned"),
    # a whole layer missing without partial=True
    (lambda r: r[:-2], None, "Layer ID", "missing"),
]


@pytest.mark.parametrize(("mutate", "line", "field", "text"), CASES)
def test_validation_errors(tmp_path: Path, mutate, line, field, text) -> None:
    path = _write(tmp_path / "src", mutate(_rows()))
    out = tmp_path / "out.parquet"
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", out)
    e = err.value
    assert (e.file, e.line, e.field) == (str(path), line, field)
    assert text in str(e) and str(path) in str(e)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp file left either


def test_partial_option_allows_missing_layers(tmp_path: Path) -> None:
    _write(tmp_path / "src", _rows(layers=DS_LAYERS[:-1]))
    trace = load_trace(
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet", partial=True).out
    )
    assert trace.meta.partial
    assert (trace.requests[0].experts[:, -1] == -1).all()
    assert (trace.requests[0].experts[:, :-1] >= 0).all()


@pytest.mark.parametrize(
    ("raw", "line", "field", "text"),
    [
        (
            ",".join(DS_HEADER) + '\n1,0,a,"[1, 2, 3, 4, 5, 6]"\n1,0,b\n',
            3,
            "Activated Expert IDs",
            "columns",
        ),
        (",".join(DS_HEADER) + "\n", 2, None, "no data rows"),
        ("Layer ID,Token,Activated Expert IDs\n1,a,[1]\n", 1, "Batch Number", "missing"),
    ],
)
def test_malformed_csv(tmp_path: Path, raw: str, line, field, text) -> None:
    path = _write(tmp_path / "src", [], raw=raw)
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, field)
    assert text in str(err.value)


def test_line_numbers_with_newline_in_token(tmp_path: Path) -> None:
    rows = _rows()
    rows[0][2] = "two\nlines"  # quoted newline: later rows start one line further down
    rows[2][2] = "two\nlines"
    rows[3][3] = "[1, 1, 2, 3, 4, 5]"
    path = _write(tmp_path / "src", rows)
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    assert (err.value.file, err.value.line) == (str(path), 7)


def test_line_numbers_with_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    rows = _rows()
    rows[3][3] = "[1, 1, 2, 3, 4, 5]"
    path = _write(tmp_path / "src", rows)
    text = path.read_text().splitlines()
    text.insert(2, "")  # blank line 3, skipped by the reader
    path.write_text("\n".join(text))  # and no newline at the end
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    assert (err.value.file, err.value.line) == (str(path), 6)


def test_failure_in_later_file_leaves_no_output(tmp_path: Path) -> None:
    """Atomic import: the 3rd file is bad, so neither the trace nor predictions appear."""
    write_moe_beyond(tmp_path / "src", {1: 2, 2: 2, 3: 2}, variant="predicted")
    bad = tmp_path / "src" / "prompt_3_data_predicted.csv"
    text = bad.read_text().splitlines()
    text[5] = text[5].replace('"[', '"[99, ', 1)
    bad.write_text("\n".join(text) + "\n")
    out = tmp_path / "o.parquet"
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", out, workers=2)
    assert err.value.file == str(bad) and err.value.line == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
