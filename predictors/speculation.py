"""Inter-layer speculation: a small transformer over the routed experts of the previous
``context`` layers of a token predicts the experts ``horizon`` layers ahead (issue 6, seed 002).

For the row (token, layer t) the input is the token's *routed* top-k expert sets of layers
``t - horizon - context + 1 .. t - horizon`` (one sequence element per layer: the multi-hot
expert vector projected to ``d_model`` plus a learned embedding of that layer; layers before the
first MoE layer are padding and masked out), followed by a query element holding the embedding
of the target layer t. A ``layers``-deep transformer encoder runs over the sequence and a linear
head on the query element scores t's E experts. Loss: multi-label BCE on t's true top-k.

The prediction for layer t exists once layer ``t - horizon`` has routed, so the table is tagged
``routed:prev_layer`` for horizon 1 and ``routed:minus{h}_layer`` for horizon h >= 2; the first
``horizon`` MoE layers (no layer t - horizon) get no prediction (their rows are ranked ``-1``,
absent from the table and from the metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moesim.predictors.train import (
    BestEpoch,
    TrainConfig,
    exact_rate,
    load_cached,
    multi_hot,
    save_checkpoint,
    seeded_training,
)


@dataclass(frozen=True)
class SpeculationConfig:
    """Model hyper-parameters (``predictor.model.*``)."""

    context: int = 3  # previous routed layers read
    horizon: int = 2  # predict layer l + horizon from layers .. l
    d_model: int = 64
    heads: int = 4
    layers: int = 1
    ff: int = 128
    dropout: float = 0.1

    def check(self) -> None:
        if self.context < 1 or self.horizon < 1:
            raise ValueError("context and horizon must be >= 1")
        if self.d_model < 1 or self.heads < 1 or self.d_model % self.heads:
            raise ValueError("d_model must be a positive multiple of heads")
        if self.layers < 1 or self.ff < 1 or not 0 <= self.dropout < 1:
            raise ValueError("layers and ff must be >= 1 and dropout in [0, 1)")


@dataclass(frozen=True)
class SpecTrainConfig(TrainConfig):
    """The shared optimisation settings with this model's defaults (no BatchNorm, so any batch
    size works); the best epoch by val exact-match is kept."""

    batch_size: int = 512
    lr: float = 4e-3

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0")


def available_at(horizon: int) -> str:
    """Tag of a table whose prediction for layer t exists once layer t - horizon routes."""
    if horizon < 1:
        raise ValueError("horizon must be >= 1")
    return "routed:prev_layer" if horizon == 1 else f"routed:minus{horizon}_layer"


def context_rows(
    request: np.ndarray, token: np.ndarray, layer: np.ndarray, num_layers: int, context: int,
    horizon: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each row's context ``[N, context]`` (-1 = padding) and the mask of rows
    that get a prediction (layer >= horizon and at least one context row recorded).

    Context slot i of the row at layer t is the same token's row at layer
    ``t - horizon - context + 1 + i`` (the last slot is layer t - horizon).
    """
    n = len(layer)
    if n == 0:
        return np.zeros((0, context), dtype=np.int64), np.zeros(0, dtype=bool)
    new = np.r_[True, (request[1:] != request[:-1]) | (token[1:] != token[:-1])]
    group = np.cumsum(new) - 1
    index = np.full((int(group[-1]) + 1, num_layers), -1, dtype=np.int64)
    index[group, layer] = np.arange(n)
    src = layer[:, None] - horizon - context + 1 + np.arange(context)[None, :]  # [N, C]
    ok = src >= 0
    ctx = np.where(ok, index[group[:, None], np.clip(src, 0, None)], -1)
    has = (layer >= horizon) & (ctx >= 0).any(axis=1)
    return ctx, has


class SpeculationNet(nn.Module):
    """Transformer over [context layer elements..., query(target layer)] -> E logits."""

    def __init__(self, num_layers: int, num_experts: int, cfg: SpeculationConfig):
        super().__init__()
        self.num_layers = num_layers
        self.expert_proj = nn.Linear(num_experts, cfg.d_model)
        self.layer_embed = nn.Embedding(num_layers + 1, cfg.d_model)  # last = padding
        self.query_embed = nn.Embedding(num_layers, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.context + 1, cfg.d_model))
        block = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.heads, cfg.ff, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_experts)

    def forward(self, hot: torch.Tensor, ctx_layer: torch.Tensor, target: torch.Tensor):
        """``hot`` float ``[B, C, E]`` multi-hot context experts, ``ctx_layer`` long ``[B, C]``
        (-1 = padding), ``target`` long ``[B]`` target layers -> logits ``[B, E]``."""
        pad = ctx_layer < 0
        lay = torch.where(pad, torch.full_like(ctx_layer, self.num_layers), ctx_layer)
        x = self.expert_proj(hot) + self.layer_embed(lay)
        q = self.query_embed(target).unsqueeze(1)
        seq = torch.cat([x, q], dim=1) + self.pos
        mask = torch.cat([pad, torch.zeros_like(pad[:, :1])], dim=1)
        out = self.encoder(seq, src_key_padding_mask=mask)
        return self.head(self.norm(out[:, -1]))


