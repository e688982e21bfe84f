"""``speculative-moe-jsonl`` importer on small Mixtral logs in the exact source formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.traces import DECODE, PREFILL, TraceError, import_trace, load_trace
from tests.traces.fixtures import write_spec_decode, write_spec_raw

FMT = "speculative-moe-jsonl"


def _folder(tmp_path: Path) -> tuple[Path, dict, dict, np.ndarray]:
    src = tmp_path / "src"
    src.mkdir()
    gsm = write_spec_decode(
        src / "gsm8k_2_routing.jsonl", "gsm8k", {0: 5, 1: 3}, tail_missing={0: [4, 9], 1: [31]}
    )
    he = write_spec_decode(src / "humaneval_2_routing.jsonl", "humaneval", {0: 4}, seed=1)
    raw = write_spec_raw(src / "routing_raw.jsonl", prompt=5, steps=4, gaps=((2, 7), (6, 30)))
    (src / "gsm8k_2_outputs.jsonl").write_text('{"problem_id": 0, "generated": "x"}\n')
    return src, gsm, he, raw


def test_folder_import(tmp_path: Path) -> None:
    src, gsm, he, raw = _folder(tmp_path)
    res = import_trace(FMT, src, tmp_path / "m.parquet")
    trace = load_trace(res.out)
    meta = trace.meta
    assert meta.model == "mixtral_8x7b" and meta.moe_layers == tuple(range(32))
    assert meta.expert_bytes == 352_321_536
    labels = [r.label for r in trace]
    assert labels == ["gsm8k/0", "gsm8k/1", "humaneval/0", "humaneval/0@routing_raw"]
    assert [r.request_id for r in trace] == [0, 1, 2, 3]
    g0, g1, h0, r0 = trace.requests
    # incomplete tail tokens dropped by default; rows re-sorted per token
    assert (g0.num_tokens, g1.num_tokens, h0.num_tokens) == (4, 2, 4)
    np.testing.assert_array_equal(g0.experts, gsm[0][:4])
    np.testing.assert_array_equal(h0.experts, he[0])
    assert (g0.phase == DECODE).all()
    np.testing.assert_allclose(g0.scores[..., 0], 0.75)
    # raw run: 5 prefill positions then 4 decode steps; interior gaps stay as -1 (partial)
    assert r0.num_tokens == 9
    assert (r0.phase[:5] == PREFILL).all() and (r0.phase[5:] == DECODE).all()
    want = raw.copy()
    want[2, 7] = -1
    want[6, 30] = -1
    np.testing.assert_array_equal(r0.experts, want)
    assert meta.partial
    assert meta.notes["incomplete_tail_tokens"].startswith("2 trailing tokens")
    assert "2 (token, layer) rows missing" in meta.notes["missing_rows"]
    assert res.rows == (4 + 2 + 4) * 32 + 9 * 32 - 2


def test_keep_incomplete_tail(tmp_path: Path) -> None:
    src, _gsm, _, _ = _folder(tmp_path)
    trace = load_trace(import_trace(FMT, src, tmp_path / "m.parquet", incomplete="keep").out)
    g0 = trace.requests[0]
    assert g0.num_tokens == 5
    assert (g0.experts[4, [4, 9]] == -1).all()
    assert "kept" in trace.meta.notes["incomplete_tail_tokens"]


def test_complete_decode_file_is_not_partial(tmp_path: Path) -> None:
    path = tmp_path / "humaneval_2_routing.jsonl"
    write_spec_decode(path, "humaneval", {0: 3, 1: 2}, tail_missing={1: [0]})
    res = import_trace(FMT, path, tmp_path / "m.parquet")
    assert not res.meta.partial and res.tokens == 4
    assert "1 trailing tokens" in res.meta.notes["incomplete_tail_tokens"]


def test_strict_rejects_interior_gaps(tmp_path: Path) -> None:
    src, *_ = _folder(tmp_path)
    out = tmp_path / "m.parquet"
    with pytest.raises(TraceError) as err:
        import_trace(FMT, src, out, strict=True)
    e = err.value
    assert e.file == str(src / "routing_raw.jsonl") and e.field == "layer"
    assert "misses layer 7" in str(e) and e.line is not None
    assert not out.exists()
    with pytest.raises(TraceError, match="incomplete must be"):
        import_trace(FMT, src, out, incomplete="pad")


def _rows() -> list[dict]:
    return [
        {
            "dataset": "gsm8k",
            "problem_id": 0,
            "layer": layer,
            "experts": [1, 2],
            "gating_probs": [0.6, 0.4],
            "token_idx": t,
        }
        for layer in range(32)
        for t in range(2)
    ]


def _with(i: int, **changes) -> list[dict]:
    rows = _rows()
    rows[i].update(changes)
    return rows


@pytest.mark.parametrize(
    ("rows", "line", "field", "text"),
    [
        (_with(3, experts=[1, 8]), 4, "experts", "out of range"),
        (_with(3, experts=[5, 5]), 4, "experts", "duplicate"),
        (_with(3, experts=[1, 2, 3], gating_probs=[0.5, 0.3, 0.2]), 4, "experts", "top_k=2"),
        (_with(3, gating_probs=[1.0]), 4, "gating_probs", "probabilities"),
        (_with(3, layer=32), 4, "layer", "not an MoE layer"),
        (_with(3, token_idx=1, layer=0), 4, "token_idx", "duplicate row"),
        (_with(5, dataset=None), 6, "dataset", "dataset name"),
        (_with(5, problem_id="0"), 6, "problem_id", "integer"),
    ],
)
def test_validation_errors(tmp_path: Path, rows, line: int, field: str, text: str) -> None:
    path = tmp_path / "gsm8k_2_routing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.parquet"
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, out)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, field)
    assert text in str(err.value)
    assert not out.exists()


def test_malformed_and_inconsistent_files(tmp_path: Path) -> None:
    path = tmp_path / "a_routing.jsonl"
    path.write_text(json.dumps(_rows()[0]) + "\n{not json\n")
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o.parquet")
    assert (err.value.line, "malformed JSON" in str(err.value)) == (2, True)

    rows = _rows()
    del rows[1]["token_idx"]
    rows[1]["token_pos"] = 0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match="mixes token_idx rows and token_pos rows"):
        import_trace(FMT, path, tmp_path / "o.parquet")

    rows = [r for r in _rows() if r["token_idx"] == 0] + [
        {**r, "token_idx": 2} for r in _rows() if r["token_idx"] == 0
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match="token 1 has no rows"):
        import_trace(FMT, path, tmp_path / "o.parquet")

    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(TraceError, match=r"no \*routing\*\.jsonl"):
        import_trace(FMT, empty, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_raw_rows_of_a_problem_must_be_contiguous(tmp_path: Path) -> None:
    path = tmp_path / "routing_raw.jsonl"
    write_spec_raw(path, prompt=2, steps=1)
    lines = path.read_text().splitlines()
    moved = json.loads(lines[3])
    moved["problem_id"] = 1
    lines[3] = json.dumps(moved)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as err:
        import_trace(FMT, path, tmp_path / "o.parquet")
    assert (err.value.line, err.value.field) == (5, "problem_id")
