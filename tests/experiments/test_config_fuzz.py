"""Issue 25, property tests over the option schema: every generated set of overrides is either
refused with one line per problem, each naming its key, before anything runs, or accepted with
exactly the values it gave (whole floats as integers) in the config and in the recorded row;
accepted runs record what ran (effective batch, requests, tokens beside the asked ones).

The schema check runs in-process on a config composed once (a composition costs 0.5 s, so
500 compositions would cost minutes); tests/experiments/test_run_failures.py checks the
command's exit codes in a process of its own."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from moesim.experiments import sim_app
from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.schema import INT_MAX, OPTIONS, Opt, check, check_overrides
from moesim.traces import write_trace
from tests.helpers import random_trace

register_configs()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    _BASE = OmegaConf.to_container(compose("config"), resolve=True)
_BASE.pop("hw")  # the profile is checked by its own schema; copying it per example is 80 %
GROUPS = {"trace", "hw", "policy", "cache", "model", "predictor", "experiment", "runtime"}
# Options the schema types fully (free text and names are checked where they are used).
TYPED = [o for o in OPTIONS if o.kind != "str" and not o.key.startswith("validate.")]
BY_KEY = {o.key: o for o in OPTIONS}
SIZES = ("cache.fraction", "cache.experts", "cache.bytes", "cache.mib")
# Overrides that would record something other than what runs, or add a key nothing reads.
LIES = [("trace.path", "/x.parquet"), ("trace.name", "mine"), ("policy.name", "belady"),
        ("policy.eviction", "belady"), ("hw.name", "a100_sxm4"), ("+foo", 1),
        ("+cache.colour", "red"), ("policy.prefetch", "next_layer_all")]

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(-2**62, 2**62),
    st.integers(-3, 12).map(float), st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0), st.sampled_from([c for o in OPTIONS for c in o.choices]),
    st.text(max_size=4),
)


def in_range(opt: Opt) -> st.SearchStrategy[Any]:
    """Values the option takes (ints also as whole floats), so half the examples run."""
    if opt.kind == "bool":
        return st.booleans()
    if opt.kind == "choice":
        return st.sampled_from(opt.choices)
    lo = 0.0 if opt.lo is None else opt.lo
    hi = min(opt.hi if opt.hi is not None else 1e6, INT_MAX)
    if opt.kind == "int":
        ints = st.integers(int(lo) + int(opt.lo_open), int(hi))
        return st.one_of(ints, ints.map(float))
    return st.floats(lo, hi, exclude_min=opt.lo_open)


def valid(opt: Opt, v: Any) -> bool:
    """The schema's contract, written out independently of experiments/schema.py."""
    if v is None:
        return opt.nullable
    if opt.kind == "bool":
        return isinstance(v, bool)
    if opt.kind == "choice":
        return str(v) in opt.choices
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if opt.kind == "int" and not float(v).is_integer():
        return False
    lo_ok = opt.lo is None or (v > opt.lo if opt.lo_open else v >= opt.lo)
    hi = opt.hi if opt.hi is not None else math.inf
    return lo_ok and v <= hi and not (opt.kind == "int" and v > INT_MAX)


def _apply(cfg: Any, key: str, value: Any) -> None:
    OmegaConf.update(cfg, key.lstrip("+"), value, merge=False, force_add=True)


