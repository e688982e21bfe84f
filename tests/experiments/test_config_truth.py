"""Issue 25, one config truth: an override that a group does not use, a label that names
something other than what runs, an unknown ``+key`` and integer options given as floats or out
of range are refused with one line before anything runs (or converted, for whole floats)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.schema import INT_MAX, check, check_overrides

register_configs()
GROUPS = {"trace", "hw", "policy", "cache", "model", "predictor", "experiment", "runtime"}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


_BASE = OmegaConf.to_container(_compose(), resolve=True)  # composed once: 0.5 s a time


def _with(*overrides: str):
    """The default config with scalar overrides applied as Hydra would (values parsed by
    Hydra's own override parser), without composing again."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.create(_BASE)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
    return cfg


@pytest.mark.parametrize(("overrides", "why"), [
    (["trace.path=/x.parquet"], "trace.path=/x.parquet: trace=embedded reads its own path"),
    (["trace.format=parquet"], "trace.format=parquet: trace=embedded reads its own format"),
    (["trace.name=file", "trace.path=???"], "trace.path: trace=file needs the trace file"),
    (["trace.name=deepseek_v2_lite"], "trace.path=embedded: trace=deepseek_v2_lite reads its "
                                      "own path"),
    (["trace.name=mine"], "trace.name=mine: names no trace config"),
    (["policy.name=belady"], "policy.name=belady, policy.eviction=lru: the row would record "
                             "belady while lru runs"),
    (["policy.eviction=belady"], "policy.name=lru, policy.eviction=belady: the row would "
                                 "record lru while belady runs"),
    (["policy.prefetch=next_layer_all"], "policy.name=lru, policy.prefetch=next_layer_all: "
                                         "lru prefetches nothing"),
    (["policy.name=nonesuch"], "policy.name=nonesuch: not a registered policy"),
    (["max_requests=1e30"], f"max_requests=1e+30: must be <= {INT_MAX}"),
    (["max_tokens=1e30"], f"max_tokens=1e+30: must be <= {INT_MAX}"),
    (["prefill_chunk=1e30"], f"prefill_chunk=1e+30: must be <= {INT_MAX}"),
    (["batch=1e20"], f"batch=1e+20: must be <= {INT_MAX}"),
    (["seed=1.5"], "seed=1.5: must be a whole number"),
    (["seed=nan"], "seed=nan: must be a whole number"),
])
def test_a_config_that_would_record_a_lie_is_one_line(overrides: list[str], why: str) -> None:
    errors = check(_with(*overrides))
    assert any(e.startswith(why) for e in errors), errors
    assert all("\n" not in e for e in errors)


def test_whole_floats_run_as_integers() -> None:
    cfg = _with("seed=1.0", "batch=2.0", "max_requests=3.0", "max_tokens=4e0")
    assert check(cfg) == []
    assert [type(cfg[k]) for k in ("seed", "batch", "max_requests", "max_tokens")] == [int] * 4
    assert (cfg.seed, cfg.batch, cfg.max_requests, cfg.max_tokens) == (1, 2, 3, 4)


def test_what_stays_allowed() -> None:
    """A prefetch policy's eviction may be swapped; a trace file is trace=file; every shipped
    predictor group still composes clean (test_schema checks every experiment)."""
    assert check(_compose("policy=moe_infinity", "policy.eviction=lru")) == []
    assert check(_compose("trace=file", "trace.path=/x.parquet")) == []
    assert check(_compose("trace=file"))[0].startswith("trace.path: trace=file needs the trace")
    for name in sorted(p.stem for p in (CONF_DIR / "predictor").glob("*.yaml")):
        assert check(_compose(f"predictor={name}")) == [], name


@pytest.mark.parametrize(("override", "why"), [
    ("+foo=1", "+foo=1: foo is not a moesim-sim option"),
    ("++foo=1", "++foo=1: foo is not a moesim-sim option"),
    ("+cache.colour=red", "+cache.colour=red: cache.colour is not a moesim-sim option"),
    ("policy.name=belady", "policy.name=belady: policy.name names what runs"),
    ("hw.name=h100_pcie", "hw.name=h100_pcie: hw.name names what runs"),
    ("trace.name=x", "trace.name=x: trace.name names what runs"),
])
def test_overrides_that_relabel_or_add_nothing_are_refused(override: str, why: str) -> None:
    errors = check_overrides([override], GROUPS)
    assert len(errors) == 1 and errors[0].startswith(why), errors


def test_overrides_that_run_what_they_say_pass() -> None:
    ok = ["+experiment=batch_dedup", "+cache.experts=3", "+policy.ahead=2", "+hw.x=1",
          "policy=belady", "hw=a100_sxm4", "seed=3", "label=mine"]
    assert check_overrides(ok, GROUPS) == []


def test_chunking_without_streaming_is_refused() -> None:
    """``run.chunk_requests`` chunks only a streamed run: given alone it would be recorded for
    a run that loaded the whole trace."""
    from moesim.experiments.schema import check_unused_overrides

    errors = check_unused_overrides(["run.chunk_requests=5"], _with("run.chunk_requests=5"))
    assert errors == ["run.chunk_requests: applies to a streamed run only (add run.stream=true)"
                      "; nothing would be chunked"]
    both = ["run.chunk_requests=5", "run.stream=true"]
    assert check_unused_overrides(both, _with(*both)) == []
    assert check_unused_overrides(["seed=3"], _with("seed=3")) == []
