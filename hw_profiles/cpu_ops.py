"""The CPU ops the storage profiler times and the offloading executor runs: one definition each.

Why here: the simulator predicts the executor from a profile measured by ``moesim-profile
storage``; that prediction is only fair if both time the very same functions on the very same
shapes and memory layout. The executor (sim/executor/) should import from this module rather
than re-implement any of it.

Shapes: ``scaled_card(card, scale, dtype)`` shrinks hidden, intermediate (routed, shared,
dense) sizes and the head dimension by ``scale`` (rounded), keeping the name, expert count, top-k,
layers and head count, so a trace of the card still fits it. The scaled card's
``expert_bytes`` is what the simulator copies; the executor stores each expert as one contiguous
``[gate (I x H); up (I x H); down (H x I)]`` block at a 4 KiB-aligned offset (``expert_views``).

Per layer, the simulator charges ``attention_time(b, ctx) + router_time(b)`` then the shared
expert (``shared_ffn`` if the card has one), then every routed expert; a dense (non-MoE) layer
is ``attention_time + dense FFN``. These are, exactly:

* ``attention_standin(x, layer, context)``: RMSNorm -> fused QKV projection ->
  scaled-dot-product attention of the b new queries over the first ``context`` entries of a
  fixed, random per-layer K/V cache (no causal mask, no cache append) -> output projection ->
  residual add -> RMSNorm. MLA is treated as multi-head attention with the card's heads.
* ``router(h, w_router, top_k)``: logits = h @ W_r^T, softmax, top-k (the trace decides the
  routing; the result is only computed to take its time).
* ``expert_ffn(x, w_gate, w_up, w_down)``: SwiGLU, ``down(silu(gate(x)) * up(x))``
  (ReLU MLP ``down(relu(up(x)))`` for cards with ``gated: false``, via ``w_gate=None``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from moesim.traces.model_card import ModelCard

from .direct_io import BLOCK, round_up

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def scaled_card(card: ModelCard, scale: float, dtype: str | None = None) -> ModelCard:
    """``card.scaled(scale, dtype)`` (ModelCard.scaled), for a dtype torch runs on the CPU."""
    if (dtype or card.dtype) not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype or card.dtype!r} not runnable on CPU; one of "
                         f"{sorted(TORCH_DTYPES)}")
    return card.scaled(scale, dtype)


def torch_dtype(card: ModelCard) -> torch.dtype:
    if card.dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {card.dtype!r} not runnable on CPU; one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[card.dtype]


def attention_dims(card: ModelCard) -> tuple[int, int]:
    """(heads, head_dim); cards without head counts fall back to heads of width 128 (>= 1)."""
    if card.num_attention_heads > 0 and card.head_dim > 0:
        return card.num_attention_heads, card.head_dim
    heads = max(1, card.hidden_size // 128)
    return heads, max(1, card.hidden_size // heads)


def working_set_bytes(card: ModelCard) -> int:
    """Weight bytes one decode step touches (every layer's attention, router, top-k routed and
    shared experts; dense layers' attention and FFN; K/V caches not counted).

    The profiler rotates each op's weights through a pool this large, so between two uses of
    the same weights as many bytes pass through the CPU caches as in the executor: cold for
    DeepSeek-V2-Lite at any scale here, warm for the tiny embedded model.
    """
    heads, hd = attention_dims(card)
    h, db = card.hidden_size, card.dtype_bytes
    attn = (3 * heads * hd * h + h * heads * hd) * db
    moe = attn + card.num_experts * h * db + card.top_k * card.expert_bytes
    moe += card.shared_bytes_per_layer
    dense = attn + card.matrices_per_expert * h * card.dense_intermediate_size * db
    return int(card.num_moe_layers * moe + len(card.dense_layers) * dense)


# --------------------------------------------------------------------------------------------
# Expert layout in the expert file and in a DRAM slot


def expert_stride(card: ModelCard) -> int:
    """Bytes between consecutive experts in the file / slot pool: expert_bytes rounded to 4 KiB."""
    return round_up(card.expert_bytes, BLOCK)


def expert_views(flat: torch.Tensor, card: ModelCard, intermediate: int | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(w_gate [I,H] or None, w_up [I,H], w_down [H,I]) as views into one flat expert block.

    ``flat`` is a 1-D tensor of the card's dtype holding at least the expert's parameters, e.g.
    ``torch.frombuffer(slot_mmap, dtype=..., count=card.expert_params)``.
    """
    h = card.hidden_size
    i = intermediate if intermediate is not None else card.moe_intermediate_size
    n = h * i
    if card.gated:
        if flat.numel() < 3 * n:
            raise ValueError(f"expert block holds {flat.numel()} values, needs {3 * n}")
        return flat[:n].view(i, h), flat[n:2 * n].view(i, h), flat[2 * n:3 * n].view(h, i)
    if flat.numel() < 2 * n:
        raise ValueError(f"expert block holds {flat.numel()} values, needs {2 * n}")
    return None, flat[:n].view(i, h), flat[n:2 * n].view(h, i)


def expert_ffn(x: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """One expert over ``x`` [tokens, H]: SwiGLU ``down(silu(gate x) * up x)``; ReLU if no gate."""
    if w_gate is None:
        return F.linear(F.relu(F.linear(x, w_up)), w_down)
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


# --------------------------------------------------------------------------------------------
# Stand-in attention and router


@dataclass(frozen=True)
class StandinLayer:
    """Weights and a fixed K/V cache of one layer's stand-in attention and router."""

    norm1: torch.Tensor  # [H]
    w_qkv: torch.Tensor  # [3 * heads * head_dim, H]
    w_o: torch.Tensor  # [H, heads * head_dim]
    norm2: torch.Tensor  # [H]
    k_cache: torch.Tensor  # [heads, max_context, head_dim]
    v_cache: torch.Tensor  # [heads, max_context, head_dim]
    w_router: torch.Tensor  # [num_experts, H]
    heads: int
    head_dim: int

    @property
    def max_context(self) -> int:
        return int(self.k_cache.shape[1])


def make_standin_layer(card: ModelCard, max_context: int, generator: torch.Generator
                       ) -> StandinLayer:
    """Seeded random weights (std 0.02) and K/V cache for one layer of ``card``."""
    if max_context < 1:
        raise ValueError(f"max_context must be >= 1, got {max_context}")
    dt = torch_dtype(card)
    h = card.hidden_size
    heads, hd = attention_dims(card)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dt)

    return StandinLayer(
        norm1=torch.ones(h, dtype=dt),
        w_qkv=rnd(3 * heads * hd, h),
        w_o=rnd(h, heads * hd),
        norm2=torch.ones(h, dtype=dt),
        k_cache=torch.randn(heads, max_context, hd, generator=generator).to(dt),
        v_cache=torch.randn(heads, max_context, hd, generator=generator).to(dt),
        w_router=rnd(card.num_experts, h),
        heads=heads,
        head_dim=hd,
    )


def attention_standin(x: torch.Tensor, layer: StandinLayer, context: int) -> torch.Tensor:
    """Stand-in attention of ``x`` [b, H] over ``context`` cached tokens; returns [b, H]."""
    if not 1 <= context <= layer.max_context:
        raise ValueError(f"context {context} outside 1..{layer.max_context}")
    b, h = x.shape
    nh, hd = layer.heads, layer.head_dim
    y = F.rms_norm(x, (h,), layer.norm1)
    qkv = F.linear(y, layer.w_qkv)
    q = qkv[:, : nh * hd].reshape(b, nh, hd).transpose(0, 1)  # [nh, b, hd]
    o = F.scaled_dot_product_attention(q, layer.k_cache[:, :context], layer.v_cache[:, :context])
    out = x + F.linear(o.transpose(0, 1).reshape(b, nh * hd), layer.w_o)
    return F.rms_norm(out, (h,), layer.norm2)


def router(h: torch.Tensor, w_router: torch.Tensor, top_k: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits, softmax (in fp32) and top-k: (weights [b, k], expert ids [b, k])."""
    probs = torch.softmax(F.linear(h, w_router).float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def attention_router_standin(x: torch.Tensor, layer: StandinLayer, context: int, top_k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer's non-expert work: stand-in attention then router; returns (h, ids)."""
    h = attention_standin(x, layer, context)
    return h, router(h, layer.w_router, top_k)[1]


@contextmanager
def torch_threads(n: int) -> Any:
    """Run a block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    if n < 1:
        raise ValueError(f"torch threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
