"""Compute model: roofline fallback, measured-table overrides, and sane shapes in batch/context."""

from __future__ import annotations

import copy

import pytest

from moesim.hw_profiles import (
    ComputeModel,
    list_profiles,
    load_profile,
    profile_from_mapping,
    profile_path,
)
from moesim.hw_profiles.schema import load_yaml
from moesim.traces.model_card import ModelCard, load_card

MS = 1e-3


def _mixtral() -> ModelCard:
    # notes §1 (S15): H 4096, I_e 14336, 8 experts, top-2, 32 MoE layers; heads left unknown
    return ModelCard(name="mixtral_8x7b", hf_id="", hidden_size=4096, moe_intermediate_size=14336,
                     num_experts=8, top_k=2, num_layers=32, moe_layers=tuple(range(32)))


def _switch() -> ModelCard:
    # notes §1 (S19): d_model 768, d_ff 3072, ReLU (2 matrices), 128 experts, top-1, fp32
    return ModelCard(name="switch_base_128", hf_id="", hidden_size=768, moe_intermediate_size=3072,
                     num_experts=128, top_k=1, num_layers=24, moe_layers=tuple(range(1, 24, 2)),
                     dense_intermediate_size=3072, num_attention_heads=12, head_dim=64,
                     dtype="float32", gated=False)


CARDS = [load_card("deepseek_v2_lite"), _mixtral(), _switch()]


def test_measured_table_reproduces_s30_on_a100_pcie() -> None:
    card = load_card("deepseek_v2_lite")
    cm = load_profile("a100_pcie").compute_model(card)
    assert cm.attention_time(1, 0) == pytest.approx((0.075 + 0.739 + 0.080) * MS)
    assert cm.router_time(1) == pytest.approx(0.102 * MS)
    layer = card.top_k * cm.expert_time(1) + cm.shared_time(1)
    assert layer == pytest.approx(6.8 * MS)
    cal = cm.calibration()
    assert cal["expert"].startswith("measured") and cal["dense_layer"] == "roofline"


def test_roofline_is_far_below_the_measured_expert_compute() -> None:
    # The calibration caveat of the docs, as numbers: S30's 6.8 ms vs a bytes/bandwidth roofline.
    card = load_card("deepseek_v2_lite")
    prof = load_profile("a100_pcie")
    cm = prof.compute_model(card)
    roof_layer = card.top_k * cm.roofline_expert(1) + cm.roofline_shared(1)
    assert roof_layer == pytest.approx(138.4e6 / 1727e9, rel=0.01)
    assert 6.8 * MS / roof_layer > 40


def test_roofline_fallback_uses_spec_times_efficiency() -> None:
    card = load_card("deepseek_v2_lite")
    cm = load_profile("v100_pcie").compute_model(card)
    assert cm.calibration() == dict.fromkeys(cm.calibration(), "roofline")
    assert cm.expert_time(1) == pytest.approx(card.expert_bytes / (900e9 * 0.85))
    # compute-bound at large token counts: 2 * tokens * params / (113 TFLOPS * 0.79)
    big = 100_000
    assert cm.expert_time(big) == pytest.approx(2 * big * card.expert_params / (113e12 * 0.79))


@pytest.mark.parametrize("profile", list_profiles())
@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_times_are_positive_and_monotone(profile: str, card: ModelCard) -> None:
    cm = load_profile(profile).compute_model(card)
    assert isinstance(cm, ComputeModel)
    batches = [1, 2, 4, 8, 16, 64, 256, 4096]
    contexts = [0, 128, 1024, 8192, 65536]
    for fn in (cm.router_time, cm.expert_time):
        times = [fn(b) for b in batches]
        assert all(t > 0 for t in times)
        assert times == sorted(times)
    for b in (1, 16):
        att = [cm.attention_time(b, c) for c in contexts]
        assert att == sorted(att) and att[0] > 0
        dense = [cm.dense_layer_time(b, c) for c in contexts]
        assert dense == sorted(dense)
        assert all(d >= a for d, a in zip(dense, att, strict=True))
    for zero in (0, -1):
        assert cm.expert_time(zero) == cm.router_time(zero) == 0.0
        assert cm.attention_time(zero, 100) == cm.dense_layer_time(zero, 100) == 0.0
    if card.shared_intermediate_size == 0:
        assert cm.shared_time(8) == 0.0


def _with_table(table: dict) -> ComputeModel:
    path = profile_path("v100_pcie")
    data = copy.deepcopy(load_yaml(path.read_text(encoding="utf-8"), str(path)))
    data["compute"]["measured"] = {"deepseek_v2_lite": table}
    return profile_from_mapping(data, "v100_pcie").compute_model(load_card("deepseek_v2_lite"))


def test_measured_lists_interpolate_then_grow_with_the_roofline() -> None:
    src = {"kind": "measured", "source": "test"}
    cm = _with_table({
        "expert_s": {"value": [[1, 1.0], [8, 2.0]], "unit": "ms", **src},
        "attention_s": {"value": [[1024, 0.5], [4096, 0.8]], "unit": "ms", **src},
    })
    assert cm.expert_time(1) == pytest.approx(1.0 * MS)
    assert cm.expert_time(4) == pytest.approx((1.0 + 3 / 7) * MS)
    assert cm.expert_time(8) == pytest.approx(2.0 * MS)
    big = 10**6
    growth = cm.roofline_expert(big) - cm.roofline_expert(8)
    assert cm.expert_time(big) == pytest.approx(2.0 * MS + growth)
    assert cm.attention_time(1, 512) == pytest.approx(0.5 * MS)  # clamped below
    assert cm.attention_time(1, 2048) == pytest.approx((0.5 + 0.1) * MS)
    # batch growth beyond the measured batch 1 comes from the roofline
    growth_b = cm.roofline_attention(32, 2048) - cm.roofline_attention(1, 2048)
    assert cm.attention_time(32, 2048) == pytest.approx(0.6 * MS + growth_b)
    # no shared measurement: shared falls back to the roofline
    assert cm.shared_time(1) == pytest.approx(cm.roofline_shared(1))


def test_dense_layer_carries_the_per_mlp_overhead_of_a_measured_expert() -> None:
    cm = load_profile("a100_pcie").compute_model(load_card("deepseek_v2_lite"))
    overhead = cm.mlp_overhead()
    assert overhead == pytest.approx(cm.expert_time(1) - cm.roofline_expert(1))
    expected = cm.attention_time(1, 512) + overhead + cm.roofline_dense_ffn(1)
    assert cm.dense_layer_time(1, 512) == pytest.approx(expected)
    cm2 = _with_table({"dense_layer_s": {"value": 3.0, "unit": "ms", "kind": "measured",
                                         "source": "test"}})
    assert cm2.dense_layer_time(1, 0) == pytest.approx(3.0 * MS)
    assert cm2.dense_layer_time(1, 8192) > 3.0 * MS


def test_unmeasured_card_on_a_measured_profile_uses_the_roofline() -> None:
    cm = load_profile("a100_pcie").compute_model(_mixtral())
    assert set(cm.calibration().values()) == {"roofline"}
