"""Tiny randomly initialised MoE models of every supported architecture, plus reference routing.

The reference re-implements each model's top-k rule from the router logits that
``output_router_logits=True`` returns, independently of the collector's hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

VOCAB = 256  # byte tokenizer


@dataclass(frozen=True)
class Arch:
    """One architecture under test."""

    name: str
    build: Callable[[], Any]
    top_k: int
    rule: str  # softmax_topk | logits_topk | deepseek_v2_group | deepseek_v3 | top1
    moe_layers: tuple[int, ...]
    enc_dec: bool = False
    shared: int = 0  # shared experts per MoE layer


COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)


def _mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(
            **COMMON,
            intermediate_size=32,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    )


def _qwen2() -> Any:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **COMMON,
            intermediate_size=32,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=4,
        )
    )


def _qwen3() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    )


def _olmoe() -> Any:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(
        OlmoeConfig(
            **COMMON,
            intermediate_size=16,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
        )
    )


MLA = dict(
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    head_dim=8,
)


def _dsv2() -> Any:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM(
        DeepseekV2Config(
            **COMMON,
            **MLA,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
        )
    )


def _dsv3() -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(
        DeepseekV3Config(
            **COMMON,
            **MLA,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
        )
    )
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():  # a non-zero selection bias, as in a trained checkpoint
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.copy_(torch.rand(8, generator=g) * 0.1)
    return model


def _phimoe() -> Any:
    from transformers import PhimoeConfig, PhimoeForCausalLM

    return PhimoeForCausalLM(
        PhimoeConfig(
            **COMMON,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    )


def _gpt_oss() -> Any:
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(
        GptOssConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    )


def _switch() -> Any:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    return SwitchTransformersForConditionalGeneration(
        SwitchTransformersConfig(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_heads=2,
            num_layers=2,
            num_decoder_layers=2,
            num_experts=4,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            expert_capacity=64,
            decoder_start_token_id=0,
            eos_token_id=None,
            pad_token_id=0,
        )
    )


ARCHS = [
    Arch("mixtral", _mixtral, 2, "softmax_topk", (0, 1)),
    Arch("qwen2_moe", _qwen2, 4, "softmax_topk", (0, 1), shared=1),
    Arch("qwen3_moe", _qwen3, 2, "softmax_topk", (0, 1)),
    Arch("olmoe", _olmoe, 2, "softmax_topk", (0, 1)),
    Arch("deepseek_v2", _dsv2, 2, "deepseek_v2_group", (1, 2), shared=1),
    Arch("deepseek_v3", _dsv3, 2, "deepseek_v3", (1, 2), shared=1),
    Arch("phimoe", _phimoe, 2, "logits_topk", (0, 1)),
    Arch("gpt_oss", _gpt_oss, 2, "logits_topk", (0, 1)),
    Arch("switch_transformers", _switch, 1, "top1", (1, 3), enc_dec=True),
]


def reference_topk(arch: Arch, model: Any, logits: torch.Tensor, j: int) -> torch.Tensor:
    """Expert ids [n, k] (as sets; order not implied) by the model's own rule."""
    k = arch.top_k
    logits = logits.float()
    if arch.rule == "softmax_topk":
        return torch.topk(logits.softmax(-1), k, dim=-1).indices
    if arch.rule in ("logits_topk", "top1"):
        return torch.topk(logits, k, dim=-1).indices
    cfg = model.config
    e, g = logits.shape[-1], int(cfg.n_group)
    if arch.rule == "deepseek_v2_group":
        s = logits.softmax(-1)
        grp = s.view(-1, g, e // g).max(-1).values
        keep = torch.topk(grp, int(cfg.topk_group), dim=-1).indices
        mask = torch.zeros_like(grp).scatter_(1, keep, 1.0).repeat_interleave(e // g, dim=1)
        return torch.topk(s.masked_fill(mask == 0, 0.0), k, dim=-1).indices
    if arch.rule == "deepseek_v3":
        biases = [
            m.e_score_correction_bias
            for m in model.modules()
            if hasattr(m, "e_score_correction_bias")
        ]
        bias = biases[j]  # of the j-th MoE layer
        s = logits.sigmoid() + bias
        grp = s.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1)
        keep = torch.topk(grp, int(cfg.topk_group), dim=-1).indices
        mask = torch.zeros_like(grp).scatter_(1, keep, 1.0).repeat_interleave(e // g, dim=1)
        return torch.topk(s.masked_fill(mask == 0, float("-inf")), k, dim=-1).indices
    raise ValueError(arch.rule)
