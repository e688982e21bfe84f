"""The host_cpu profile section: validation, the roofline closed form, measured tables, bits."""

from __future__ import annotations

import copy
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.hw_profiles import (
    HostCpuModel,
    ProfileError,
    load_profile,
    profile_from_mapping,
    profile_path,
)
from moesim.hw_profiles.schema import load_yaml
from moesim.traces.model_card import load_card

CARD = load_card("deepseek_v2_lite")  # bfloat16, 3 x 2048 x 1408 weights per expert
SCALED = CARD.scaled(0.125, "float32")


def _section() -> dict[str, Any]:
    def q(value: Any, unit: str | None = None) -> dict[str, Any]:
        node: dict[str, Any] = {"value": value, "kind": "estimate", "source": "test figure"}
        if unit:
            node["unit"] = unit
        return node

    return {
        "cpu": "Test CPU",
        "cores": q(16),
        "parallel": q(1),
        "memory_bandwidth_Bps": q(100, "GB/s"),
        "memory_efficiency": q(0.5),
        "flops": q(2, "TFLOPS"),
        "flops_efficiency": q(0.5),
        "per_expert_overhead_s": q(20, "us"),
        "measured": {
            "deepseek_v2_lite": {
                "measured_at": {"hidden_size": SCALED.hidden_size,
                                "moe_intermediate_size": SCALED.moe_intermediate_size,
                                "dtype": "float32"},
                "expert_s": {"value": [[1, 0.1], [4, 0.2], [16, 0.5]], "unit": "ms",
                             "kind": "measured", "source": "test table"},
            },
        },
    }


def _data(section: dict[str, Any] | None = None) -> dict[str, Any]:
    path = profile_path("v100_pcie")
    data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    data["host_cpu"] = section if section is not None else _section()
    return data


def _load(tmp_path: Path, data: dict[str, Any]) -> Any:
    path = tmp_path / "v100_pcie.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_profile(path)


def test_section_parses_into_the_profile(tmp_path: Path) -> None:
    prof = _load(tmp_path, _data())
    hc = prof.host_cpu
    assert hc is not None and hc.cpu == "Test CPU" and hc.profile == "v100_pcie"
    assert hc.effective_memory_bandwidth_Bps == pytest.approx(50e9)
    assert hc.effective_flops == pytest.approx(1e12)
    assert {q.field for q in prof.quantities()} >= {"host_cpu.cores",
                                                    "host_cpu.measured.deepseek_v2_lite.expert_s"}
    model = prof.host_cpu_model(CARD)
    assert isinstance(model, HostCpuModel) and model.parallel == 1
    assert "v100_pcie host_cpu (Test CPU" in model.source and "\n" not in model.source


def test_a_profile_without_the_section_says_so() -> None:
    prof = profile_from_mapping({k: v for k, v in _data().items() if k != "host_cpu"})
    assert prof.host_cpu is None
    with pytest.raises(ProfileError, match="no host_cpu section"):
        prof.host_cpu_model(CARD)


def _drop(key: str) -> dict[str, Any]:
    s = _section()
    del s[key]
    return s


def _with(path: str, value: Any) -> dict[str, Any]:
    s = _section()
    node: Any = s
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return s


BAD = [
    (_drop("cores"), ["host_cpu.cores", "is required"]),
    (_drop("cpu"), ["host_cpu.cpu", "is required"]),
    (_drop("per_expert_overhead_s"), ["host_cpu.per_expert_overhead_s", "is required"]),
    (_with("memory_bandwidth_Bps.value", -5), ["host_cpu.memory_bandwidth_Bps.value",
                                               "must be > 0", "-5"]),
    (_with("per_expert_overhead_s.value", -1), ["host_cpu.per_expert_overhead_s.value",
                                                "must be >= 0"]),
    (_with("flops.unit", "GB/s"), ["host_cpu.flops.unit", "unit must be one of", "'GB/s'"]),
    (_with("memory_efficiency.value", 1.5), ["host_cpu.memory_efficiency.value", "(0, 1]"]),
    (_with("parallel.value", 32), ["host_cpu.parallel.value", "cannot exceed cores (16)"]),
    (_with("cores.value", 2.5), ["host_cpu.cores.value", "whole number"]),
    (_with("flops.source", ""), ["host_cpu.flops.source", "non-empty 'source'"]),
    (_with("memory_bandwidth_Bps.value", None), ["host_cpu.memory_bandwidth_Bps",
                                                 "spec or a measured host memory bandwidth"]),
    (_with("flops.value", None), ["host_cpu.flops", "spec or a measured host FLOP/s"]),
    (_with("sockets", 2), ["host_cpu", "unknown key(s) ['sockets']"]),
    (_with("measured.deepseek_v2_lite.attention_s", 1.0),
     ["host_cpu.measured.deepseek_v2_lite", "unknown key(s) ['attention_s']"]),
    (_with("measured.deepseek_v2_lite.expert_s", None),
     ["host_cpu.measured.deepseek_v2_lite.expert_s", "is required"]),
    (_with("measured.deepseek_v2_lite.expert_s.value", [[4, 0.2], [1, 0.1]]),
     ["host_cpu.measured.deepseek_v2_lite.expert_s.value.1", "strictly ascending"]),
]


