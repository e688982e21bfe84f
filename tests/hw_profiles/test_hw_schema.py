"""Validation: bad profiles fail on load with a message naming file, field and value."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from moesim.hw_profiles import ProfileError, load_profile, profile_from_mapping, profile_path
from moesim.hw_profiles.schema import load_yaml


def _base() -> dict[str, Any]:
    path = profile_path("v100_pcie")
    return load_yaml(path.read_text(encoding="utf-8"), str(path))


def _write(tmp_path: Path, data: dict[str, Any], stem: str = "v100_pcie") -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = d
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()

CASES: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("missing source", _set("gpu.memory_bandwidth_Bps.source", _DELETE),
     ["gpu.memory_bandwidth_Bps.source", "non-empty 'source'"]),
    ("blank source", _set("host_link.copy_engines.source", "  "),
     ["host_link.copy_engines.source", "'  '"]),
    ("negative bandwidth", _set("host_link.pinned.peak_bandwidth_Bps.value", -12.4),
     ["host_link.pinned.peak_bandwidth_Bps.value", "must be > 0", "-12.4"]),
    ("zero memory", _set("gpu.memory_bytes.value", 0),
     ["gpu.memory_bytes.value", "must be > 0"]),
    ("negative latency", _set("host_link.pinned.latency_s.value", -1),
     ["host_link.pinned.latency_s.value", "must be >= 0", "-1"]),
    ("curve sizes not ascending", _set("host_link.pinned.curve.value.3", [3000, 2.5]),
     ["host_link.pinned.curve.value.3", "strictly ascending", "[3000, 2.5]"]),
    ("curve time falls", _set("host_link.pinned.curve.value.1", [2000, 5.0]),
     ["host_link.pinned.curve.value.1", "bigger copy would finish sooner"]),
    ("curve point not a pair", _set("host_link.pinned.curve.value.0", [1000]),
     ["host_link.pinned.curve.value.0", "pair"]),
    ("unknown kind", _set("gpu.fp16_flops.kind", "guess"),
     ["gpu.fp16_flops.kind", "measured", "'guess'"]),
    ("missing kind", _set("gpu.fp16_flops.kind", _DELETE), ["gpu.fp16_flops.kind"]),
    ("string number", _set("gpu.memory_bandwidth_Bps.value", "900 GB/s"),
     ["gpu.memory_bandwidth_Bps.value", "expected a number", "'900 GB/s'"]),
    ("bool number", _set("gpu.memory_bandwidth_Bps.value", True),
     ["gpu.memory_bandwidth_Bps.value", "expected a number"]),
    ("fractional copy engines", _set("host_link.copy_engines.value", 1.5),
     ["host_link.copy_engines.value", "whole number", "1.5"]),
    ("bad unit", _set("host_link.pinned.latency_s.unit", "GB/s"),
     ["host_link.pinned.latency_s.unit", "unit must be one of", "'GB/s'"]),
    ("efficiency > 1", _set("compute.memory_efficiency.value", 1.5),
     ["compute.memory_efficiency.value", "(0, 1]"]),
    ("unified not bool", _set("unified_memory", "yes"), ["unified_memory", "true or false"]),
    ("gpu not mapping", _set("gpu", [1, 2]), ["'gpu'", "expected a mapping"]),
    ("typo key", _set("host_link.pinnned", {}), ["host_link", "unknown key", "pinnned"]),
    ("top-level typo", _set("hostlink", {}), ["unknown key", "hostlink"]),
    ("bare number in a file", _set("host_link.copy_engines", 2),
     ["host_link.copy_engines", "bare numbers are only accepted as command-line overrides"]),
    ("required null", _set("host_link.copy_engines.value", None),
     ["host_link.copy_engines.value", "may not be null"]),
    ("host_memory", _set("host_link.host_memory", "cached"),
     ["host_link.host_memory", "'cached'"]),
    ("no host link", _set("host_link", _DELETE), ["host_link", "required unless unified_memory"]),
    ("unified with host link", _set("unified_memory", True),
     ["host_link", "unified_memory devices have no PCIe copy"]),
    ("no gpu bandwidth", _set("gpu.memory_bandwidth_Bps.value", None),
     ["gpu.memory_bandwidth_Bps", "spec or a measured memory bandwidth"]),
    ("name mismatch", _set("name", "a100_pcie"), ["name", "does not match the file name"]),
    ("measured table bad field", _set("compute.measured", {"deepseek_v2_lite": {"expert": 1}}),
     ["compute.measured.deepseek_v2_lite", "unknown key", "expert"]),
    ("measured list not ascending",
     _set("compute.measured", {"deepseek_v2_lite": {"expert_s": {
         "value": [[4, 0.001], [2, 0.002]], "kind": "measured", "source": "S0"}}}),
     ["compute.measured.deepseek_v2_lite.expert_s.value.1", "strictly ascending"]),
    ("experts_layer_s as a list",
     _set("compute.measured", {"deepseek_v2_lite": {"experts_layer_s": {
         "value": [[1, 0.001], [2, 0.002]], "kind": "measured", "source": "S0"}}}),
     ["compute.measured.deepseek_v2_lite.experts_layer_s", "must be one number"]),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_profile_is_rejected_with_a_clear_message(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    data = _base()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_unified_profile_needs_storage(tmp_path: Path) -> None:
    data = _base()
    data["unified_memory"] = True
    del data["host_link"]
    del data["storage"]
    with pytest.raises(ProfileError, match=r"storage.*need a storage tier"):
        load_profile(_write(tmp_path, data))


def test_pageable_choice_needs_a_pageable_figure() -> None:
    data = _base()
    data["host_link"]["host_memory"] = "pageable"
    data["host_link"]["pageable"] = {"peak_bandwidth_Bps": {"value": None, "source": "not found"}}
    with pytest.raises(ProfileError, match=r"host_link\.host_memory"):
        profile_from_mapping(data, "x")


def test_anchors_and_tags_are_refused(tmp_path: Path) -> None:
    text = profile_path("v100_pcie").read_text(encoding="utf-8")
    anchored = text.replace("unified_memory: false", "unified_memory: &u false\nx: *u", 1)
    path = tmp_path / "v100_pcie.yaml"
    path.write_text(anchored, encoding="utf-8")
    with pytest.raises(ProfileError, match="anchors"):
        load_profile(path)
    path.write_text(text.replace("unified_memory: false", "unified_memory: !!bool false"),
                    encoding="utf-8")
    with pytest.raises(ProfileError, match="tags"):
        load_profile(path)


def test_invalid_yaml_and_unknown_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("gpu: [1, 2\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(path)
    with pytest.raises(ProfileError, match=r"known profiles: .*v100_pcie"):
        load_profile("no_such_gpu")
    with pytest.raises(ProfileError, match="top level"):
        profile_from_mapping([1, 2], "list")  # type: ignore[arg-type]


def test_exponent_floats_parse_like_omegaconf() -> None:
    # PyYAML alone reads 12.4e9 as a string; Hydra/OmegaConf read it as a float.
    assert load_yaml("x: 12.4e9\ny: 1e-6\nz: 2.6e-06", "t") == {"x": 12.4e9, "y": 1e-6, "z": 2.6e-6}


def test_bare_overrides_are_accepted_from_mappings_and_marked() -> None:
    data = _base()
    data["host_link"]["copy_engines"] = 2
    data["host_link"]["pinned"]["peak_bandwidth_Bps"] = 25e9
    prof = profile_from_mapping(copy.deepcopy(data), "v100_pcie")
    assert prof.host_link is not None
    assert prof.host_link.copy_engines.kind == "override"
    link = prof.expert_link()
    assert link.copy_engines == 2
    # the measured curve keeps its shape, the override sets its plateau
    assert link.bandwidth(10**9) == pytest.approx(25e9)
    assert link.bandwidth(100_000) == pytest.approx(9.2e9 * 25 / 12.4)
    with pytest.raises(ProfileError, match="bare numbers"):
        profile_from_mapping(data, "v100_pcie", allow_bare=False)


def test_units_convert_to_base_units() -> None:
    prof = load_profile("v100_pcie")
    assert prof.gpu_memory_bytes == 32 * 2**30
    assert prof.gpu.memory_bandwidth_Bps.value == pytest.approx(900e9)
    assert prof.gpu.fp16_flops.value == pytest.approx(113e12)
    assert prof.host_link is not None
    assert prof.host_link.per_copy_overhead_s.value == pytest.approx(2.6e-6)
