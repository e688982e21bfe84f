"""Loading only the requested requests of a trace file gives exactly those requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.traces.store import iter_requests, load_trace, read_request_ids, write_trace
from tests.helpers import random_trace


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), n=st.integers(1, 8), batch_rows=st.integers(1, 40),
       pick=st.lists(st.integers(0, 12), max_size=6))
def test_requested_requests_only(tmp_path: Path, seed: int, n: int, batch_rows: int,
                                 pick: list[int]) -> None:
    trace = random_trace(num_requests=n, tokens=5, layers=2, experts=6, top_k=2, seed=seed,
                         prefill_tokens=1)
    path = tmp_path / f"t{seed}_{n}_{batch_rows}.parquet"
    write_trace(path, trace.meta, trace.requests)
    assert read_request_ids(path) == [r.request_id for r in trace.requests]
    want = [r for r in trace.requests if r.request_id in set(pick)]
    assert [r.request_id for r in load_trace(path, requests=pick).requests] == [
        r.request_id for r in want]
    # small row batches: requests span batches, and reading stops after the last one
    got = list(iter_requests(path, batch_rows=batch_rows, requests=pick))
    assert [r.request_id for r in got] == [r.request_id for r in want]
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.experts, b.experts) and np.array_equal(a.phase, b.phase)