@pytest.mark.parametrize(("section", "needles"), BAD)
def test_bad_sections_name_file_and_field(tmp_path: Path, section: dict[str, Any],
                                          needles: list[str]) -> None:
    with pytest.raises(ProfileError) as info:
        _load(tmp_path, _data(section))
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "v100_pcie.yaml") in msg
    for needle in needles:
        assert needle in msg, msg


# --------------------------------------------------------------------------------------------
# The time model


def _model(**kw: Any) -> HostCpuModel:
    args: dict[str, Any] = {"card": CARD, "memory_bandwidth_Bps": 50e9, "flops": 1e12,
                            "overhead_s": 20e-6}
    args.update(kw)
    return HostCpuModel(**args)


def test_roofline_closed_form_memory_then_compute_bound() -> None:
    m = _model()
    params = 3 * 2048 * 1408
    nbytes = params * 2  # bfloat16
    assert m.weight_bytes() == nbytes
    # small token counts read every weight once: memory-bound, flat in tokens
    assert m.expert_time(1) == pytest.approx(20e-6 + nbytes / 50e9)
    assert m.expert_time(8) == pytest.approx(m.expert_time(1))
    # the ridge: 2 T params / F = bytes / B  =>  T = dtype_bytes x F / (2 B) = 20 tokens
    assert m.expert_time(20) == pytest.approx(m.expert_time(1))
    assert m.expert_time(21) > m.expert_time(20)
    # large token counts: compute-bound, linear in tokens
    assert m.expert_time(512) == pytest.approx(20e-6 + 2 * 512 * params / 1e12)
    assert m.expert_time(0) == 0.0 and m.expert_time(-3) == 0.0
    assert m.activation_bytes(4) == 4 * 2048 * 2


def test_parallel_executions_share_the_cpu() -> None:
    one, four = _model(), _model(parallel=4)
    for tokens in (1, 64, 1024):
        assert four.roofline(tokens) == pytest.approx(4 * one.roofline(tokens))
        assert four.expert_time(tokens) - 20e-6 == pytest.approx(
            4 * (one.expert_time(tokens) - 20e-6))


def test_bits_scale_the_bytes_not_the_arithmetic() -> None:
    m = _model()
    full = m.expert_time(1) - 20e-6
    assert m.expert_time(1, bits=8) - 20e-6 == pytest.approx(full / 2)
    assert m.expert_time(1, bits=4) - 20e-6 == pytest.approx(full / 4)
    assert m.expert_time(1, bits=16) == pytest.approx(m.expert_time(1))
    assert m.expert_time(4096, bits=4) == pytest.approx(m.expert_time(4096))  # compute-bound
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="bits must be"):
            m.expert_time(1, bits=bad)  # type: ignore[arg-type]


def test_measured_table_applies_only_to_the_matching_card(tmp_path: Path) -> None:
    prof = _load(tmp_path, _data())
    scaled = prof.host_cpu_model(SCALED)
    assert scaled.measured is not None and "measured table" in scaled.source
    assert scaled.expert_time(1) == pytest.approx(0.1e-3)
    assert scaled.expert_time(2) == pytest.approx(0.1e-3 + (0.2e-3 - 0.1e-3) / 3)
    assert scaled.expert_time(16) == pytest.approx(0.5e-3)
    # beyond the table: the last point plus the roofline's growth
    growth = scaled.roofline(64) - scaled.roofline(16)
    assert scaled.expert_time(64) == pytest.approx(0.5e-3 + growth)
    # the full-size card and a card of another dtype get the roofline, and the source says why
    full = prof.host_cpu_model(CARD)
    assert full.measured is None and "hidden_size 256 vs the card's 2048" in full.source
    assert full.expert_time(1) == pytest.approx(20e-6 + CARD.expert_bytes / 50e9)
    bf16 = prof.host_cpu_model(CARD.scaled(0.125))
    assert bf16.measured is None and "dtype float32 vs the card's bfloat16" in bf16.source
    other = prof.host_cpu_model(load_card("qwen3_30b_a3b"))
    assert other.measured is None and "table" not in other.source


