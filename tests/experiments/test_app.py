"""The Hydra app: every config composes, every policy runs, outputs are written, and bad input
gives one clear line."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from moesim import hw_profiles
from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.plot import main as plot_main
from moesim.experiments.sim_app import run, write_outputs
from moesim.policies.registry import policy_names
from moesim.traces import write_trace
from moesim.traces.model_card import list_cards
from moesim.traces.predictions import PredictionWriter
from tests.helpers import random_trace

register_configs()
TRACE_CONFIGS = sorted(p.stem for p in (CONF_DIR / "trace").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory) -> Path:
    """Synthetic routing with DeepSeek-V2-Lite's shape (26 MoE layers, 64 experts, top-6)."""
    tr = random_trace(num_requests=3, tokens=6, layers=26, experts=64, top_k=6, seed=3)
    meta = tr.meta.__class__(
        model="deepseek_v2_lite", moe_layers=tuple(range(1, 27)), num_experts=64, top_k=6,
        expert_bytes=17301504, source="synthetic test fixture",
    )
    path = tmp_path_factory.mktemp("trace") / "tiny.parquet"
    write_trace(path, meta, tr.requests)
    # A prediction table beside it, as the MoE-Beyond importer writes: here the true experts.
    writer = PredictionWriter(path.with_suffix(".predictions.parquet"), meta.moe_layers,
                              available_at="pre_attention:same_layer")
    for req in tr.requests:
        writer.add(req.request_id, req.experts)
    writer.close({"model": meta.model, "source": "test: perfect predictions"})
    return path


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _compose_trace_and_hw(trace, hw):
    overrides = [f"trace={trace}", f"hw={hw}"]
    if trace == "file":
        overrides.append("trace.path=x.parquet")
    cfg = _cfg(overrides)
    assert cfg.trace.path and cfg.hw.name == hw
    hw_profiles.profile_from_mapping(dict(cfg.hw), name=hw)


# The trace and hw groups are independent (no option of one interpolates the other), so each
# trace config composes once beside the default profile rather than in every pair (the pairs
# were 270 composes, ~25 s of the suite, checking nothing more); every profile composes as
# ``hw=<name>`` beside the default trace in tests/hw_profiles/test_hw_profiles_shipped.py::
# test_profiles_compose_as_the_hydra_group_hw.
@pytest.mark.parametrize("trace", TRACE_CONFIGS)
def test_every_trace_config_composes(trace):
    _compose_trace_and_hw(trace, "v100_pcie")


def test_trace_and_hw_groups_are_independent():
    """What lets the tests of each group alone stand for every pair: no trace config pulls in a
    defaults list or interpolates an ``hw`` option, and no profile interpolates a ``trace``
    one."""
    import re

    def refs(text, group):
        return re.findall(r"\$\{[^}]*\b" + group + r"\.", text)

    for path in (CONF_DIR / "trace").glob("*.yaml"):
        text = path.read_text()
        assert not refs(text, "hw") and "defaults:" not in text, path
    for name in hw_profiles.list_profiles():
        assert not refs(hw_profiles.profile_path(name).read_text(), "trace"), name
    assert refs("a: ${oc.select:hw.name,x}", "hw") and not refs("a: ${model.hw_x}", "hw")


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = _cfg([f"experiment={experiment}"])
    assert cfg.trace.path and cfg.policy.name


@pytest.mark.parametrize("launcher", ["joblib", "slurm", "packed_local"])
def test_launcher_configs_compose(launcher):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=stall_vs_link",
                                           f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert {"joblib": "JoblibLauncher", "slurm": "PackedSlurmLauncher",
            "packed_local": "PackedLocalLauncher"}[launcher] in target


@pytest.mark.parametrize("model", list_cards())
def test_every_model_card_composes(model):
    assert _cfg([f"model={model}"]).model.name == model


