"""Per-request statistics: step durations, the per-request table and its tpot percentiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.metrics import per_request_table, tpot_percentiles
from moesim.sim.workload import build_workload
from tests.helpers import random_trace

LINK = FixedLink(1e-5, 1e6, 1)
COMPUTE = FixedCompute(attention_s=1e-3, expert_s=3e-4)


def _run(trace, **kw):
    cap = min(2 * trace.meta.top_k * kw.get("batch", 1) + 2,
              trace.meta.num_moe_layers * trace.meta.num_experts)
    kw.setdefault("engine", "python")
    return simulate(trace, "lru", capacity=cap, link=LINK, compute=COMPUTE, **kw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), tokens=st.integers(2, 8), batch=st.integers(1, 3),
       warmup=st.integers(0, 1), prefill=st.integers(0, 2),
       replay=st.sampled_from(["decode", "prefill"]), seed=st.integers(0, 1000))
def test_table_adds_up_to_the_run(n, tokens, batch, warmup, prefill, replay, seed):
    """Output tokens add up to the run's; each counted step's time is charged once to every
    request in it, so the table's times sum to sum(step time x requests in the step)."""
    trace = random_trace(num_requests=n, tokens=tokens, layers=2, experts=6, top_k=2,
                         seed=seed, prefill_tokens=prefill)
    res = _run(trace, batch=batch, warmup_tokens=warmup, replay=replay)
    table, s = res.per_request, res.summary
    assert table["output_tokens"].sum() == s["output_tokens"]
    w = build_workload(trace, batch=batch, warmup_tokens=warmup, replay=replay)
    per_step = np.diff(w.req_offsets)
    assert table["steps"].sum() == per_step[w.counted].sum()
    if batch == 1:
        assert table["time_s"].sum() == pytest.approx(s["total_time_s"])
    assert table["time_s"].sum() >= s["total_time_s"] - 1e-12
    tp = table["time_per_output_token_s"]
    assert ((table["output_tokens"] == 0) == tp.isna()).all()
    expect = np.percentile(tp.dropna(), [50, 90, 99]) if tp.notna().any() else [math.nan] * 3
    got = [s["tpot_p50_s"], s["tpot_p90_s"], s["tpot_p99_s"]]
    assert np.allclose(got, expect, equal_nan=True)
    assert got[0] <= got[1] <= got[2] or math.isnan(got[0])


def test_batch_time_counts_for_every_request() -> None:
    """Two equal requests decoded together: each is charged every step, so both have the
    run's whole time over their own tokens."""
    trace = random_trace(num_requests=2, tokens=4, layers=1, experts=4, top_k=1, seed=0)
    res = _run(trace, batch=2)
    t = res.per_request.set_index("request_id")
    assert t.loc[0, "time_s"] == pytest.approx(res.summary["total_time_s"])
    assert t.loc[1, "time_s"] == pytest.approx(res.summary["total_time_s"])
    assert t.loc[0, "time_per_output_token_s"] == pytest.approx(
        res.summary["total_time_s"] / 4)


def test_no_step_times_means_nan_not_wrong_numbers() -> None:
    trace = random_trace(num_requests=2, tokens=4, layers=1, experts=4, top_k=1, seed=0)
    zl = simulate(trace, "lru", capacity=3, mode="zero_latency").summary
    assert math.isnan(zl["tpot_p50_s"]) and math.isnan(zl["tpot_p99_s"])
    w = build_workload(trace)
    for times in (None, [], [0.1]):  # absent, or not one per step: never used
        table = per_request_table(w, times)
        assert table["time_s"].isna().all()
        assert all(math.isnan(v) for v in tpot_percentiles(table).values())
    table = per_request_table(w, [0.5] * w.num_steps)
    assert table["time_per_output_token_s"].tolist() == [0.5, 0.5]


def test_warmup_steps_are_not_charged() -> None:
    trace = random_trace(num_requests=1, tokens=5, layers=1, experts=4, top_k=1, seed=0)
    w = build_workload(trace, warmup_tokens=2)
    table = per_request_table(w, [10.0, 10.0, 1.0, 1.0, 1.0])
    assert table["output_tokens"].tolist() == [3]
    assert table["time_s"].tolist() == [3.0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), tokens=st.integers(2, 6), batch=st.integers(1, 3),
       prefill=st.integers(0, 3), chunk=st.integers(0, 2), seed=st.integers(0, 1000))
def test_phase_split_adds_up_and_both_engines_agree(n, tokens, batch, prefill, chunk, seed):
    """Whole-request timing: prefill and decode times add up to the run's time, prefill
    tokens are the prompt tokens replayed in prompt-only steps, and the compiled engine gives
    the same split (one function over both engines' step durations)."""
    trace = random_trace(num_requests=n, tokens=tokens, layers=2, experts=6, top_k=2,
                         seed=seed, prefill_tokens=min(prefill, tokens - 1))
    runs = [_run(trace, batch=batch, replay="prefill", prefill_chunk=chunk, engine=e).summary
            for e in ("python", "compiled")]
    s = runs[0]
    assert s["prefill_time_s"] + s["decode_time_s"] == pytest.approx(s["total_time_s"])
    assert s["decode_time_per_output_token_s"] == pytest.approx(
        s["decode_time_s"] / s["output_tokens"])
    if batch == 1:  # no step mixes a prompt chunk with another request's decode token
        assert s["prefill_tokens"] == n * min(prefill, tokens - 1)
    for k in ("prefill_tokens", "prefill_time_s", "decode_time_s", "prefill_tokens_per_s",
              "decode_time_per_output_token_s"):
        assert runs[1][k] == pytest.approx(s[k], nan_ok=True), k


def test_decode_replay_has_no_prefill_phase() -> None:
    """``replay=decode`` (the default) replays no prompt step: the decode figures are the
    run's own and the prefill ones are empty; zero-latency runs have no times at all."""
    trace = random_trace(num_requests=2, tokens=5, layers=2, experts=6, top_k=2, seed=3,
                         prefill_tokens=2)
    s = _run(trace).summary
    assert s["prefill_tokens"] == 0 and s["prefill_time_s"] == 0.0
    assert math.isnan(s["prefill_tokens_per_s"])
    assert s["decode_time_s"] == pytest.approx(s["total_time_s"])
    assert s["decode_time_per_output_token_s"] == pytest.approx(s["time_per_output_token_s"])
    z = simulate(trace, "lru", capacity=8, mode="zero_latency").summary
    assert math.isnan(z["prefill_time_s"]) and math.isnan(z["decode_time_s"])
