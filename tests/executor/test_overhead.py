"""The executor's own costs (copy hand-off, run-loop work) measured as a runtime profile: the
measurements, their provenance, the profiler's record of them, and the forecast charging them
through the runtime cost model (zero terms: the forecast as before)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from moesim.hw_profiles import load_profile
from moesim.hw_profiles.runtime import apply_runtime, load_runtime, runtime_from_mapping
from moesim.sim import FixedCompute, FixedLink, simulate
from moesim.sim.executor.overhead import (
    RUNTIME_NAME,
    LoopOverhead,
    _shape_points,
    fit_loop,
    loop_step_time,
    measure_loop_overhead,
    runtime_mapping,
)
from tests.executor.conftest import card_trace, small_card

pytest.importorskip("torch")


def test_fit_recovers_the_terms_of_exact_points() -> None:
    """Cross-check of the fit: points made from known terms give them back."""
    step, layer, expert = 30e-6, 7e-6, 1.5e-6
    pts = [(lay, calls, step + lay * layer + calls * expert)
           for lay, calls in ((2, 2), (2, 12), (8, 8), (8, 48))]
    assert fit_loop(pts) == pytest.approx((step, layer, expert), rel=1e-9, abs=1e-15)
    # noise that would make a term negative drops it instead
    s, lay_s, e = fit_loop([(1, 1, 1e-5), (1, 2, 0.9e-5), (4, 4, 4e-5), (4, 8, 3.9e-5)])
    assert min(s, lay_s, e) >= 0


def test_shape_points_vary_layers_and_top_k() -> None:
    card = small_card(layers=8, top_k=2)
    pts = _shape_points(card)
    assert {lay for lay, _ in pts} == {2, 8} and {k for _, k in pts} == {1, 2}
    few = _shape_points(small_card(layers=2, top_k=1))
    assert len({lay for lay, _ in few}) == 2 and len({k for _, k in few}) == 2


def test_loop_overhead_is_measured_positive_and_finite() -> None:
    card = small_card(layers=4, top_k=2)
    t, copies = loop_step_time(card, 4, 2, steps=30)
    assert math.isfinite(t) and t > 0 and copies == 0  # every expert resident: no copy
    t_miss, copies = loop_step_time(card, 4, 2, steps=30, capacity=6)
    assert math.isfinite(t_miss) and t_miss > 0 and copies > 0  # misses copy, via the Copier
    lo = measure_loop_overhead(card, steps=30, rounds=2)
    terms = (lo.step_s, lo.layer_s, lo.expert_s)
    assert all(math.isfinite(x) and x >= 0 for x in terms) and sum(terms) > 0
    assert math.isfinite(lo.copy_s) and lo.copy_s >= 0 and lo.copy_points[0][0] > 0
    assert len(lo.points) == 4 and all(p[2] > 0 for p in lo.points)
    # the fit charges a step of the card's own shape about what was timed there
    big = max(lo.points, key=lambda p: p[1])
    assert lo.per_step(big[0], big[1]) == pytest.approx(big[2], rel=0.5)


def _loop() -> LoopOverhead:
    return LoopOverhead(20e-6, 6e-6, 1e-6, ((1, 1, 27e-6), (4, 8, 52e-6)), 30, 2,
                        "2026-01-01T00:00:00Z")


def test_runtime_mapping_round_trips_with_provenance(tmp_path: Path) -> None:
    card = small_card()
    data = runtime_mapping(_loop(), 45e-6, card, "test")
    rt = runtime_from_mapping(data, "x", allow_bare=False)
    assert rt.name == RUNTIME_NAME
    assert rt.value("copy.per_copy_s") == pytest.approx(45e-6)
    # the loop's main-thread work per copy adds to the hand-off
    busy = replace(_loop(), copy_s=5e-6, copy_points=((10.0, 50e-6),))
    both = runtime_from_mapping(runtime_mapping(busy, 45e-6, card, "t"), "x", allow_bare=False)
    assert both.value("copy.per_copy_s") == pytest.approx(50e-6)
    assert rt.value("overhead.step_s") == pytest.approx(20e-6)
    assert rt.value("overhead.layer_s") == pytest.approx(6e-6)
    assert rt.value("overhead.expert_s") == pytest.approx(1e-6)
    for key in ("copy.per_copy_s", "overhead.step_s", "overhead.layer_s", "overhead.expert_s"):
        q = rt.quantity(key)
        assert q.kind == "measured" and q.source.strip()
    assert "measure_handoff" in rt.per_copy_s.source
    assert "measure_loop_overhead" in rt.layer_s.source
    # as a YAML file (the profiler's --runtime-out) it loads the same
    path = tmp_path / "rt.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    again = load_runtime(path)
    assert again.value("copy.per_copy_s") == rt.value("copy.per_copy_s")
    # no hand-off measured here: 0, saying where the profile keeps it
    none = runtime_from_mapping(runtime_mapping(busy, None, card, "t", "in latency_s"), "x",
                                allow_bare=False)
    assert none.value("copy.per_copy_s") == pytest.approx(5e-6)
    assert "latency_s" in none.per_copy_s.source


def test_forecast_charges_the_terms_and_zero_terms_are_the_old_forecast() -> None:
    card = small_card()
    tr = card_trace(card, seed=3)
    link, comp = FixedLink(bandwidth_Bps=1e8, latency_s=0.0), FixedCompute(expert_s=1e-4)

    def run(rt_data: dict | None) -> float:
        rt = None if rt_data is None else runtime_from_mapping(rt_data, "x", allow_bare=False)
        lk, cm = apply_runtime(rt, link, comp, card)
        res = simulate(tr, "lru", capacity=12, link=lk, compute=cm)
        return float(res.summary["time_per_output_token_s"])

    old = run(None)
    zero = runtime_mapping(LoopOverhead(0.0, 0.0, 0.0, (), 1, 1, "t"), 0.0, card, "t")
    assert run(zero) == old  # bit-identical: apply_runtime leaves the models alone
    charged = run(runtime_mapping(_loop(), 45e-6, card, "t"))
    # at least the loop's work per step (step + layers x layer + calls x expert) is added
    per_step = 20e-6 + card.num_layers * 6e-6 + card.num_moe_layers * card.top_k * 1e-6
    assert charged >= old + per_step * 0.999


def test_profiler_records_the_runtime_and_writes_it(tmp_path: Path) -> None:
    """``moesim-profile storage`` with a bench that measures the executor's runtime: the
    profile keeps it (machine.executor_runtime) and --runtime-out writes a loadable runtime."""
    from moesim.hw_profiles.measure import main
    from tests.hw_profiles.test_hw_storage import FakeStorageBench

    class Bench(FakeStorageBench):
        def executor_runtime(self, card: object) -> dict:
            return runtime_mapping(_loop(), 45e-6, small_card(), "fake bench")

        def expert_after_copy(self, card: object) -> dict:
            return {"value": 60.0, "unit": "us", "kind": "measured", "source": "fake"}

    out, rt_out = tmp_path / "fake_vm.yaml", tmp_path / "rt" / "fake_rt.yaml"
    args = ["storage", "--model", "deepseek_v2_lite", "--scale", "0.25", "--out", str(out),
            "--no-progress", "--max-bytes", str(2**20), "--file-bytes", str(2**21),
            "--batches", "1", "4", "--contexts", "1", "512", "--runtime-out", str(rt_out)]
    assert main(args, storage_bench=Bench()) == 0
    prof = load_profile(out)
    rec = runtime_from_mapping(prof.machine["executor_runtime"], "x", allow_bare=False)
    rt = load_runtime(rt_out)
    assert rec == rt
    assert rt.value("copy.per_copy_s") == pytest.approx(45e-6)
    assert prof.machine["expert_after_copy_s"]["value"] == 60.0
    # a bench without the measurement: no runtime, and --runtime-out is refused before writing
    bad = tmp_path / "other.yaml"
    args2 = [a if a != str(out) else str(bad) for a in args]
    assert main(args2, storage_bench=FakeStorageBench()) == 2
    assert not bad.exists()


def test_real_bench_measures_the_hand_off_and_the_loop(tmp_path: Path) -> None:
    from moesim.hw_profiles.measure_storage import CpuStorageBench

    card = small_card()
    with CpuStorageBench(card, tmp_path / "scratch", file_bytes=2**20, torch_threads=1, seed=0,
                         rounds=2, window_s=0.02, work_dir=tmp_path / "work", loop_steps=30,
                         handoff_copies=6) as bench:
        data = bench.executor_runtime(card)
    rt = runtime_from_mapping(data, "x", allow_bare=False)
    per_copy = rt.value("copy.per_copy_s")
    assert math.isfinite(per_copy) and 0 < per_copy < 1.0
    assert rt.per_copy_s.kind == "measured"
    loop = [rt.value(k) for k in ("overhead.step_s", "overhead.layer_s", "overhead.expert_s")]
    assert all(math.isfinite(x) and x >= 0 for x in loop) and sum(loop) > 0


def test_compute_right_after_a_copy_is_measured(tmp_path: Path) -> None:
    from moesim.sim.executor.overhead import after_copy_quantity, measure_after_copy

    card = small_card()
    m = measure_after_copy(card, tmp_path / "work", samples=20)
    assert m.samples == 20
    assert all(math.isfinite(x) and x > 0 for x in (m.after_copy_s, m.again_s))
    q = after_copy_quantity(m, card, "test")
    assert q["kind"] == "measured" and q["unit"] == "us" and "not charged" in q["source"]
    assert q["value"] == pytest.approx(m.after_copy_s * 1e6, rel=1e-5)


def test_fit_drops_a_term_the_noise_would_make_negative() -> None:
    """Exact points of ``t = 2 us x layers`` with a negative intercept's worth of noise on the
    small shapes: unconstrained least squares gives a negative step; the fit drops it (0) and
    refits the rest, the best non-negative fit (checked against every single-term fit)."""
    import numpy as np

    from moesim.sim.executor.overhead import fit_loop

    pts = [(4, 4, 8e-6 - 1e-6), (4, 8, 8e-6 - 1e-6), (26, 26, 52e-6), (26, 52, 52e-6)]
    a = np.array([[1.0, lay, calls] for lay, calls, _ in pts])
    b = np.array([t for *_, t in pts])
    free, *_ = np.linalg.lstsq(a, b, rcond=None)
    assert free[0] < 0  # the case this test is about
    step, layer, expert = fit_loop(pts)
    assert min(step, layer, expert) >= 0 and step == 0.0
    res = float(np.sum((a @ np.array([step, layer, expert]) - b) ** 2))
    for j in range(3):  # no one-term fit does better
        col = a[:, j]
        c = max(0.0, float(col @ b / (col @ col)))
        assert res <= float(np.sum((col * c - b) ** 2)) + 1e-30
