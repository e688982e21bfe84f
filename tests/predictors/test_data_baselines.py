"""Dataset building (request splits, row alignment) and the numpy baselines."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.predictors.baselines import fit_frequency, rank_frequency, rank_recency
from moesim.predictors.data import PredictorError, load_data, split_requests, trace_rows
from moesim.traces import write_trace
from moesim.traces.trace import RequestRouting, Trace
from tests.helpers import random_trace


def test_split_is_by_request_seeded_and_covers_everything():
    ids = list(range(100, 164))
    a = split_requests(ids, (0.75, 0.125, 0.125), seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (48, 8, 8)
    assert sorted(a.train + a.val + a.test) == ids
    assert a == split_requests(ids, (0.75, 0.125, 0.125), seed=3)
    assert a != split_requests(ids, (0.75, 0.125, 0.125), seed=4)
    small = split_requests([0, 1, 2], (0.8, 0.1, 0.1), seed=0)
    assert len(small.val) == len(small.test) == 1
    with pytest.raises(PredictorError, match="too few"):
        split_requests([0, 1], (0.0, 0.5, 0.5), seed=0)
    with pytest.raises(PredictorError, match="fractions"):
        split_requests(ids, (1.0, -1.0, 0.5), seed=0)


def _partial_trace() -> Trace:
    tr = random_trace(num_requests=2, tokens=4, layers=3, experts=6, top_k=2, seed=1)
    ex = tr.requests[1].experts.copy()
    ex[2, 1] = -1  # one unrecorded row
    reqs = [tr.requests[0], RequestRouting(1, ex, tr.requests[1].phase)]
    return Trace(tr.meta, reqs)


def test_rows_follow_file_order_and_link_previous_token():
    tr = _partial_trace()
    rows = trace_rows(tr)
    assert len(rows) == tr.num_rows == 2 * 4 * 3 - 1
    # file order: request, token, layer
    key = rows.request * 10_000 + rows.token * 10 + rows.layer
    assert (np.diff(key) > 0).all()
    for i in range(len(rows)):
        r, t, j = rows.request[i], rows.token[i], rows.layer[i]
        assert (rows.experts[i] == tr.requests[r].experts[t, j]).all()
        p = rows.prev[i]
        if t == 0 or (r == 1 and t == 3 and j == 1):  # first token, or previous row missing
            assert p == -1
        else:
            assert (rows.request[p], rows.token[p], rows.layer[p]) == (r, t - 1, j)


def test_frequency_and_recency_rankings():
    tr = random_trace(num_requests=3, tokens=10, layers=2, experts=5, top_k=2, seed=4)
    rows = trace_rows(tr)
    train = rows.mask([0, 1])
    table = fit_frequency(rows, train, 2, 5)
    assert table.counts.sum() == train.sum() * 2
    everything = np.ones(len(rows), dtype=bool)
    freq = rank_frequency(table, rows, everything)
    assert (freq == table.order[rows.layer]).all()
    rec = rank_recency(table, rows, everything)
    assert (np.sort(rec, axis=1) == np.arange(5)).all()  # a permutation per row
    has = rows.prev >= 0
    assert (rec[has, :2] == rows.experts[rows.prev[has]]).all()
    assert (rec[~has] == freq[~has]).all()  # first tokens fall back to frequency
    # after the previous token's experts, the frequency order of the rest
    i = int(np.flatnonzero(has)[0])
    rest = [e for e in freq[i] if e not in rows.experts[rows.prev[i]]]
    assert rec[i, 2:].tolist() == rest


def test_load_data_errors(tmp_path):
    with pytest.raises(PredictorError, match="not found"):
        load_data(tmp_path / "nope.parquet")
    tr = random_trace(num_requests=2, tokens=3, layers=2, experts=4, top_k=2)
    path = tmp_path / "t.parquet"
    write_trace(path, tr.meta, tr.requests)
    d = load_data(path)
    assert len(d.rows) == 12 and d.features is None and len(d.fingerprint) == 24
    from moesim.traces.errors import TraceError

    with pytest.raises(TraceError, match="no feature"):
        load_data(path, "pre_attn")


def test_file_digest_is_remembered_but_follows_the_content(tmp_path):
    from moesim.predictors.data import file_digest

    f = tmp_path / "t.bin"
    f.write_bytes(b"abc")
    first = file_digest(f)
    assert file_digest(f) == first
    f.write_bytes(b"abcd")  # new size and mtime: hashed again
    assert file_digest(f) != first
