"""The sim app's ``predictor=`` group: each entry composes into a policy that accepts its table's
timing, and the predictor plot draws a labelled sweep."""

from __future__ import annotations

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.plot import choose_spec, plot_auto
from moesim.policies.prediction_prefetch import available
from moesim.predictors.tables import parse_spec, predictor_config

register_configs()
ENTRIES = sorted(p.stem for p in (CONF_DIR / "predictor").glob("*.yaml"))

# the tag each predictor's table carries on the embedded trace (router_in present)
TAGS = {
    "pre_attention": "pre_attention:same_layer",
    "fate": "routed:prev_layer",
    "moe_beyond_causal": "routed:same_layer",
    "moe_beyond_text": "token_start:any_layer",
    "speculation": "routed:minus2_layer",
}


def _cfg(overrides, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_composes_with_a_usable_point(entry):
    cfg = _cfg([f"predictor={entry}"])
    assert cfg.label == entry and cfg.requests == "held_out"
    name = parse_spec(cfg.predictions.path)
    if entry.startswith("oracle_"):
        assert cfg.policy.name == "oracle_prefetch" and name is None
    elif entry == "none":
        assert cfg.policy.name == "lru" and name is None
    else:
        assert cfg.policy.name == "prediction_prefetch"
        if name != "fate":
            predictor_config(name)  # the named predictor exists
        assert available(TAGS[name], cfg.policy.point, cfg.policy.ahead)


def test_experiment_sweeps_every_entry():
    cfg = _cfg(["experiment=prediction_point"], hydra=True)
    swept = cfg.hydra.sweeper.params.predictor.split(",")
    assert sorted(swept) == ENTRIES


def test_compute_scale_multiplies_every_compute_time():
    from moesim.hw_profiles import load_profile
    from moesim.hw_profiles.compute import ScaledCompute
    from moesim.traces.model_card import load_card

    base = load_profile("v100_pcie").compute_model(load_card("deepseek_v2_lite"))
    scaled = ScaledCompute(base, 10.0)
    assert scaled.attention_time(1, 100) == pytest.approx(10 * base.attention_time(1, 100))
    assert scaled.expert_time(3) == pytest.approx(10 * base.expert_time(3))
    assert scaled.dense_layer_time(2, 5) == pytest.approx(10 * base.dense_layer_time(2, 5))
    with pytest.raises(ValueError):
        ScaledCompute(base, 0.0)


def test_predictor_plot(tmp_path):
    """A prediction_point-like sweep (mode x compute_scale x predictor): series by predictor,
    x the compute scale, a panel per mode; the policy each predictor sets varies with it and is
    not refused as an unplotted factor."""
    rows = []
    policy = {"none": "lru", "fate": "prediction_prefetch", "oracle_routed": "oracle_prefetch"}
    for label, zl, stall in [("none", 0.6, 0.06), ("fate", 0.8, 0.05), ("oracle_routed", 1, 0.059)]:
        for scale, f in ((1.0, 1.0), (10.0, 0.5)):
            rows.append({"label": label, "mode": "zero_latency", "hw.name": "v100_pcie",
                         "compute_scale": scale, "hit_rate": zl,
                         "stall_per_output_token_s": float("nan"), "policy.name": policy[label]})
            rows.append({"label": label, "mode": "timed", "hw.name": "v100_pcie",
                         "compute_scale": scale, "hit_rate": zl,
                         "stall_per_output_token_s": stall * f, "policy.name": policy[label]})
    df = pd.DataFrame(rows)
    spec = choose_spec(df)
    assert (spec.x, spec.hue, spec.col) == ("compute_scale", "label", "mode")
    paths = plot_auto(df, tmp_path)
    assert [p.name for p in paths] == ["predictors.png", "predictors.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
