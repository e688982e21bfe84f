"""experiment=validate: the pipeline (simulate, run for real, compare) on small inputs; the
numbers are checked for consistency, never for accuracy."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.validate import policy_label, run_validation
from moesim.traces import write_trace
from tests.helpers import random_trace

register_configs()
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Routing with the embedded model's shape (6 MoE layers, 16 experts, top-2)."""
    tr = random_trace(num_requests=2, tokens=6, layers=6, experts=16, top_k=2, seed=5)
    meta = tr.meta.__class__(model="moesim_tiny_moe", moe_layers=tuple(range(6)),
                             num_experts=16, top_k=2, expert_bytes=1, source="test fixture")
    path = tmp_path_factory.mktemp("trace") / "tiny.parquet"
    write_trace(path, meta, tr.requests)
    return path


def test_validate_configs_compose() -> None:
    full = _cfg(["experiment=validate"])
    smoke = _cfg(["experiment=validate_smoke"])
    n_full = len(full.validate.policies) * len(full.validate.capacities) * len(
        full.validate.traces)
    assert n_full >= 12 and full.validate.repeats >= 3
    assert len(smoke.validate.policies) * len(smoke.validate.capacities) * len(
        smoke.validate.traces) == 2
    labels = {policy_label(dict(p)) for p in full.validate.policies}
    assert {"lru", "belady", "next_layer_all"} <= labels
    assert sum(lbl.startswith("oracle_prefetch@") for lbl in labels) == 2


