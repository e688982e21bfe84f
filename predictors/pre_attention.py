"""Pre-attention expert prediction (Zhu et al., arXiv 2511.10676): model and ranking-aware loss.

The predictor reads layer l's *normalised pre-attention input* (the output of the layer's
input norm, ``feat.pre_attn``) and scores the E experts of the same layer l, so the prediction
exists at layer l's start, before attention (``available_at = "pre_attention:same_layer"``),
and works for the first MoE layer too.

Model: a 2-layer MLP ``d -> hidden -> E`` (hidden 2048 as in the paper). Like the paper we
train **one MLP per MoE layer** (``per_layer=True``); ``per_layer=False`` is a cheaper shared MLP
whose input is the hidden state concatenated with a learned layer embedding (its training
batches mix layers, so BatchNorm statistics are those of all layers, as at inference). Variants:
``arch="bn_gelu"`` (Linear -> BatchNorm1d -> GELU -> Dropout -> Linear, the paper's arch-1) and
``arch="silu"`` (Linear -> SiLU -> Linear, its streamlined arch-2).

Loss (ranking-aware, per row, normalised by batch x E):

- weighted BCE on top-k membership (label 1 for the true top-k): weight ``w1`` = 3.0 for the
  experts ranked in the first band, ``w2`` = 1.5 for the second band, ``w3`` = 0.5 otherwise.
  The paper's bands are ranks 1-10 and 11-30 of 64 experts; for E experts we scale them
  proportionally: ``b1 = max(k, ceil(10 E / 64))``, ``b2 = max(b1, ceil(30 E / 64))`` (E = 16,
  k = 2: ranks 1-3 and 4-8).
- ``hinge_weight`` (0.3) x pairwise hinge with margin m (0.1) on the logits: for every ordered
  pair (i, j) where i is in the first band and j is ranked below i by the truth,
  ``relu(m - (s_i - s_j))``, averaged over the pairs of the batch. ``hinge_pairs="within"``
  restricts j to the first band too (the paper's "ordered pairs inside the true top-10");
  the default ``"below"`` also pushes the band above every lower-ranked expert.

**What the trace knows.** A trace stores only the top-k ids (in router order), not the ranking
beyond k. With ``ranking="topk"`` the bands therefore reduce to: true top-k -> 3.0, every other
expert 0.5 (their order is unknown, so they are all "below" and none is in band 2), and the
within-band hinge only orders the k true experts among themselves. ``ranking="routers"``
recovers the full ranking from ``feat.router_in`` and the router weights side file (the
embedded trace has both; the recomputed top-2 matches the trace on 99.99 % of rows), which
gives the paper's bands proper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ARCHS = ("bn_gelu", "silu")
RANKINGS = ("topk", "routers")
PAIRS = ("below", "within")


@dataclass(frozen=True)
class PreAttentionConfig:
    """Model and loss hyper-parameters (training ones live in ``TrainConfig``)."""

    hidden: int = 2048
    arch: str = "bn_gelu"
    dropout: float = 0.1
    per_layer: bool = True
    layer_embed: int = 16
    ranking: str = "topk"
    band_weights: tuple[float, float, float] = (3.0, 1.5, 0.5)
    bands: tuple[int, int] | None = None  # None: (10, 30) scaled by E / 64, first >= k
    hinge_weight: float = 0.3
    margin: float = 0.1
    hinge_pairs: str = "below"

    def check(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, not {self.ranking!r}")
        if self.hinge_pairs not in PAIRS:
            raise ValueError(f"hinge_pairs must be one of {PAIRS}, not {self.hinge_pairs!r}")
        if self.hidden < 1 or not 0 <= self.dropout < 1:
            raise ValueError("hidden must be >= 1 and dropout in [0, 1)")
        if len(self.band_weights) != 3 or (self.bands is not None and len(self.bands) != 2):
            raise ValueError("band_weights needs 3 numbers and bands 2 ranks (or null)")


def band_sizes(cfg: PreAttentionConfig, num_experts: int, top_k: int) -> tuple[int, int]:
    """Band ends (b1, b2) in ranks: the paper's (10, 30) of 64 scaled to E experts."""
    if cfg.bands is not None:
        b1, b2 = int(cfg.bands[0]), int(cfg.bands[1])
    else:
        b1 = math.ceil(10 * num_experts / 64)
        b2 = math.ceil(30 * num_experts / 64)
    b1 = min(max(b1, top_k), num_experts)
    return b1, min(max(b2, b1), num_experts)