@dataclass
class Inputs:
    """Model inputs of a set of rows (numpy)."""

    hot: np.ndarray  # float32 [N, C, E]
    ctx_layer: np.ndarray  # int64 [N, C]
    target: np.ndarray  # int64 [N]


def build_inputs(
    experts: np.ndarray, layer: np.ndarray, ctx: np.ndarray, rows: np.ndarray, num_experts: int
) -> Inputs:
    """Inputs of ``rows`` from the context row indices ``ctx`` (see :func:`context_rows`)."""
    c = ctx[rows]  # [n, C]
    n, k = c.shape[0], experts.shape[1]
    hot = np.zeros((n, c.shape[1], num_experts + 1), dtype=np.float32)
    ids = np.where(c[..., None] >= 0, experts[np.clip(c, 0, None)], num_experts)  # [n, C, k]
    ids = np.where(ids >= 0, ids, num_experts).astype(np.int64)
    ni, ci = np.meshgrid(np.arange(n), np.arange(c.shape[1]), indexing="ij")
    hot[np.repeat(ni[..., None], k, -1), np.repeat(ci[..., None], k, -1), ids] = 1.0
    ctx_layer = np.where(c >= 0, layer[np.clip(c, 0, None)], -1).astype(np.int64)
    return Inputs(hot[..., :num_experts], ctx_layer, layer[rows].astype(np.int64))


def _tensors(inp: Inputs, sl: slice | np.ndarray) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(inp.hot[sl]), torch.from_numpy(inp.ctx_layer[sl]),
            torch.from_numpy(inp.target[sl]))


@torch.no_grad()
def predict_logits(model: SpeculationNet, inp: Inputs, batch: int = 4096) -> np.ndarray:
    model.eval()
    n = len(inp.target)
    out = np.zeros((n, model.head.out_features), dtype=np.float32)
    for a in range(0, n, batch):
        out[a : a + batch] = model(*_tensors(inp, slice(a, a + batch))).numpy()
    return out


@dataclass
class SpecResult:
    model: SpeculationNet
    path: Path
    cached: bool
    train_seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def train_speculation(
    train: Inputs, train_true: np.ndarray, val: Inputs, val_true: np.ndarray, *,
    num_layers: int, num_experts: int, model_cfg: SpeculationConfig, train_cfg: SpecTrainConfig,
    key: str, directory: Path, retrain: bool = False, progress: bool = True, threads: int = 1,
    log: Callable[[str], None] = print,
) -> SpecResult:
    """Train (or load from the cache under ``key``) a speculation model; seeded, CPU-exact."""
    path = directory / f"speculation-{key}.pt"
    cached = None if retrain else load_cached(
        path, lambda: SpeculationNet(num_layers, num_experts, model_cfg), log
    )
    if cached is not None:
        model, ckpt = cached
        return SpecResult(model, path, True, float(ckpt["train_seconds"]),
                          int(ckpt["best_epoch"]), list(ckpt["history"]))
    y = torch.from_numpy(multi_hot(train_true, num_experts))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    gen = np.random.default_rng(train_cfg.seed)
    with seeded_training(train_cfg.seed, threads):
        model = SpeculationNet(num_layers, num_experts, model_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr,
                                weight_decay=train_cfg.weight_decay)
        best = BestEpoch(history)
        bar = tqdm(range(train_cfg.epochs), desc="speculation", disable=not progress,
                   unit="epoch", leave=False)
        for epoch in bar:
            model.train()
            perm = gen.permutation(len(y))
            total = 0.0
            for a in range(0, len(perm), train_cfg.batch_size):
                r = perm[a : a + train_cfg.batch_size]
                logits = model(*_tensors(train, r))
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[r])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(r)
            rec = {"epoch": float(epoch), "train_loss": total / max(len(perm), 1)}
            if len(val_true):
                lg = predict_logits(model, val)
                vl = float(nn.functional.binary_cross_entropy_with_logits(
                    torch.from_numpy(lg), torch.from_numpy(multi_hot(val_true, num_experts))))
                rec["val_loss"], rec["val_exact"] = vl, exact_rate(lg, val_true)
            best.update(model, epoch, rec, bar)
        model.load_state_dict(best.state)
        model.eval()
    seconds = time.perf_counter() - t0
    save_checkpoint(path, best, seconds, model_cfg, train_cfg, log)
    return SpecResult(model, path, False, seconds, best.epoch, history)