@pytest.mark.slow
def test_cli_smoke_on_the_embedded_trace_writes_both_sources_and_the_comparison(
        tmp_path: Path) -> None:
    """The command as documented (``experiment=validate_smoke``, here with 2 repeats), end to
    end on the embedded trace: every table and profile it writes, and their consistency.

    (One run checks what an in-process smoke run on a synthetic trace and this command run
    checked separately, ~9 s of the suite; scaled cards and run_validation in-process stay
    covered by the paced and forecast tests below.)"""
    proc = subprocess.run(
        [sys.executable, "-m", "moesim.experiments.validate", "experiment=validate_smoke",
         "validate.repeats=2", f"hydra.run.dir={tmp_path}",
         f"validate.work_dir={tmp_path / 'work'}"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "time per token |error|" in proc.stdout
    out = tmp_path
    table = pd.read_parquet(out / "validation.parquet")
    summary = pd.read_parquet(out / "summary.parquet")
    per_layer = pd.read_parquet(out / "per_layer.parquet")
    assert sorted(summary["source"].unique()) == ["real", "sim"]
    sims = summary[summary["source"] == "sim"]
    # per config: one prediction before, and per real run one with the reads timed around it
    # plus the in-run-link diagnostic
    assert sims.groupby("config_id")["prediction"].value_counts().to_dict() == {
        (c, k): n for c in (0, 1) for k, n in (("before", 1), ("before_io", 1), ("bracketed", 2),
                                                ("bracketed_no_handoff", 2), ("bracketed_io", 2),
                                                ("inrun_link", 2), ("no_runtime", 1))}
    assert len(summary) == 2 * (11 + 2)
    assert set(per_layer["source"]) == {"real", "sim"}
    assert len(per_layer) == len(summary) * 6
    real = summary[summary["source"] == "real"]
    assert (real["executor.backend"] == "storage").all() and (real["scale"] == 1.0).all()
    assert real["expert_bytes"].nunique() == 1
    assert (real["read_before_s"] > 0).all() and (real["read_after_s"] > 0).all()
    assert (summary["expert_bytes"] == real["expert_bytes"].iloc[0]).all()
    assert len(table) == 2
    assert (table["prediction"] == "bracketed_io").all()
    for kind in ("before", "bracketed", "bracketed_no_handoff", "inrun_link", "no_runtime"):
        assert table[f"tpot_err_{kind}_pct"].notna().all()
    # the calibration's run-loop work is charged (runtime auto: the profile's own), the
    # hand-off stays in the profile's storage latency (the runtime's per-copy cost is the
    # loop's main-thread work per copy only)
    assert (table["runtime.name"] == "moesim_executor").all()
    assert (table["runtime.layer_s"] + table["runtime.step_s"] > 0).all()
    assert (table["runtime.per_copy_s"] >= 0).all()
    prof0 = yaml.safe_load((out / "profile_00.yaml").read_text())
    assert "left out" in prof0["machine"]["executor_runtime"]["copy"]["per_copy_s"]["source"]
    assert (table["tpot_sim_s"] > 0).all()
    profiles = sorted(p.name for p in out.glob("profile_*.yaml"))
    assert profiles == ["profile_00.yaml", "profile_01.yaml"]
    lru = table[table["policy.label"] == "lru"].iloc[0]
    assert lru["counts_equal"]  # demand-only: the same hits and misses
    for _, r in table.iterrows():
        assert r["tpot_real_min_s"] <= r["tpot_real_s"] <= r["tpot_real_max_s"]
        assert math.isclose(r["tpot_err_pct"],
                            (r["tpot_sim_s"] - r["tpot_real_s"]) / r["tpot_real_s"] * 100)
        assert r["tpot_abs_err_pct"] == abs(r["tpot_err_pct"])


def test_cli_without_validate_settings_is_one_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moesim.experiments.validate"], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 2 and "experiment=validate" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.rglob("*"))


def test_bad_validate_option_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moesim.experiments.validate", "experiment=validate_smoke",
         "validate.repeats=0", "validate.scale=-1"], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: validate.scale=-1: must be > 0", "error: validate.repeats=0: must be >= 1"]


@pytest.mark.shared
def test_deepseek_test_prompts_validate_one_config(tmp_path: Path) -> None:
    if not (SHARED / "deepseek_v2_lite_moe-beyond").is_dir():
        pytest.skip("../shared/traces is absent")
    cfg = _cfg(["experiment=validate", "validate.repeats=1", "validate.capacities=[0.25]"])
    OmegaConf.update(cfg, "validate.traces", [
        {"trace": "deepseek_v2_lite_test", "requests": "held_out", "max_requests": 1,
         "max_tokens": 3, "scale": 0.0625}], merge=False)
    OmegaConf.update(cfg, "validate.policies", [{"name": "belady"}], merge=False)
    OmegaConf.update(cfg, "validate.work_dir", str(tmp_path / "work"))
    table = run_validation(cfg, tmp_path / "out", log=lambda _msg: None)
    assert len(table) == 1 and table["counts_equal"].all()


def test_noise_floor_is_the_leave_one_out_median() -> None:
    from moesim.experiments.validate import noise_floor

    # runs 1.0, 1.0, 1.0, 1.2: three land 0 % from the others' median, one 20 %
    assert noise_floor(np.array([1.0, 1.0, 1.0, 1.2])) == pytest.approx(0.0)
    t = np.array([1.0, 1.1, 1.2])
    want = np.median([abs(1.0 / 1.15 - 1), abs(1.1 / 1.1 - 1), abs(1.2 / 1.05 - 1)]) * 100
    assert noise_floor(t) == pytest.approx(want)
    assert math.isnan(noise_floor(np.array([1.0])))


def test_bootstrap_interval_holds_the_error_and_is_seeded() -> None:
    from moesim.experiments.validate import bootstrap_err, bootstrap_median_abs

    t = np.array([1.0, 1.05, 0.95, 1.1, 0.9])
    lo, hi = bootstrap_err(1.2, t, np.random.default_rng(0))
    assert lo <= 20.0 <= hi and hi - lo < 40
    assert (lo, hi) == bootstrap_err(1.2, t, np.random.default_rng(0))
    lo1, hi1 = bootstrap_err(1.2, np.full(5, 1.0), np.random.default_rng(0))
    assert lo1 == pytest.approx(20.0) and hi1 == pytest.approx(20.0)  # no spread, no interval
    mlo, mhi = bootstrap_median_abs([1.0, -2.0, 3.0, 4.0, -5.0], seed=1)
    assert mlo <= 3.0 <= mhi


def test_paced_smoke_interleaves_repeats_and_records_load_steal_and_pace(
        tiny_trace: Path, tmp_path: Path) -> None:
    cfg = _cfg(["experiment=validate_smoke", "validate.repeats=2", "validate.pace_GBps=0.2"])
    OmegaConf.update(cfg, "validate.traces", [
        {"trace": "file", "path": str(tiny_trace), "scale": 0.5, "label": "tiny"}],
        merge=False)
    OmegaConf.update(cfg, "validate.work_dir", str(tmp_path / "work"))
    out = tmp_path / "out"
    msgs: list[str] = []
    table = run_validation(cfg, out, log=msgs.append)
    runs = [m for m in msgs if "] run " in m]
    # round r runs every config once: configs alternate, not one config's repeats in a row
    assert [m.split("]")[0].strip(" [") for m in runs] == ["0", "1", "0", "1"]
    summary = pd.read_parquet(out / "summary.parquet")
    real = summary[summary["source"] == "real"]
    assert len(real) == 4 and real["load_avg_1m"].notna().all()
    assert (real["steal_pct"] >= 0).all()
    assert (real["executor.pace_Bps"] == 0.2e9).all()
    assert (real["executor.pace_reads"] > 0).all()
    assert (real["executor.pace_achieved_Bps"] <= 0.2e9 * 1.0001).all()
    assert (table["prediction"] == "paced").all() and table["tpot_err_paced_pct"].notna().all()
    assert table["tpot_err_paced_achieved_pct"].notna().all()
    assert (table["repeats"] == 2).all() and table["tpot_noise_floor_pct"].notna().all()
    for _, r in table.iterrows():
        assert r["tpot_err_lo_pct"] <= r["tpot_err_pct"] + 1e-9 or r["repeats"] < 2
    # one profile per trace (profiled once), written for every config: the paced tier's
    # rate and the paced reads' measured lag
    profiles = sorted(out.glob("profile_*.yaml"))
    assert len(profiles) == 2
    import yaml

    prof = yaml.safe_load(profiles[0].read_text())
    assert prof["storage"]["peak_bandwidth_Bps"]["value"] == 0.2e9
    assert prof["machine"]["paced_read_lag_s"] >= 0
    assert prof == yaml.safe_load(profiles[1].read_text())


def test_a_bad_trace_is_refused_before_the_first_real_run(tiny_trace: Path,
                                                          tmp_path: Path) -> None:
    """A trace whose layers do not fit the card fails in the checks, with no run done."""
    from moesim.traces import TraceError

    tr = random_trace(num_requests=1, tokens=4, layers=5, experts=16, top_k=2, seed=1)
    meta = tr.meta.__class__(model="moesim_tiny_moe", moe_layers=tuple(range(5)),
                             num_experts=16, top_k=2, expert_bytes=1, source="test fixture")
    bad = tmp_path / "bad.parquet"
    write_trace(bad, meta, tr.requests)
    cfg = _cfg(["experiment=validate_smoke"])
    OmegaConf.update(cfg, "validate.traces", [
        {"trace": "file", "path": str(tiny_trace), "scale": 0.5, "label": "ok"},
        {"trace": "file", "path": str(bad), "scale": 0.5, "label": "bad"}], merge=False)
    OmegaConf.update(cfg, "validate.work_dir", str(tmp_path / "work"))
    msgs: list[str] = []
    with pytest.raises((TraceError, ValueError)):
        run_validation(cfg, tmp_path / "out", log=msgs.append)
    assert not any("] run " in m for m in msgs) and not (tmp_path / "out").exists()


def test_calibrate_false_without_a_measured_table_is_one_error_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moesim.experiments.validate", "experiment=validate_smoke",
         "validate.calibrate=false", "hw=jetson_orin_nano", f"hydra.run.dir={tmp_path / 'run'}",
         f"validate.work_dir={tmp_path / 'work'}"], cwd=tmp_path,
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "measured compute" in lines[0]
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "run").glob("*.parquet"))