def _mlp(d_in: int, cfg: PreAttentionConfig, num_experts: int) -> nn.Sequential:
    if cfg.arch == "bn_gelu":
        return nn.Sequential(
            nn.Linear(d_in, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.GELU(),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_experts),
        )
    return nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, num_experts))


class PreAttentionNet(nn.Module):
    """Scores of layer j's experts from layer j's pre-attention input; one layer per batch."""

    def __init__(self, d: int, num_layers: int, num_experts: int, cfg: PreAttentionConfig):
        super().__init__()
        self.per_layer = cfg.per_layer
        if cfg.per_layer:
            self.mlps = nn.ModuleList(_mlp(d, cfg, num_experts) for _ in range(num_layers))
        else:
            self.embed = nn.Embedding(num_layers, cfg.layer_embed)
            self.mlp = _mlp(d + cfg.layer_embed, cfg, num_experts)

    def forward(self, x: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """``layer``: one dense layer index, or (shared MLP only) one per row."""
        if self.per_layer:
            if not isinstance(layer, int):
                raise TypeError("per-layer MLPs take one layer index per batch")
            return self.mlps[layer](x)
        idx = (torch.full((x.shape[0],), layer, dtype=torch.long) if isinstance(layer, int)
               else layer.long())
        return self.mlp(torch.cat([x, self.embed(idx)], dim=1))


def rank_matrix(
    true_ids: torch.Tensor, num_experts: int, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """True rank of every expert ``[B, E]`` (0 = first); experts of unknown rank get E.

    From the top-k ids alone (``logits=None``) only the first k ranks are known; from full
    router logits every rank is.
    """
    b = true_ids.shape[0]
    if logits is not None:
        order = torch.argsort(logits, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(num_experts).expand(b, -1).contiguous())
        return ranks
    ranks = torch.full((b, num_experts), num_experts, dtype=torch.long)
    k = true_ids.shape[1]
    ranks.scatter_(1, true_ids.long(), torch.arange(k).expand(b, -1).contiguous())
    return ranks


def ranking_loss(
    logits: torch.Tensor, ranks: torch.Tensor, top_k: int, cfg: PreAttentionConfig
) -> torch.Tensor:
    """Weighted BCE on top-k membership + hinge_weight x pairwise hinge (see module doc)."""
    e = logits.shape[1]
    b1, b2 = band_sizes(cfg, e, top_k)
    w1, w2, w3 = cfg.band_weights
    target = (ranks < top_k).to(logits.dtype)
    weight = torch.where(
        ranks < b1,
        torch.as_tensor(w1, dtype=logits.dtype),
        torch.where(ranks < b2, torch.as_tensor(w2, dtype=logits.dtype),
                    torch.as_tensor(w3, dtype=logits.dtype)),
    )
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight)
    if cfg.hinge_weight == 0:
        return bce
    ri, rj = ranks.unsqueeze(2), ranks.unsqueeze(1)  # pair (i, j): [B, E, E]
    pairs = (ri < b1) & (rj > ri)
    if cfg.hinge_pairs == "within":
        pairs &= rj < b1
    diff = logits.unsqueeze(2) - logits.unsqueeze(1)
    hinge = torch.relu(cfg.margin - diff)[pairs]
    if hinge.numel() == 0:
        return bce
    return bce + cfg.hinge_weight * hinge.mean()
