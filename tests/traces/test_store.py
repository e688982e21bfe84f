"""Trace file format: round trip, streaming, metadata, atomic writes and every validation rule."""

from __future__ import annotations

import json
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from moesim.traces import (
    META_KEY,
    RequestRouting,
    TraceError,
    TraceMeta,
    iter_requests,
    load_trace,
    read_header,
    read_meta,
    scan_counts,
    validate_trace,
    write_trace,
)
from moesim.traces.schema import SCHEMA

META = TraceMeta(
    model="synthetic",
    moe_layers=(1, 3, 4),
    num_experts=8,
    top_k=2,
    num_shared_experts=1,
    dense_layers=(0, 2),
    expert_bytes=1234,
    source="unit test",
    license="n/a",
    notes={"why": "test"},
)


def _req(rid: int, n_tok: int = 3, seed: int = 0, **kw) -> RequestRouting:
    rng = np.random.default_rng(seed + rid)
    ex = np.stack(
        [[rng.choice(8, 2, replace=False) for _ in range(3)] for _ in range(n_tok)]
    ).astype(np.int16)
    phase = np.zeros(n_tok, dtype=np.uint8)
    phase[n_tok // 2 :] = 1
    return RequestRouting(rid, ex, phase, **kw)


def _assert_same(a: RequestRouting, b: RequestRouting) -> None:
    assert a.request_id == b.request_id
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.phase, b.phase)
    if a.scores is None:
        assert b.scores is None
    else:
        np.testing.assert_array_equal(a.scores, b.scores)
    assert a.tokens == b.tokens
    assert a.label == b.label


def test_round_trip_and_metadata(tmp_path: Path) -> None:
    reqs = [
        _req(0, tokens=["a", "b", "c"], label="first"),
        _req(5, n_tok=4, tokens=["x", None, "y", "z"]),
        _req(9, n_tok=1, label="last"),
    ]
    out = tmp_path / "t.parquet"
    summary = write_trace(out, META, reqs, final_notes=lambda: {"late": "note"})
    assert (summary.requests, summary.tokens, summary.rows) == (3, 8, 24)
    trace = load_trace(out)
    assert trace.meta == TraceMeta(**{**META.__dict__, "notes": {"why": "test", "late": "note"}})
    for a, b in zip(reqs, trace.requests, strict=True):
        _assert_same(a, b)
    assert trace.num_rows == 24
    assert read_meta(out) == trace.meta
    header = read_header(out)
    assert header["format_version"] == 1
    assert header["counts"] == {"requests": 3, "tokens": 8, "rows": 24}
    assert header["has_tokens"] and not header["has_scores"]
    assert header["phase_codes"] == {"0": "prefill", "1": "decode"}
    # the schema on disk is the documented one
    assert pq.read_schema(out).remove_metadata().equals(SCHEMA)
    assert validate_trace(out) == summary
    counts, phases = scan_counts(out)
    assert counts == summary and phases == {"prefill": 3, "decode": 5}
    assert [r.request_id for r in load_trace(out, max_requests=2)] == [0, 5]