FUZZ = settings(max_examples=500, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def option_changes(draw: st.DrawFn) -> list[tuple[Opt, Any]]:
    out = []
    for opt in draw(st.lists(st.sampled_from(TYPED), max_size=4)):
        valid_value = draw(st.integers(0, 3)) > 0  # three in four in range
        out.append((opt, draw(in_range(opt) if valid_value else VALUES)))
        if opt.key in SIZES and draw(st.booleans()):  # the one size given: the others null
            out += [(BY_KEY[k], None) for k in SIZES if k != opt.key and k in BY_KEY]
    return out


@FUZZ
@given(changes=option_changes(),
       lies=st.integers(0, 3).flatmap(lambda n: st.lists(st.sampled_from(LIES), min_size=n == 0,
                                                         max_size=n == 0)))
def test_every_override_is_refused_in_one_line_or_recorded_as_given(changes, lies) -> None:
    cfg = OmegaConf.create(_BASE)
    given_: dict[str, Any] = {}
    for opt, value in changes:
        _apply(cfg, opt.key, value)
        given_[opt.key] = value
    for key, value in lies:
        _apply(cfg, key, value)
    texts = [f"{o.key}={v}" for o, v in changes] + [f"{k}={v}" for k, v in lies]
    errors = check_overrides(texts, GROUPS) + check(cfg)
    assert all("\n" not in e for e in errors), errors
    heads = {e.split(":")[0].split("=")[0].split(",")[0] for e in errors}
    named = {k.split("=")[0] for k in texts} | {"cache size", "policy.name", "trace.path"}
    assert heads <= named, (heads, texts)
    bad = {k for k, v in given_.items() if not valid(BY_KEY[k], v)}
    assert bad <= heads, (bad, errors)  # every bad value is named
    sizes = [k for k in SIZES if OmegaConf.select(cfg, k) is not None]
    event("refused" if (lies or bad or len(sizes) != 1) else "accepted")
    if lies or bad or len(sizes) != 1:
        assert errors, (texts, sizes)
        return
    assert errors == []
    row = sim_app.flat_config(cfg)
    for key, value in given_.items():  # what was given is what runs and what is recorded
        opt, got = BY_KEY[key], OmegaConf.select(cfg, key)
        want = None if value is None else {"int": int, "float": float, "bool": bool,
                                           "choice": str}[opt.kind](value)
        assert got == want and type(got) is type(want), (key, value, got)
        assert row[key] == want and type(row[key]) is type(want), (key, row[key])


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moesim.traces.collect.embedded import embedded_routing
    from moesim.traces.store import read_meta

    meta = read_meta(embedded_routing())
    tr = random_trace(num_requests=3, tokens=5, layers=meta.num_moe_layers,
                      experts=meta.num_experts, top_k=meta.top_k, seed=4)
    path = tmp_path_factory.mktemp("fuzzrun") / "t.parquet"
    write_trace(path, meta, tr.requests)
    return path


@pytest.fixture(scope="module")
def run_base(trace_path: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["trace=file", f"trace.path={trace_path}",
                                            "progress=false", "engine=python"])


RUN_CHANGES = st.fixed_dictionaries({}, optional={
    "batch": st.one_of(st.integers(1, 6), st.integers(1, 6).map(float)),
    "max_requests": st.one_of(st.none(), st.integers(1, 5), st.integers(1, 5).map(float)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 7)),
    "seed": st.one_of(st.integers(0, 2**31 - 1), st.integers(0, 9).map(float)),
    "warmup_tokens": st.integers(0, 6), "prefill_chunk": st.integers(0, 6),
    "replay": st.sampled_from(["decode", "prefill"]),
    "mode": st.sampled_from(["timed", "zero_latency"]),
})


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=RUN_CHANGES)
def test_accepted_overrides_run_and_record_what_ran(changes: dict, run_base) -> None:
    cfg = copy.deepcopy(run_base)
    for key, value in changes.items():
        _apply(cfg, key, value)
    assert check(cfg) == []
    try:
        _, row = sim_app.run(cfg)
    except sim_app.USER_ERRORS as exc:  # e.g. a warm-up longer than every request
        assert "\n" not in str(exc)
        return
    requests = min(int(changes.get("max_requests") or 3), 3)
    tokens = min(int(changes.get("max_tokens") or 5), 5)
    assert row["trace.requests"] == requests and row["trace.tokens"] == requests * tokens
    assert row["batch"] == min(int(changes.get("batch", 1)), requests)
    if row["batch"] != int(changes.get("batch", 1)):
        assert row["batch_requested"] == int(changes["batch"])
    if changes.get("max_requests") is not None:
        assert row["max_requests"] == requests
    if changes.get("max_tokens") is not None:
        assert row["max_tokens"] == tokens
    for key in ("seed", "warmup_tokens", "prefill_chunk", "replay", "mode"):
        if key in changes:
            want = changes[key] if isinstance(changes[key], str) else int(changes[key])
            assert row[key] == want and type(row[key]) is type(want), key
