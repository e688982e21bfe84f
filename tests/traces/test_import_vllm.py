"""``vllm-routes-jsonl`` importer on small logs written in the exact vLLM logger format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.traces import DECODE, PREFILL, TraceError, import_trace, load_trace
from tests.traces.fixtures import (
    QWEN_DUMMY_PASSES,
    QWEN_ID,
    QWEN_REAL_PASSES,
    write_olmoe_folder,
    write_qwen_folder,
    write_vllm_log,
)

FMT = "vllm-routes-jsonl"


def test_qwen_multi_layer_folder(tmp_path: Path) -> None:
    truth = write_qwen_folder(tmp_path / "src", layers=(12, 0, 8))
    out = tmp_path / "q.parquet"
    res = import_trace(FMT, tmp_path / "src", out)
    trace = load_trace(out)
    meta = trace.meta
    assert meta.model == "qwen15_moe_a27b"
    assert meta.moe_layers == (0, 8, 12) and meta.partial  # only the logged layers
    assert meta.num_shared_experts == 1
    n_real = truth["n_real"]
    assert (res.requests, res.tokens, res.rows) == (len(QWEN_REAL_PASSES), n_real, 3 * n_real)
    # one request per forward pass, rows joined by index across the layer files
    sizes = [r.num_tokens for r in trace]
    assert sizes == list(QWEN_REAL_PASSES)
    experts = np.concatenate([r.experts for r in trace])
    scores = np.concatenate([r.scores for r in trace])
    for j, layer in enumerate(meta.moe_layers):
        ids, w = truth["real"][layer]
        np.testing.assert_array_equal(experts[:, j], ids)
        np.testing.assert_allclose(scores[:, j], w)
    phase = np.concatenate([r.phase for r in trace])
    n_prefill = QWEN_REAL_PASSES[0] + QWEN_REAL_PASSES[1]  # passes larger than 3 prompts
    assert (phase[:n_prefill] == PREFILL).all() and (phase[n_prefill:] == DECODE).all()
    assert [r.label for r in trace][:2] == ["pass/0", "pass/1"]
    notes = meta.notes
    dummy = sum(QWEN_DUMMY_PASSES)
    assert notes["dropped_warmup_rows_total"] == str(3 * dummy)
    assert f"{dummy} rows = 2 leading forward passes of 32+16 rows" in notes["dropped_warmup_rows"]
    assert "ASSUMPTION" in notes["row_join"]
    assert "not renormalised" in notes["scores"]
    assert "3 prompts (GSM8K_test.txt)" in notes["phase"]


def test_stream_segmentation_and_single_file(tmp_path: Path) -> None:
    write_qwen_folder(tmp_path / "src", layers=(0,))
    res = import_trace(
        FMT, tmp_path / "src" / "moe_layer0.jsonl", tmp_path / "s.parquet", segment="stream"
    )
    trace = load_trace(res.out)
    assert len(trace) == 1 and trace.requests[0].label == "stream"
    assert trace.meta.moe_layers == (0,)
    assert "one request" in trace.meta.notes["segmentation"]
    with pytest.raises(TraceError, match="segment must be"):
        import_trace(FMT, tmp_path / "src", tmp_path / "x.parquet", segment="tokens")


def test_olmoe_global_counter(tmp_path: Path) -> None:
    truth = write_olmoe_folder(tmp_path / "src", n_dummy=32, n_real=40, generated=30)
    res = import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    trace = load_trace(res.out)
    assert trace.meta.model == "olmoe_1b_7b" and trace.meta.moe_layers == (0,)
    assert len(trace) == 1 and res.tokens == 40
    req = trace.requests[0]
    np.testing.assert_array_equal(req.experts[:, 0], truth["ids"])
    # prefill estimate: rows - generated + prompts = 40 - 30 + 3
    assert (req.phase[:13] == PREFILL).all() and (req.phase[13:] == DECODE).all()
    assert "ESTIMATE" in trace.meta.notes["phase"]
    assert "32 leading rows" in trace.meta.notes["dropped_warmup_rows"]
    assert "renormalised to sum 1" in trace.meta.notes["scores"]
    res = import_trace(FMT, tmp_path / "src", tmp_path / "p.parquet", prefill_rows=5, dummy_rows=32)
    assert (load_trace(res.out).requests[0].phase == PREFILL).sum() == 5


def test_real_rows_that_resemble_dummy_rows_are_kept(tmp_path: Path) -> None:
    """A leading constant run shorter than min_dummy_rows is not dropped."""
    write_olmoe_folder(tmp_path / "src", n_dummy=4, n_real=10)
    res = import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    assert res.tokens == 14 and res.meta.notes["dropped_warmup_rows_total"] == "0"


def _log(path: Path, rows: list[dict], meta: dict | None = None) -> Path:
    header = {"type": "meta", "model_id": QWEN_ID, "layers_logged": [0], "top_k": 4}
    if meta is not None:
        header = meta
    lines = [json.dumps(header)] + [json.dumps(r) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _route(t: int, ids=(1, 2, 3, 4), layer: int = 0, w=(0.4, 0.3, 0.2, 0.1)) -> dict:
    return {
        "type": "route",
        "req_id": "r1",
        "token_idx": t,
        "layer": layer,
        "topk_ids": list(ids),
        "topk_weights": list(w),
    }


GOOD = [_route(t, ids=(t % 60, (t + 1) % 60, (t + 2) % 60, (t + 3) % 60)) for t in range(6)]


def _with(i: int, **changes) -> list[dict]:
    rows = [dict(r) for r in GOOD]
    rows[i].update(changes)
    return rows


@pytest.mark.parametrize(
    ("rows", "line", "field", "text"),
    [
        (_with(2, topk_ids=[1, 2, 3, 60]), 4, "topk_ids", "out of range"),
        (_with(2, topk_ids=[1, 2, 3, 3]), 4, "topk_ids", "duplicate"),
        (_with(3, topk_ids=[1, 2, 3], topk_weights=[0.5, 0.3, 0.2]), 5, "topk_ids", "top_k=4"),
        (_with(3, topk_weights=[0.5]), 5, "topk_weights", "weights for 4 ids"),
        (_with(1, topk_ids="1,2"), 3, "topk_ids", "list of integers"),
        (_with(1, token_idx=-1), 3, "token_idx", ">= 0"),
        (_with(1, token_idx="3"), 3, "token_idx", "integer"),
        (_with(4, layer=8), 6, "layer", "one layer per file"),
        (_with(0, type="other"), 2, "type", "route row"),
    ],
)
def test_validation_errors(tmp_path: Path, rows, line: int, field: str, text: str) -> None:
    path = _log(tmp_path / "src" / "moe_routes.jsonl", rows)
    out = tmp_path / "o.parquet"
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", out)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, field)
    assert text in str(err.value)
    assert not out.exists()


def test_malformed_lines_and_headers(tmp_path: Path) -> None:
    path = _log(tmp_path / "a" / "moe_routes.jsonl", GOOD)
    text = path.read_text().splitlines()
    text[3] = text[3][:-5]  # truncated JSON
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o.parquet")
    assert (err.value.line, "malformed JSON" in str(err.value)) == (4, True)

    path = _log(tmp_path / "b" / "x.jsonl", GOOD, meta={"type": "route"})
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o.parquet")
    assert (err.value.line, err.value.field) == (1, "type")
    with pytest.raises(TraceError, match="no vLLM route logs"):
        import_trace(FMT, tmp_path / "b", tmp_path / "o.parquet")

    meta = {"type": "meta", "model_id": "acme/unknown-moe", "top_k": 4}
    path = _log(tmp_path / "c" / "x.jsonl", GOOD, meta=meta)
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o.parquet")
    assert (err.value.field, "pass card=" in str(err.value)) == ("model_id", True)
    assert import_trace(FMT, path, tmp_path / "o.parquet", card="qwen15_moe_a27b").tokens == 6

    meta = {"type": "meta", "model_id": QWEN_ID, "top_k": 8}
    path = _log(tmp_path / "d" / "x.jsonl", GOOD, meta=meta)
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o2.parquet")
    assert (err.value.line, err.value.field) == (1, "top_k")

    meta = {"type": "meta", "model_id": QWEN_ID, "top_k": 4, "layers_logged": [5]}
    path = _log(tmp_path / "e" / "x.jsonl", GOOD, meta=meta)
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o2.parquet")
    assert (err.value.line, err.value.field) == (2, "layer")


def test_join_requires_identical_token_sequences(tmp_path: Path) -> None:
    write_qwen_folder(tmp_path / "src", layers=(0, 8))
    path = tmp_path / "src" / "moe_layer8.jsonl"
    lines = path.read_text().splitlines()
    lines = lines[:-1]  # one row fewer than layer 0
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as err:
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    assert err.value.file == str(path) and err.value.field == "token_idx"
    assert "cannot be joined" in str(err.value)

    other = tmp_path / "src" / "copy.jsonl"
    other.write_text((tmp_path / "src" / "moe_layer0.jsonl").read_text())
    with pytest.raises(TraceError, match="logged by two files"):
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_all_rows_dummy_is_an_error(tmp_path: Path) -> None:
    rows = [_route(t) for t in range(40)]
    _log(tmp_path / "src" / "moe_routes.jsonl", rows)
    with pytest.raises(TraceError, match="warm-up"):
        import_trace(FMT, tmp_path / "src", tmp_path / "o.parquet")


def test_writer_fixture_round_trip(tmp_path: Path) -> None:
    """Sanity check of the fixture writer itself against the documented line layout."""
    path = write_vllm_log(
        tmp_path / "l.jsonl",
        model_id=QWEN_ID,
        layer=3,
        token_idx=[0, 1],
        ids=np.array([[1, 2, 3, 4], [5, 6, 7, 8]]),
        weights=np.full((2, 4), 0.1),
        top_k=4,
    )
    first, second = (json.loads(x) for x in path.read_text().splitlines()[:2])
    assert first["type"] == "meta" and first["layers_logged"] == [3]
    assert set(second) == {"type", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"}