def test_rows_sorted_by_request_token_layer(tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    write_trace(out, META, [_req(0), _req(1)])
    t = pq.read_table(out)
    key = list(
        zip(
            t.column("request_id").to_pylist(),
            t.column("token_idx").to_pylist(),
            t.column("layer").to_pylist(),
            strict=True,
        )
    )
    assert key == sorted(key) and len(set(key)) == len(key)
    assert set(t.column("layer").to_pylist()) == {1, 3, 4}  # model layer ids, not indices


def test_streaming_across_small_batches(tmp_path: Path) -> None:
    """Requests larger than one batch and row groups smaller than one request still work."""
    reqs = [_req(r, n_tok=2 + r, scores=None) for r in range(6)]
    out = tmp_path / "t.parquet"
    write_trace(out, META, reqs, row_group_rows=5)
    assert pq.ParquetFile(out).num_row_groups > 1
    for batch_rows in (1, 2, 7, 1000):
        got = list(iter_requests(out, batch_rows=batch_rows))
        assert len(got) == 6
        for a, b in zip(reqs, got, strict=True):
            _assert_same(a, b)


def test_scores_and_partial_rows(tmp_path: Path) -> None:
    meta = TraceMeta(**{**META.__dict__, "partial": True})
    req = _req(0, n_tok=3)
    req.experts[1, 2] = -1  # one (token, layer) not recorded
    sc = np.random.default_rng(0).random(req.experts.shape).astype(np.float32)
    sc[1, 2] = np.nan
    sc[2, 0] = np.nan  # recorded row without scores -> null list
    req.scores = sc
    out = tmp_path / "t.parquet"
    assert write_trace(out, meta, [req]).rows == 8
    got = load_trace(out).requests[0]
    np.testing.assert_array_equal(got.experts, req.experts)
    np.testing.assert_array_equal(got.scores, sc)
    assert read_header(out)["has_scores"]


# --------------------------------------------------------------------------------- hypothesis


@st.composite
def traces(draw: st.DrawFn) -> tuple[TraceMeta, list[RequestRouting]]:
    n_l = draw(st.integers(1, 4))
    n_e = draw(st.integers(1, 9))
    k = draw(st.integers(1, min(n_e, 4)))
    partial = draw(st.booleans())
    with_scores = draw(st.booleans())
    layer_ids = sorted(draw(st.sets(st.integers(0, 60), min_size=n_l, max_size=n_l)))
    meta = TraceMeta("hyp", tuple(layer_ids), n_e, k, partial=partial)
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    rids = sorted(draw(st.sets(st.integers(0, 10_000), min_size=1, max_size=4)))
    reqs = []
    for rid in rids:
        n_tok = draw(st.integers(1, 6))
        ex = np.array(
            [[rng.permutation(n_e)[:k] for _ in range(n_l)] for _ in range(n_tok)], dtype=np.int16
        )
        if partial and n_l > 1:
            drop = rng.random((n_tok, n_l)) < 0.3
            drop[:, 0] = False  # every token keeps a row
            ex[drop] = -1
        scores = None
        if with_scores:
            scores = rng.random(ex.shape).astype(np.float32)
            scores[ex < 0] = np.nan
        phase = rng.integers(0, 2, n_tok).astype(np.uint8)
        tokens = [f"t{i}" for i in range(n_tok)] if draw(st.booleans()) else None
        label = draw(st.one_of(st.none(), st.text(max_size=5)))
        reqs.append(RequestRouting(rid, ex, phase, scores, tokens, label))
    return meta, reqs


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=traces(), batch_rows=st.integers(1, 50))
def test_round_trip_property(tmp_path: Path, data, batch_rows: int) -> None:
    meta, reqs = data
    out = tmp_path / "h.parquet"
    write_trace(out, meta, reqs, row_group_rows=7)
    loaded = load_trace(out)
    streamed = list(iter_requests(out, batch_rows=batch_rows))
    assert loaded.meta == meta
    for a, b, c in zip(reqs, loaded.requests, streamed, strict=True):
        _assert_same(a, b)
        _assert_same(a, c)


# --------------------------------------------------------------------------- atomic writing