def test_parallel_executions_share_a_measured_table_too(tmp_path: Path) -> None:
    """The table is one execution with the whole host: with ``parallel`` 2 each of two at once
    takes twice the part above the overhead, inside the table and beyond it (the table used
    to be read as is, so two lanes doubled the host's throughput)."""
    data = _data()
    one = _load(tmp_path, data).host_cpu_model(SCALED)
    data["host_cpu"]["parallel"]["value"] = 2
    two = _load(tmp_path, data).host_cpu_model(SCALED)
    assert one.measured is not None and two.measured is not None
    for tokens in (1, 2, 16, 64):
        assert two.expert_time(tokens) - 20e-6 == pytest.approx(
            2 * (one.expert_time(tokens) - 20e-6))


def test_measured_table_scales_with_bits_above_the_overhead(tmp_path: Path) -> None:
    scaled = _load(tmp_path, _data()).host_cpu_model(SCALED)
    for tokens in (1, 4, 16):
        ratio = scaled.roofline(tokens, 8) / scaled.roofline(tokens)
        assert scaled.expert_time(tokens, bits=8) == pytest.approx(
            20e-6 + (scaled.expert_time(tokens) - 20e-6) * ratio)
    assert scaled.expert_time(1, bits=32) == pytest.approx(scaled.expert_time(1))


@settings(max_examples=60, deadline=None)
@given(bw=st.floats(1e9, 1e12), flops=st.floats(1e10, 1e14), overhead=st.floats(0, 1e-3),
       parallel=st.integers(1, 8), bits=st.sampled_from([None, 2, 4, 8, 16]),
       tokens=st.lists(st.integers(1, 4096), min_size=2, max_size=6))
def test_time_is_at_least_the_overhead_and_never_falls_with_tokens(
        bw: float, flops: float, overhead: float, parallel: int, bits: int | None,
        tokens: list[int]) -> None:
    m = _model(memory_bandwidth_Bps=bw, flops=flops, overhead_s=overhead, parallel=parallel)
    times = [m.expert_time(t, bits) for t in sorted(tokens)]
    assert all(t >= overhead + m.roofline(1, bits) * (1 - 1e-12) for t in times)
    assert all(b >= a * (1 - 1e-12) for a, b in pairwise(times))
    if bits is not None and bits < 16:
        assert m.expert_time(tokens[0], bits) <= m.expert_time(tokens[0]) * (1 + 1e-12)


def test_hydra_style_overrides_are_accepted() -> None:
    data = copy.deepcopy(_data())
    data["host_cpu"]["parallel"] = 2  # what hw.host_cpu.parallel=2 produces
    hc = profile_from_mapping(data).host_cpu
    assert hc is not None and hc.parallel.value == 2 and hc.parallel.kind == "override"


def test_host_cpu_table_lists_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    from moesim.hw_profiles import list_profiles
    from moesim.hw_profiles.measure import main
    from moesim.hw_profiles.report import host_cpu_rows

    assert main(["table", "--host-cpu", "--card", "deepseek_v2_lite"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(list_profiles())
    row = next(line for line in lines if line.startswith("| `a100_sxm4`"))
    assert "2x AMD EPYC 7742" in row and "409.6 × 0.23 = 94.2 GB/s" in row
    # the expert columns are the model's own times and the expert link's copy time
    prof = load_profile("a100_sxm4")
    cells = host_cpu_rows(prof, CARD)
    cpu_ms = [float(x) for x in cells[6].split(" / ")]
    model = prof.host_cpu_model(CARD)
    assert cpu_ms[0] == pytest.approx(model.expert_time(1) * 1e3, rel=1e-2)
    assert float(cells[7]) == pytest.approx(
        prof.expert_link().transfer_time(CARD.expert_bytes) * 1e3, rel=1e-2)
    no_cpu = profile_from_mapping({k: v for k, v in _data().items() if k != "host_cpu"})
    assert host_cpu_rows(no_cpu, CARD)[1] == "none"
