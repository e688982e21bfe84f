"""The layer compute the executor runs for real: the ops of ``hw_profiles.cpu_ops``.

One definition each, shared with ``moesim-profile``'s CPU measurement, so the profile the
simulator predicts from timed exactly these functions at exactly these shapes: per MoE layer the
stand-in attention (RMSNorm, fused QKV, SDPA over a fixed K/V cache of the step's context,
output projection, RMSNorm) and the router (logits, softmax, top-k; the routing itself comes
from the trace); the shared experts; every routed expert as a SwiGLU FFN over the tokens routed
to it, its weights viewing its slot. Dense layers run the stand-in attention plus a dense FFN.
Weights other than routed experts are resident, random and seeded, one set per layer, so each
layer reads its own weights as a real model does. torch is imported when this is built.
"""

from __future__ import annotations

from typing import Any

from moesim.traces.model_card import ModelCard


class TorchCompute:
    """All resident weights and activations of one run, on ``device``."""

    def __init__(self, card: ModelCard, num_layers: int, max_context: int, max_tokens: int,
                 dense_layers: int, seed: int, device: str = "cpu") -> None:
        import torch

        from moesim.hw_profiles import cpu_ops

        self.ops = cpu_ops
        self.torch = torch
        self.card = card
        self.device = device
        dt = cpu_ops.torch_dtype(card)
        g = torch.Generator().manual_seed(seed)
        ctx = max(max_context, 1)
        h = card.hidden_size

        def ffn(inter: int) -> tuple[Any, Any, Any]:
            flat = (torch.randn(card.matrices_per_expert * h * inter, generator=g) * 0.02)
            return cpu_ops.expert_views(flat.to(dt), card, inter)

        def place(x: Any) -> Any:
            return x if device == "cpu" else x.to(device)

        self.layers = [self._on(cpu_ops.make_standin_layer(card, ctx, g), place)
                       for _ in range(num_layers)]
        self.shared_w = []
        if card.shared_intermediate_size > 0:
            self.shared_w = [tuple(place(t) if t is not None else None
                                   for t in ffn(card.shared_intermediate_size))
                             for _ in range(num_layers)]
        self.dense = []
        for _ in range(dense_layers):
            inter = card.dense_intermediate_size or card.moe_intermediate_size
            self.dense.append((self._on(cpu_ops.make_standin_layer(card, ctx, g), place),
                               tuple(place(t) if t is not None else None for t in ffn(inter))))
        n = max(max_tokens, 1)
        self.x = place(torch.randn(n, h, generator=g).to(dt))
        self.out = torch.zeros(n, h, dtype=dt, device=device)

    @staticmethod
    def _on(layer: Any, place: Any) -> Any:
        from dataclasses import fields, replace

        moved = {f.name: place(getattr(layer, f.name)) for f in fields(layer)
                 if hasattr(getattr(layer, f.name), "to")}
        return replace(layer, **moved)

    # -- what the run loop (and the calibration) calls ---------------------------------------
    def attention(self, layer: int, tokens: int, context: int) -> None:
        """Stand-in attention and router of MoE layer ``layer``."""
        p = self.layers[layer]
        self.ops.attention_router_standin(self.x[:tokens], p, context, self.card.top_k)

    def attention_only(self, layer: int, tokens: int, context: int) -> None:
        self.ops.attention_standin(self.x[:tokens], self.layers[layer], context)

    def router(self, layer: int, tokens: int) -> None:
        self.ops.router(self.x[:tokens], self.layers[layer].w_router, self.card.top_k)

    def dense_layer(self, index: int, tokens: int, context: int) -> None:
        layer, w = self.dense[index % len(self.dense)]
        h = self.ops.attention_standin(self.x[:tokens], layer, context)
        self.ops.expert_ffn(h, *w)

    def dense_ffn(self, index: int, tokens: int) -> None:
        _, w = self.dense[index % len(self.dense)]
        self.ops.expert_ffn(self.x[:tokens], *w)

    def shared(self, layer: int, tokens: int) -> None:
        if self.shared_w and tokens > 0:
            self.out[:tokens] += self.ops.expert_ffn(self.x[:tokens], *self.shared_w[layer])

    def expert(self, weights: tuple[Any, Any, Any], tokens: int) -> None:
        """One routed expert over ``tokens`` tokens; weights are views of its slot."""
        self.out[:tokens] += self.ops.expert_ffn(self.x[:tokens], *weights)