def test_paced_and_forecast_sweeps_compose_with_16_configs_and_5_repeats() -> None:
    paced = _cfg(["experiment=validate_paced"])
    forecast = _cfg(["experiment=validate_forecast"])
    for c in (paced, forecast):
        v = c.validate
        assert len(v.policies) * len(v.capacities) * len(v.traces) >= 16 and v.repeats >= 5
    assert paced.validate.pace_GBps > 0 and paced.validate.profile_once
    assert forecast.validate.pace_GBps is None and not forecast.validate.calibrate
    assert OmegaConf.to_container(forecast.validate.traces) == OmegaConf.to_container(
        paced.validate.traces)


def test_noise_and_interval_of_zero_runs_are_nan_without_warnings() -> None:
    import warnings

    from moesim.experiments.validate import bootstrap_err, noise_floor

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(noise_floor(np.array([0.0, 0.0, 1e-3])))
        assert all(math.isnan(x) for x in bootstrap_err(1.0, np.zeros(3),
                                                        np.random.default_rng(0)))


def test_forecast_charges_the_profiles_executor_runtime(tiny_trace: Path, tmp_path: Path) -> None:
    """calibrate=false with a measured profile: ``validate.runtime=auto`` charges the profile's
    machine.executor_runtime (the ``no_runtime`` diagnostic is the forecast without it, equal
    to ``validate.runtime=none``'s); all terms 0 is exactly the forecast without a runtime."""
    from moesim.sim.executor.calibrate import CalibrationOptions, calibrate
    from moesim.sim.executor.model import scaled_card
    from moesim.sim.executor.overhead import LoopOverhead, runtime_mapping
    from moesim.traces.model_card import load_card

    card = scaled_card(load_card("moesim_tiny_moe"), 0.5)
    work = str(tmp_path / "work")
    mapping = calibrate(card, card.num_moe_layers, 0,
                        CalibrationOptions(reads=4, reps=3, min_seconds=0.02, slots=4,
                                           work_dir=work, contention=False, loop_steps=10),
                        log=lambda _m: None)
    loop = LoopOverhead(50e-6, 20e-6, 5e-6, (), 1, 1, "t")

    def forecast(runtime: dict | None, choice: str, name: str) -> pd.DataFrame:
        m = {**mapping, "machine": {**mapping["machine"]}}
        m["machine"].pop("executor_runtime")
        if runtime is not None:
            m["machine"]["executor_runtime"] = runtime
        m["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(m, sort_keys=False))
        cfg = _cfg(["experiment=validate_smoke", "validate.calibrate=false",
                    f"validate.hw_path={path}", f"validate.runtime={choice}"])
        OmegaConf.update(cfg, "validate.traces", [
            {"trace": "file", "path": str(tiny_trace), "scale": 0.5, "label": "tiny"}],
            merge=False)
        OmegaConf.update(cfg, "validate.work_dir", work)
        out = tmp_path / name
        run_validation(cfg, out, log=lambda _msg: None)
        s = pd.read_parquet(out / "summary.parquet")
        return s[s["source"] == "sim"].set_index(["config_id", "prediction"])

    measured = runtime_mapping(loop, 40e-6, card, "test")
    charged = forecast(measured, "auto", "charged")
    bare = forecast(measured, "none", "bare")
    zero = forecast(runtime_mapping(LoopOverhead(0.0, 0.0, 0.0, (), 1, 1, "t"), 0.0, card,
                                    "test"), "auto", "zero")
    tpot = "time_per_output_token_s"
    for cid in (0, 1):
        assert charged.loc[(cid, "before"), tpot] > bare.loc[(cid, "before"), tpot]
        assert charged.loc[(cid, "no_runtime"), tpot] == bare.loc[(cid, "before"), tpot]
        assert zero.loc[(cid, "before"), tpot] == bare.loc[(cid, "before"), tpot]
        assert (cid, "no_runtime") not in zero.index
        assert charged.loc[(cid, "before"), "runtime.per_copy_s"] == pytest.approx(40e-6)