@pytest.fixture(scope="module")
def policy_cfgs(tiny_trace):
    """Each policy's run config, composed once (0.15 s a composition) for both modes: ``mode``
    is a plain top-level key, set per test."""
    from moesim.policies.registry import resolve

    cfgs = {}
    for policy in policy_names():
        layout = resolve({"name": policy}).eviction.partition_required or "global"
        cfgs[policy] = _cfg(["trace=file", f"trace.path={tiny_trace}", f"policy={policy}",
                             "progress=false", "cache.fraction=0.25",
                             f"cache.partition={layout}"])
    return cfgs


@pytest.mark.parametrize("mode", ["timed", "zero_latency"])
@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_runs(policy, mode, policy_cfgs, tmp_path):
    import copy

    cfg = copy.deepcopy(policy_cfgs[policy])
    cfg.mode = mode
    result, row = run(cfg)
    assert row["mode"] == mode
    s = result.summary
    assert s["accesses"] == 3 * 6 * 26 * 6
    assert row["policy.name"] == policy and row["cache.slots"] == 416
    write_outputs(result, row, tmp_path)
    summary = pd.read_parquet(tmp_path / "summary.parquet")
    assert len(summary) == 1 and summary.loc[0, "hit_rate"] == s["hit_rate"]
    assert len(pd.read_parquet(tmp_path / "per_layer.parquet")) == 26


def test_perfect_predictions_hit_everything_in_zero_latency(tiny_trace):
    cfg = _cfg(["trace=file", f"trace.path={tiny_trace}", "policy=moe_beyond_replay",
                "mode=zero_latency", "progress=false", "cache.fraction=0.1"])
    result, _ = run(cfg)
    assert result.summary["hit_rate"] == 1.0
    timed, _ = run(_cfg(["trace=file", f"trace.path={tiny_trace}", "policy=moe_beyond_replay",
                         "progress=false", "cache.fraction=0.1"]))
    s = timed.summary  # same-layer predictions leave no time: every load arrives late
    assert s["misses"] == 0 and s["late_hits"] > 0 and s["stall_late_s"] > 0


def test_missing_prediction_table_is_a_clear_error(tmp_path):
    tr = random_trace(num_requests=1, tokens=3, layers=26, experts=64, top_k=6, seed=1)
    meta = tr.meta.__class__(model="deepseek_v2_lite", moe_layers=tuple(range(1, 27)),
                             num_experts=64, top_k=6, expert_bytes=17301504)
    write_trace(tmp_path / "t.parquet", meta, tr.requests)
    cfg = _cfg(["trace=file", f"trace.path={tmp_path / 't.parquet'}",
                "policy=moe_beyond_replay", "progress=false"])
    with pytest.raises(Exception, match="no prediction table"):
        run(cfg)


def test_timeline_and_transfers_written(tiny_trace, tmp_path):
    cfg = _cfg(["trace=file", f"trace.path={tiny_trace}", "policy=next_layer_all",
                "progress=false", "output.transfers=true", "output.timeline_steps=2"])
    result, row = run(cfg)
    write_outputs(result, row, tmp_path)
    tr = pd.read_parquet(tmp_path / "transfers.parquet")
    assert set(tr["kind"]) == {"demand", "prefetch"}
    assert (tmp_path / "timeline.json").stat().st_size > 100
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "timeline.png").stat().st_size > 1000


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moesim.experiments.sim_app", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_clear_line(tmp_path):
    proc = _cli("trace=file", f"trace.path={tmp_path}/missing.parquet", cwd=tmp_path)
    assert proc.returncode != 0
    assert "error: trace.path" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("summary.parquet"))


def test_console_summary_names_the_runtime_that_ran(tiny_trace):
    """The printed header names a runtime profile when one ran (none: the roofline alone)."""
    from moesim.experiments.sim_app import format_summary

    base = ["trace=file", f"trace.path={tiny_trace}", "progress=false", "cache.fraction=0.25"]
    for runtime, shown in (("llama_cpp_graphs", True), ("none", False)):
        result, row = run(_cfg([*base, f"runtime={runtime}"]))
        head = format_summary(row, result.summary).splitlines()[0]
        assert ("runtime llama_cpp_graphs" in head) is shown and "runtime none" not in head
