"""Published entries with whole layers on the host CPU (llama.cpp ``-ngl``, Ollama ``num_gpu``):
placement ``cpu_layers`` with each entry's ``gpu_layers`` assumption."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from moesim.experiments.published.entries import load_entries
from moesim.experiments.published.predict import (
    PREDICTED_PLACEMENTS,
    RESERVE_GIB,
    UNMODELLED_PLACEMENTS,
    NotPredictable,
    gpu_layers_of,
    placement_of,
    prepare,
)
from moesim.hw_profiles.runtime import list_runtimes
from moesim.traces.model_card import load_card

IDS = {"mg_t9_llamacpp_dsv2l_b1", "mg_t9_llamacpp_dsv2l_b32", "mg_t9_llamacpp_mixtral_b1",
       "mg_t9_llamacpp_mixtral_b32", "mi_lat_ollama_mixtral", "mi_tput_ollama_mixtral"}


def _entries():
    return {e.id: e for e in load_entries(runtimes=list_runtimes())}


def test_cpu_layers_entries_are_predicted_with_their_gpu_layers() -> None:
    assert "cpu_layers" in PREDICTED_PLACEMENTS and "cpu_layers" not in UNMODELLED_PLACEMENTS
    entries = _entries()
    assert {e.id for e in entries.values() if e.placement == "cpu_layers"} == IDS
    for i in IDS:
        e = entries[i]
        n = gpu_layers_of(e)
        card = load_card(e.model)
        assert 0 < n < card.num_layers  # some layers on each side
        assert placement_of(e, card) == {"name": "cpu_layers", "gpu_layers": n}


def test_an_entry_without_gpu_layers_is_not_predictable() -> None:
    e = _entries()["mg_t9_llamacpp_mixtral_b1"]
    bare = replace(e, assumptions=tuple(a for a in e.assumptions if a.field != "gpu_layers"))
    with pytest.raises(NotPredictable, match="placement cpu_layers: the entry has no "
                                             "gpu_layers assumption"):
        prepare(bare)
    from moesim.experiments.published.entries import Assumption

    bad = replace(e, assumptions=(Assumption("gpu_layers", -2, "x"),))
    with pytest.raises(NotPredictable, match="gpu_layers assumption -2 is not a whole number"):
        prepare(bad)


def _fit(card, gib: float, tokens: int) -> int:
    """The most decoder layers, in order, whose weights and KV cache (``tokens`` tokens, the
    card's K and V widths in its dtype) fit ``gib`` beside the reserve: the reasoning of the
    MoE-Gen entries' assumption, worked from the card's dimensions independently of moesim's
    cost code."""
    h = card.hidden_size
    q = card.num_attention_heads * card.head_dim
    kv = (card.num_kv_heads or card.num_attention_heads) * card.head_dim
    attn = (2 * h * q + 2 * h * kv) * card.attention_weight_bytes
    moe = (attn + h * card.num_experts * card.attention_weight_bytes
           + card.num_experts * card.expert_bytes + card.shared_bytes_per_layer)
    dense = attn + 3 * h * card.dense_intermediate_size * card.attention_weight_bytes
    cache = tokens * 2 * kv * card.dtype_bytes
    room, n = (gib - RESERVE_GIB) * 2**30, 0
    for layer in range(card.num_layers):
        room -= (moe if layer in card.moe_layers else dense) + cache
        if room < 0:
            break
        n += 1
    return n


@pytest.mark.parametrize(("eid", "model", "tokens"), [
    ("mg_t9_llamacpp_mixtral_b1", "mixtral_8x7b", 544),
    ("mg_t9_llamacpp_mixtral_b32", "mixtral_8x7b", 32 * 544),
    ("mg_t9_llamacpp_dsv2l_b1", "deepseek_v2_lite", 544),
    ("mg_t9_llamacpp_dsv2l_b32", "deepseek_v2_lite", 32 * 544),
])
def test_moe_gen_gpu_layers_follow_their_stated_reasoning(eid, model, tokens) -> None:
    e = _entries()[eid]
    card = load_card(model).with_weights(16, 16, 16 if card_has_shared(model) else None)
    assert gpu_layers_of(e) == _fit(card, 24, tokens)


def card_has_shared(model: str) -> bool:
    return load_card(model).shared_intermediate_size > 0


@pytest.mark.shared
def test_a_cpu_layers_entry_runs_its_layers_on_the_host() -> None:
    from tests.traces.fixtures import require_shared

    require_shared("mixtral8x7b_speculative-moe")
    from moesim.experiments.published.predict import run_prepared, runtime_of

    e = _entries()["mi_lat_ollama_mixtral"]
    p = prepare(e)
    s = run_prepared(p, runtime_of(e))
    assert s["sim_engine"] == "compiled" and s["placement"] == "cpu_layers"
    per_layer_tokens = s["cpu_expert_execs"] / (32 - gpu_layers_of(e))
    assert per_layer_tokens == s["output_tokens"] * 2  # top-2 of every CPU layer, every token
    assert math.isfinite(s["time_per_output_token_s"]) and s["demand_fetches"] == 0


def test_layer_offload_entries_map_to_the_placement_with_their_gpu_layers() -> None:
    """accelerate's layer-order offload: predictable once the entry has a gpu_layers
    assumption, refused with that reason without one (before any trace is read)."""
    from moesim.experiments.published.entries import Assumption

    assert "layer_offload" in PREDICTED_PLACEMENTS and not UNMODELLED_PLACEMENTS
    e = _entries()["mi_lat_accel_mixtral"]
    assert e.placement == "layer_offload" and e.runtime == "accelerate"
    bare = replace(e, assumptions=tuple(a for a in e.assumptions if a.field != "gpu_layers"))
    with pytest.raises(NotPredictable, match="placement layer_offload: the entry has no "
                                             "gpu_layers assumption"):
        prepare(bare)
    given = replace(bare, assumptions=(*bare.assumptions, Assumption("gpu_layers", 7, "t")))
    assert placement_of(given, load_card("mixtral_8x7b")) == {"name": "layer_offload",
                                                               "gpu_layers": 7}


def _accelerate_fit(card, free: float, attention_weights: int, rotary_elements: int) -> int:
    """The decoder layers accelerate's ``infer_auto_device_map`` puts on one GPU as transformers'
    ``device_map="auto"`` calls it (the reasoning of the MoE-Infinity accelerate entries'
    assumption): 0.9 of the free memory (``get_balanced_memory``), less the largest decoder layer
    (kept for an offloaded one), filled in module order, ``embed_tokens`` first, until a layer
    does not fit. Every weight and buffer element at 2 B (bf16); worked from the card's
    dimensions independently of moesim's cost code."""
    h, b = card.hidden_size, 2
    common = (attention_weights + 2 * h + rotary_elements) * b  # + 2 norms, rotary buffers
    moe = (common + h * card.num_experts * b + card.num_experts * card.expert_bytes
           + card.shared_bytes_per_layer)
    dense = common + 3 * h * card.dense_intermediate_size * b
    sizes = [moe if i in card.moe_layers else dense for i in range(card.num_layers)]
    room, n = 0.9 * free - max(sizes) - card.vocab_size * h * b, 0
    for s in sizes:
        if s > room:
            break
        room, n = room - s, n + 1
    return n


A5000_TOTAL = 24138 * 2**20  # torch's total_memory of an RTX A5000 (the assumption's source)
MIXTRAL_ATTN = 4096 * (2 * 4096 + 2 * 1024)
MIXTRAL_ROTARY = 2 * 32768 * 128 + 64  # cos/sin cache [max_position_embeddings, head_dim]
MLA_ATTN = 2048 * 3072 + 2048 * 576 + 512 + 512 * 4096 + 2048 * 2048  # DeepSeek-V2-Lite
DSV2L_ROTARY = 2 * 163840 * 64 + 32


@pytest.mark.parametrize(("eid", "model", "attn", "rotary"), [
    ("mi_lat_accel_mixtral", "mixtral_8x7b", MIXTRAL_ATTN, MIXTRAL_ROTARY),
    ("mi_tput_accel_mixtral", "mixtral_8x7b", MIXTRAL_ATTN, MIXTRAL_ROTARY),
    ("mi_lat_accel_dsv2l", "deepseek_v2_lite", MLA_ATTN, DSV2L_ROTARY),
])
def test_accelerate_gpu_layers_follow_their_stated_reasoning(eid, model, attn, rotary) -> None:
    e = _entries()[eid]
    assert e.placement == "layer_offload" and e.runtime == "accelerate"
    card = load_card(model).with_weights(16, 16, 16 if card_has_shared(model) else None)
    assert gpu_layers_of(e) == _accelerate_fit(card, A5000_TOTAL - 400e6, attn, rotary)


def test_accelerate_gpu_layers_sensitivity_is_as_stated() -> None:
    """Mixtral: 6 for any free memory from 21.4 to 24.4 GiB; DeepSeek-V2-Lite: 18 only with
    under 0.36 GiB in use (a 287 MB context), 17 with the card's attention stand-in."""
    mix = load_card("mixtral_8x7b").with_weights(16, 16, None)
    for gib in (21.45, 22.5, 23.5, 24.4):
        assert _accelerate_fit(mix, gib * 2**30, MIXTRAL_ATTN, MIXTRAL_ROTARY) == 6
    assert _accelerate_fit(mix, 21.3 * 2**30, MIXTRAL_ATTN, MIXTRAL_ROTARY) == 5
    ds = load_card("deepseek_v2_lite").with_weights(16, 16, 16)
    assert _accelerate_fit(ds, A5000_TOTAL - 287_047_680, MLA_ATTN, DSV2L_ROTARY) == 18
    assert _accelerate_fit(ds, A5000_TOTAL - 0.37 * 2**30, MLA_ATTN, DSV2L_ROTARY) == 17
    stand_in = 4 * 2048 * ds.num_attention_heads * ds.head_dim
    assert _accelerate_fit(ds, A5000_TOTAL - 287_047_680, stand_in, DSV2L_ROTARY) == 17
