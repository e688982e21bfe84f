"""The layer compute the executor runs for real, with torch, at the (scaled) card's shapes.

Per MoE layer: RMSNorm, Q/K/V projections, attention of the step's tokens over a KV buffer of
the step's context length, output projection, RMSNorm, router (its logits are computed and
thrown away: routing comes from the trace); shared experts; each routed expert as a SwiGLU FFN
``down(silu(gate x) * up x)`` over the tokens routed to it. Dense layers run attention plus a
dense SwiGLU FFN. Weights other than routed experts are resident, random and seeded; one set
per layer, so each layer reads its own weights as a real model does. The calibration
microbenchmarks (``sim.executor.calibrate``) time these same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from traces.model_card import ModelCard


@dataclass(frozen=True)
class ComputeShape:
    hidden: int
    q_width: int
    kv_width: int
    heads: int
    num_experts: int
    shared_intermediate: int
    dense_intermediate: int

    @classmethod
    def of(cls, card: ModelCard) -> ComputeShape:
        heads = card.num_attention_heads or 1
        hd = card.head_dim or max(card.hidden_size // heads, 1)
        kv_heads = card.num_kv_heads or heads
        return cls(card.hidden_size, heads * hd, kv_heads * hd, heads, card.num_experts,
                   card.shared_intermediate_size, card.dense_intermediate_size)


class TorchCompute:
    """All resident weights and activations of one run, on ``device``."""

    def __init__(self, card: ModelCard, num_layers: int, max_context: int, max_tokens: int,
                 dense_layers: int, seed: int, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.shape = sh = ComputeShape.of(card)
        self.dtype = torch.float32 if card.dtype == "float32" else torch.bfloat16
        self.device = device
        g = torch.Generator().manual_seed(seed)

        def w(*dims: int) -> Any:
            t = torch.randn(*dims, generator=g) * 0.02
            return t.to(device=device, dtype=self.dtype)

        h = sh.hidden
        ctx = max(max_context, 1)

        def attn_set() -> dict[str, Any]:
            return {"wq": w(sh.q_width, h), "wk": w(sh.kv_width, h), "wv": w(sh.kv_width, h),
                    "wo": w(h, sh.q_width), "n1": w(h) + 1, "n2": w(h) + 1,
                    "k": w(ctx, sh.kv_width), "v": w(ctx, sh.kv_width)}

        self.layers = []
        for _ in range(num_layers):
            layer = attn_set()
            layer["router"] = w(sh.num_experts, h)
            if sh.shared_intermediate:
                si = sh.shared_intermediate
                layer["shared"] = (w(si, h), w(si, h), w(h, si))
            self.layers.append(layer)
        self.dense = []
        for _ in range(dense_layers):
            layer = attn_set()
            di = sh.dense_intermediate or card.moe_intermediate_size
            layer["ffn"] = (w(di, h), w(di, h), w(h, di))
            self.dense.append(layer)
        n = max(max_tokens, 1)
        self.x = w(n, h) * 50
        self.out = torch.zeros(n, h, dtype=self.dtype, device=device)

    # -- pieces ------------------------------------------------------------------------------
    def _norm(self, x: Any, weight: Any) -> Any:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * self.torch.rsqrt(var + 1e-6) * weight

    def _attention(self, p: dict[str, Any], tokens: int, context: int) -> Any:
        F = self.torch.nn.functional
        sh = self.shape
        x = self._norm(self.x[:tokens], p["n1"])
        c = max(1, min(context, p["k"].shape[0]))
        q = F.linear(x, p["wq"])
        F.linear(x, p["wk"])  # the new token's K/V (the buffer stands in for the cache)
        F.linear(x, p["wv"])
        heads, d = sh.heads, sh.q_width // sh.heads
        kv_heads = max(sh.kv_width // d, 1)
        qh = q.view(tokens, heads, d).transpose(0, 1)
        kh = p["k"][:c].view(c, kv_heads, d).transpose(0, 1)
        vh = p["v"][:c].view(c, kv_heads, d).transpose(0, 1)
        if kv_heads != heads:  # grouped-query attention: each KV head serves several
            kh = kh.repeat_interleave(heads // kv_heads, 0)
            vh = vh.repeat_interleave(heads // kv_heads, 0)
        att = self.torch.softmax(qh @ kh.transpose(1, 2) * d ** -0.5, dim=-1) @ vh
        o = F.linear(att.transpose(0, 1).reshape(tokens, -1), p["wo"])
        return self._norm(o + self.x[:tokens], p["n2"])

    def _ffn(self, x: Any, gate: Any, up: Any, down: Any) -> Any:
        F = self.torch.nn.functional
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    # -- what the run loop calls -------------------------------------------------------------
    def attention(self, layer: int, tokens: int, context: int) -> None:
        """Attention, norms and the router of MoE layer ``layer``."""
        p = self.layers[layer]
        h = self._attention(p, tokens, context)
        self.torch.nn.functional.linear(h, p["router"])

    def router(self, layer: int, tokens: int) -> None:
        self.torch.nn.functional.linear(self.x[:tokens], self.layers[layer]["router"])

    def attention_only(self, layer: int, tokens: int, context: int) -> None:
        self._attention(self.layers[layer], tokens, context)

    def dense_layer(self, index: int, tokens: int, context: int) -> None:
        p = self.dense[index % len(self.dense)]
        h = self._attention(p, tokens, context)
        self._ffn(h, *p["ffn"])

    def shared(self, layer: int, tokens: int) -> None:
        p = self.layers[layer].get("shared")
        if p is not None and tokens > 0:
            self.out[:tokens] += self._ffn(self.x[:tokens], *p)

    def expert(self, weights: tuple[Any, Any, Any], tokens: int) -> None:
        """One routed expert over ``tokens`` tokens; weights are views of its slot."""
        self.out[:tokens] += self._ffn(self.x[:tokens], *weights)
