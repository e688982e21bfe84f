"""MoE-Beyond's published anchor, reproduced exactly (skipped without ../shared/traces).

Their ``cache_simulator/infinity_moe_sim.py`` (HEAD 4dca2ea, predicted mode) run as written, and
an independent re-implementation of it, give the hit rates below on their 100 test prompts
(issue 12); moesim must match them to 0.05 pp with both of the script's quirks switched on
(``warmup_extra_row``, ``int()`` cache sizing), and must not match them without the quirks, so
the options are shown to be what closes the gap.
"""


import pytest
from hydra import compose, initialize_config_dir

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.sim_app import run
from moesim.policies.registry import resolve
from moesim.sim.engine import CacheOptions, RunOptions, Simulation
from moesim.sim.workload import build_workload
from moesim.traces import import_trace, load_predictions, load_trace
from tests.traces.fixtures import require_shared

pytestmark = pytest.mark.shared

SRC = "deepseek_v2_lite_moe-beyond/predicted_csvs"
TOTAL = 26 * 64
# Their script's hit rate (%) per cache fraction, from running it and an independent
# re-implementation (random pre-fill: the seed moves these by < 0.005 pp).
THEIRS = {
    "moe_beyond_replay": {0.1: 72.37, 0.2: 81.11, 0.3: 85.20, 0.5: 90.52},
    "lru": {0.1: 28.10, 0.2: 38.60, 0.3: 51.39, 0.5: 70.98},
}
TOL_PP = 0.05


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    src = require_shared(SRC)
    out = tmp_path_factory.mktemp("moe_beyond") / "predicted.parquet"
    import_trace("moe-beyond-csv", src, out)
    trace = load_trace(out)
    preds = load_predictions(out.with_suffix(".predictions.parquet"), trace.meta.moe_layers,
                             trace_meta=trace.meta)
    return trace, preds


def _hit_rate_pp(imported, policy, slots, quirk, seed=0):
    trace, preds = imported
    workload = build_workload(trace, warmup_tokens=10, warmup_extra_row=quirk)
    sim = Simulation(workload, resolve({"name": policy}),
                     CacheOptions(slots, "global", False, "random", True),
                     RunOptions("zero_latency", seed), predictions=preds)
    return 100 * sim.run().summary["hit_rate"]


@pytest.mark.parametrize("policy", sorted(THEIRS))
def test_their_script_is_reproduced_at_every_capacity(imported, policy):
    for fraction, theirs in THEIRS[policy].items():
        ours = _hit_rate_pp(imported, policy, int(TOTAL * fraction), quirk=True)
        assert ours == pytest.approx(theirs, abs=TOL_PP), (policy, fraction, ours)


def test_without_the_quirks_the_numbers_differ(imported):
    """The clean protocol (exact warm-up, rounded size) is close to theirs but not within
    0.05 pp, so the two options are what makes the reproduction exact."""
    gaps = [
        abs(_hit_rate_pp(imported, policy, round(TOTAL * f), quirk=False) - theirs)
        for policy, rows in THEIRS.items() for f, theirs in rows.items()
    ]
    assert max(gaps) > TOL_PP, gaps


def _run(tmp_path, monkeypatch, *overrides):
    src = require_shared(SRC)
    monkeypatch.setenv("MOESIM_CACHE", str(tmp_path))
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=moe_beyond_replay", f"trace.path={src}",
                                           "progress=false", *overrides])
    return run(cfg)[0].summary


def test_the_experiment_runs_their_protocol(tmp_path, monkeypatch):
    """``experiment=moe_beyond_replay`` turns both quirks on: 20 % is where int() and round()
    give different caches (332 vs 333 slots)."""
    s = _run(tmp_path, monkeypatch, "cache.fraction=0.2")
    assert 100 * s["hit_rate"] == pytest.approx(THEIRS["moe_beyond_replay"][0.2], abs=TOL_PP)
    assert s["prediction_coverage"] == pytest.approx(1.0)


def test_moe_beyond_predictions_arrive_late_when_timed(tmp_path, monkeypatch):
    s = _run(tmp_path, monkeypatch, "mode=timed", "hw=v100_pcie")
    lru = _run(tmp_path, monkeypatch, "mode=timed", "hw=v100_pcie", "policy=lru")
    # Same-layer predictions are queued only once the layer's routing is known: one starts at
    # once (a late hit), the others are still queued when demanded and become demand copies.
    assert s["promoted"] > s["late_hits"] > 0
    assert s["hit_rate_incl_late"] < lru["hit_rate"]
    assert s["stall_time_s"] > lru["stall_time_s"]
