"""Model cards: shapes give the expert bytes of hw-and-models.md section 2 (never typed in)."""

from __future__ import annotations

import pytest
import yaml

from moesim.traces import list_cards, load_card
from moesim.traces.model_card import MODELS_DIR

# bytes per routed expert, section 2 of ../shared/notes/hw-and-models.md (bf16)
EXPERT_BYTES = {
    "deepseek_v2_lite": 17_301_504,
    "qwen3_30b_a3b": 9_437_184,
    "phi_mini_moe": 23_592_960,  # from the note's unverified I_e = 960 estimate
    "mixtral_8x7b": 352_321_536,
    "qwen15_moe_a27b": 17_301_504,
    "olmoe_1b_7b": 12_582_912,
    "switch_base_128": 9_437_184,
}
SHARED_BYTES = {"deepseek_v2_lite": 34_603_008, "qwen15_moe_a27b": 69_206_016}


def test_every_required_card_exists() -> None:
    assert set(EXPERT_BYTES) <= set(list_cards())


@pytest.mark.parametrize(("name", "nbytes"), sorted(EXPERT_BYTES.items()))
def test_expert_bytes_match_the_note(name: str, nbytes: int) -> None:
    card = load_card(name)
    assert card.expert_bytes == nbytes
    assert card.shared_bytes_per_layer == SHARED_BYTES.get(name, 0)
    assert card.sources, "every card names its sources"
    raw = yaml.safe_load((MODELS_DIR / f"{name}.yaml").read_text())
    assert "expert_bytes" not in raw  # derived, never typed in


def test_layer_layouts() -> None:
    assert load_card("deepseek_v2_lite").dense_layers == (0,)
    assert load_card("qwen3_30b_a3b").num_moe_layers == 48
    assert load_card("mixtral_8x7b").moe_layers == tuple(range(32))
    assert load_card("olmoe_1b_7b").num_moe_layers == 16
    assert load_card("qwen15_moe_a27b").num_shared_experts == 1
    sw = load_card("switch_base_128")
    # flat ids: encoder 0-11, decoder 12-23; HF marks block i sparse iff i % 2 == 1
    assert sw.num_layers == 24 and sw.moe_layers == tuple(range(1, 24, 2))
    assert sw.dense_layers == tuple(range(0, 24, 2))
    assert not sw.gated and sw.top_k == 1 and sw.num_experts == 128
    assert int(sw.expert_params * 4) == 18_874_368  # as stored (fp32)


def test_unverified_values_are_marked() -> None:
    phi = load_card("phi_mini_moe")
    assert {"moe_intermediate_size", "hidden_size", "num_experts"} <= set(phi.unverified)
    for name in ("qwen3_30b_a3b", "qwen15_moe_a27b", "switch_base_128"):
        assert load_card(name).unverified  # official config not read
    for name in ("mixtral_8x7b", "olmoe_1b_7b"):
        assert not load_card(name).unverified  # read from the official config.json
