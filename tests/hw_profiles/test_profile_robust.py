"""Issue 25: a broken profile YAML is one error naming the file and stops only the runs that
choose it (one in hw_profiles/ broke every command, ``--help`` included); implausible values (a
1e-30 GB/s link, a 1e-30 GiB GPU) are refused with the field named; and fuzzed profile text
and values are either a profile or one ProfileError, never another exception."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim import hw_profiles
from moesim.experiments import configs
from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.inputs import hw_profile
from moesim.hw_profiles import ProfileError, load_profile, profile_from_mapping
from moesim.traces.model_card import load_card

register_configs()
V100 = hw_profiles.profile_path("v100_pcie")
V100_TEXT = V100.read_text(encoding="utf-8")
V100_NODE = yaml.safe_load(V100_TEXT)

BROKEN = {
    "t25_syntax": "name: t25_syntax\ngpu: {memory_bytes: [1, 2\n",
    "t25_list": "- 1\n- 2\n",
    "t25_scalar": "just text\n",
    "t25_empty": "",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_profile_fails_only_the_runs_that_choose_it(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BROKEN[name])
    real = hw_profiles.profile_path
    monkeypatch.setattr(configs.hw_profiles, "profile_path",
                        lambda n: path if n == name else real(n))
    from hydra.core.config_store import ConfigStore

    configs._store_profile(ConfigStore.instance(), name)  # no exception: --help still works
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        chosen = compose("config", overrides=[f"hw={name}"])
        other = compose("config", overrides=["hw=a100_sxm4"])
    with pytest.raises(ProfileError) as err:
        hw_profile(chosen)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert hw_profile(other).name == "a100_sxm4"
    with pytest.raises(ProfileError, match=re.escape(str(path))):
        load_profile(path)


def _with(node: dict, dotted: str, value: object) -> dict:
    out = copy.deepcopy(node)
    *parents, leaf = dotted.split(".")
    target = out
    for p in parents:
        target = target.get(p) if isinstance(target, dict) else None
    if isinstance(target, dict):  # a parent replaced by an earlier change: nothing to set
        target[leaf] = value
    return out


@pytest.mark.parametrize(("field", "value", "why"), [
    ("host_link.pinned.peak_bandwidth_Bps", {"value": 1e-30, "unit": "GB/s", "kind": "spec",
                                             "source": "t"}, "outside the plausible 0.01 to "
                                                             "10,000 GB/s"),
    ("host_link.pinned.peak_bandwidth_Bps", 1e-21, "outside the plausible 0.01 to 10,000 GB/s"),
    ("host_link.pinned.curve", {"value": [[1000, 1e-30], [2000, 2e-30]], "unit": "GB/s",
                                "kind": "measured", "source": "t"}, "outside the plausible"),
    ("gpu.memory_bytes", {"value": 1e-30, "unit": "GiB", "kind": "spec", "source": "t"},
     "below the plausible 1 GiB"),
    ("gpu.fp16_flops", {"value": 1e-30, "unit": "TFLOPS", "kind": "spec", "source": "t"},
     "outside the plausible 1 GFLOP/s"),
    ("host_link.pinned.latency_s", {"value": 1e6, "unit": "s", "kind": "spec", "source": "t"},
     "outside the plausible 0 to 10 s"),
])
def test_implausible_values_are_refused_with_the_field(field: str, value: object,
                                                       why: str) -> None:
    with pytest.raises(ProfileError, match=re.escape(why)) as err:
        profile_from_mapping(_with(V100_NODE, field, value), "v100_pcie")
    assert f"'{field}" in str(err.value)


def test_every_shipped_profile_is_plausible() -> None:
    for name in hw_profiles.list_profiles():
        load_profile(name)


FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
CARD = load_card("deepseek_v2_lite")


def _use(profile: hw_profiles.HwProfile) -> None:
    """What a run asks of a profile: its expert link's time and the compute model's."""
    profile.expert_link().transfer_time(CARD.expert_bytes)
    profile.compute_model(CARD)


@FUZZ
@given(data=st.data())
def test_fuzzed_profile_text_is_a_profile_or_one_error(data: st.DataObject,
                                                       tmp_path: Path) -> None:
    text = V100_TEXT
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 40))
        ins = data.draw(st.sampled_from(["", ":", "- ", "{", "]", "\t", "'", "&a ", "*a",
                                         "!!python/object ", "\n  x: 1", "1e-300", "-5", "null",
                                         "\x00", "é"]))
        text = text[:at] + ins + text[at + cut:]
    path = tmp_path / "v100_pcie.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        _use(load_profile(path))
    except ProfileError as exc:
        assert str(path) in str(exc)


LEAVES = ["gpu.memory_bytes", "gpu.memory_bandwidth_Bps", "gpu.fp16_flops",
          "host_link.copy_engines", "host_link.pinned.peak_bandwidth_Bps",
          "host_link.pinned.latency_s", "host_link.pinned.curve", "host_link.host_memory",
          "compute.memory_efficiency", "compute.flops_efficiency", "storage.peak_bandwidth_Bps",
          "host_cpu.cores", "unified_memory", "name", "gpu"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.lists(st.floats(-1e15, 1e15), max_size=3), max_size=3),
    st.fixed_dictionaries({"value": st.floats(allow_nan=True), "kind": st.sampled_from(
        ["spec", "measured", "bogus", None]), "source": st.sampled_from(["s", ""])},
        optional={"unit": st.sampled_from(["GB/s", "GiB", "TFLOPS", "us", "1", "furlong"])}),
)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(LEAVES), VALUES), min_size=1, max_size=3))
def test_fuzzed_profile_values_are_a_profile_or_one_error(changes: list) -> None:
    node = V100_NODE
    for field, value in changes:
        node = _with(node, field, value)
    try:
        _use(profile_from_mapping(node, "v100_pcie"))
    except ProfileError as exc:
        assert "\n" not in str(exc).strip()