def test_failure_leaves_no_output(tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"

    def requests():
        yield _req(0)
        yield _req(1)
        raise RuntimeError("source broke half-way")

    with pytest.raises(RuntimeError):
        write_trace(out, META, requests(), row_group_rows=1)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    write_trace(out, META, [_req(0)])
    before = out.read_bytes()
    bad = _req(1)
    bad.experts[0, 0, 0] = 99
    with pytest.raises(TraceError):
        write_trace(out, META, [_req(0), bad])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_written_file_has_normal_permissions(tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    write_trace(out, META, [_req(0)])
    assert out.stat().st_mode & 0o044  # readable by group/others under a normal umask


# ------------------------------------------------------------------------ writer validation


def _bad(mutate) -> RequestRouting:
    req = _req(0)
    mutate(req)
    return req


@pytest.mark.parametrize(
    ("mutate", "field", "text"),
    [
        (lambda r: r.experts.__setitem__((0, 1, 0), 8), "experts", "out of range"),
        (lambda r: r.experts.__setitem__((0, 1, 0), -5), "experts", "out of range"),
        (lambda r: r.experts.__setitem__((1, 0), [3, 3]), "experts", "duplicate"),
        (lambda r: r.experts.__setitem__((1, 0, 1), -1), "experts", "mixes -1"),
        (lambda r: r.experts.__setitem__((2, 1), -1), "experts", "not marked partial"),
        (lambda r: r.phase.__setitem__(0, 3), "phase", "phase"),
        (lambda r: setattr(r, "tokens", ["a"]), "token", "token texts"),
        (lambda r: setattr(r, "scores", np.zeros((3, 3, 1), np.float32)), "scores", "shape"),
        (lambda r: setattr(r, "experts", r.experts.astype(np.float32)), "experts", "integers"),
    ],
)
def test_writer_rejects(tmp_path: Path, mutate, field: str, text: str) -> None:
    out = tmp_path / "t.parquet"
    with pytest.raises(TraceError) as err:
        write_trace(out, META, [_bad(mutate)])
    assert err.value.field == field and text in str(err.value)
    assert err.value.file == str(out)
    assert not out.exists()


def test_writer_rejects_wrong_width_and_order(tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    wide = RequestRouting(0, np.zeros((2, 3, 3), np.int16), np.zeros(2, np.uint8))
    with pytest.raises(TraceError, match="shape"):
        write_trace(out, META, [wide])
    with pytest.raises(TraceError, match="strictly increasing"):
        write_trace(out, META, [_req(3), _req(3)])
    with pytest.raises(TraceError, match="no requests"):
        write_trace(out, META, [])
    meta = TraceMeta(**{**META.__dict__, "partial": True})
    empty_token = _req(0)
    empty_token.experts[1] = -1
    with pytest.raises(TraceError, match="no layer recorded"):
        write_trace(out, meta, [empty_token])
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"moe_layers": ()}, "moe_layers"),
        ({"moe_layers": (3, 1)}, "moe_layers"),
        ({"top_k": 9}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_writer_rejects_bad_meta(tmp_path: Path, changes, field: str) -> None:
    meta = TraceMeta(**{**META.__dict__, **changes})
    with pytest.raises(TraceError) as err:
        write_trace(tmp_path / "t.parquet", meta, [_req(0)])
    assert err.value.field == field


# ------------------------------------------------------------------------ reader validation


def _raw_table(rows: list[tuple[int, int, int, int, list[int]]]) -> pa.Table:
    return pa.table(
        {
            "request_id": pa.array([r[0] for r in rows], pa.int32()),
            "token_idx": pa.array([r[1] for r in rows], pa.int32()),
            "phase": pa.array([r[2] for r in rows], pa.uint8()),
            "layer": pa.array([r[3] for r in rows], pa.int16()),
            "experts": pa.array([r[4] for r in rows], pa.list_(pa.int16())),
        }
    )


def _write_raw(path: Path, rows, meta: TraceMeta = META, header: dict | None = None) -> Path:
    table = _raw_table(rows)
    payload = header or {
        "format_version": 1,
        "model": meta.model,
        "moe_layers": list(meta.moe_layers),
        "num_experts": meta.num_experts,
        "top_k": meta.top_k,
        "partial": meta.partial,
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(payload).encode()})
    pq.write_table(table, path)
    return path


GOOD = [(0, 0, 0, 1, [1, 2]), (0, 0, 0, 3, [3, 4]), (0, 0, 0, 4, [5, 6])]


@pytest.mark.parametrize(
    ("rows", "field", "row", "text"),
    [
        ([*GOOD[:2], (0, 0, 0, 4, [5, 9])], "experts", 2, "out of range"),
        ([*GOOD[:2], (0, 0, 0, 4, [5, 5])], "experts", 2, "duplicate"),
        ([*GOOD[:2], (0, 0, 0, 4, [5, 6, 7])], "experts", 2, "expected top_k=2"),
        ([*GOOD[:2], GOOD[1], GOOD[2]], "layer", 2, "duplicate row"),
        ([GOOD[1], GOOD[0], GOOD[2]], "layer", 1, "not sorted"),
        (GOOD[:2], "layer", 0, "not marked partial"),
        ([*GOOD[:2], (0, 0, 0, 5, [5, 6])], "layer", 2, "not in moe_layers"),
        ([*GOOD, (0, 2, 0, 1, [1, 2])], "token_idx", 3, "contiguous"),
        ([*GOOD[:2], (0, 0, 1, 4, [5, 6])], "phase", 2, "phase differs"),
        (
            [*GOOD, *((1, 0, 0, x, [1, 2]) for x in (1, 3, 4)), (0, 1, 0, 1, [1, 2])],
            "request_id",
            6,
            "not sorted",
        ),
    ],
)
def test_reader_rejects(tmp_path: Path, rows, field: str, row: int, text: str) -> None:
    path = _write_raw(tmp_path / "bad.parquet", rows)
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert (err.value.field, err.value.row) == (field, row)
    assert text in str(err.value) and str(path) in str(err.value)
    with pytest.raises(TraceError):
        validate_trace(path)


def test_reader_rejects_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "x.parquet"
    text.write_text("not parquet")
    with pytest.raises(TraceError, match="not a readable parquet"):
        read_meta(text)
    plain = tmp_path / "plain.parquet"
    pq.write_table(_raw_table(GOOD), plain)
    with pytest.raises(TraceError, match="not a moesim trace"):
        load_trace(plain)
    newer = _write_raw(tmp_path / "v9.parquet", GOOD, header={"format_version": 9})
    with pytest.raises(TraceError, match="newer"):
        read_meta(newer)
    missing = _write_raw(tmp_path / "m.parquet", GOOD, header={"format_version": 1})
    with pytest.raises(TraceError) as err:
        read_meta(missing)
    assert err.value.field == "model"
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "absent.parquet")
    no_col = tmp_path / "nocol.parquet"
    t = _raw_table(GOOD).drop_columns(["phase"])
    pq.write_table(t.replace_schema_metadata(pq.read_metadata(newer).metadata), no_col)
    with pytest.raises(TraceError) as err:
        load_trace(no_col)
    assert err.value.field in ("phase", "format_version")


def test_validate_checks_counts(tmp_path: Path) -> None:
    header = {
        "format_version": 1,
        "model": "m",
        "moe_layers": [1, 3, 4],
        "num_experts": 8,
        "top_k": 2,
        "counts": {"requests": 1, "tokens": 1, "rows": 4},
    }
    path = _write_raw(tmp_path / "c.parquet", GOOD, header=header)
    with pytest.raises(TraceError, match="metadata says 4 rows"):
        validate_trace(path)
