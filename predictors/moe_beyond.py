"""MoE-Beyond's expert predictor (Gavhane et al., arXiv 2508.17137): a transformer encoder over
the (token, layer) rows of a request.

Read from their ``transformer_model/transformer_train.py`` (repository ngavhane/moe-beyond,
HEAD 4dca2ea). Each row of a prompt is ``token vector (+) layer embedding``; the rows of one
prompt form one sequence (their CSVs list all tokens of layer 1, then layer 2, ...; at most
``max_length`` tokens per layer); ``Linear(in -> d_model)`` -> ``TransformerEncoder`` (4
layers, 8 heads, FFN 2048, dropout 0.1, post-norm, no positional encoding) -> ``Linear(d, 512)
-> GELU -> Dropout -> Linear(512, E)`` scores each row's E experts; masked multi-label BCE;
AdamW (weight decay 0.01) with learning rates lr / 0.9 lr / 0.8 lr for input projection /
encoder / head, gradient clipping at 1.0; the prediction is the top-k of the sigmoid.

Token vector (``token_vector``): their trace logs the router's input (the hidden state
``mlp.gate`` sees); here ``auto`` takes ``feat.router_in`` when the trace has it, else a learned
embedding of the token text (vocabulary from the train split, unseen texts share one id), as
the issue asks for traces without hidden states (MoE-Beyond's public CSVs have none).
``pre_attn`` (the layer's normalised input before attention) is an ablation.

**What a row may see** (``context``). Their encoder is unmasked: a row attends to every row of
the prompt, including later tokens and later layers, whose router inputs do not exist yet when
the row's experts are needed. ``context="prompt"`` keeps that (faithful; the table is tagged
``prompt:complete``: usable only by the zero-latency replay of their protocol, refused by
``prediction_prefetch``). ``context="causal"`` masks attention so that the row (t, l) sees
rows of earlier tokens (any layer) and of its own token at layers <= l; its table is tagged by
what its own row needs: ``routed:same_layer`` (router input), ``pre_attention:same_layer``
(pre-attention input) or ``token_start:any_layer`` (token text: known when the token starts).

The ``causal`` tags assume a decode replay (token t-1 has passed every layer before token t
starts); in a ``replay=prefill`` chunk the rows (t-1, l' > l) do not exist yet when (t, l) is
needed, so a causal table is optimistic there.

Deviations: their layer embedding is created inside the dataset and never trained (a fixed
random vector per layer); ``train_layer_embed=false`` (default) keeps it fixed, seeded. They
train in fp16 with AMP on a GPU; here fp32 on the CPU. They keep the epoch with the lowest
validation loss with early stopping (patience 5); here the best epoch by validation exact-match
(then loss), with the same patience. Their budget (50 epochs of 4-prompt batches at lr 1e-4)
is a GPU's; the default here is 10 epochs of 1-prompt batches at lr 3e-4 (see
``MoEBeyondTrainConfig``). They train on an 80/20 random split of prompts with no test
set; here the shared 75/12.5/12.5 request split. They truncate each prompt to ``max_length``
tokens per layer; here training does too, and prediction cuts a longer request into windows of
``max_length`` tokens so that every row gets a prediction. The text embedding (absent in theirs)
trains at the input projection's learning rate. Their gradient clipping acts on fp16-scaled
gradients (no ``unscale_``); here on the true fp32 gradients.
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

TOKEN_VECTORS = ("auto", "router_in", "pre_attn", "text")
CONTEXTS = ("prompt", "causal")
OOV = 0  # text id of tokens unseen in the train split


@dataclass(frozen=True)
class MoEBeyondConfig:
    """Model hyper-parameters (``predictor.model.*``); defaults are their published ones."""

    d_model: int = 512
    heads: int = 8
    layers: int = 4
    ff: int = 2048
    dropout: float = 0.1
    head_hidden: int = 512
    layer_embed: int = 512
    train_layer_embed: bool = False  # theirs is fixed random
    token_vector: str = "auto"  # auto | router_in | pre_attn | text
    text_embed: int = 512  # text embedding width when token_vector resolves to text
    context: str = "prompt"  # prompt (theirs, non-causal) | causal
    max_length: int = 512  # training: first tokens per layer of each prompt (their --max-length)

    def check(self) -> None:
        if self.d_model < 1 or self.heads < 1 or self.d_model % self.heads:
            raise ValueError("d_model must be a positive multiple of heads")
        if min(self.layers, self.ff, self.head_hidden, self.layer_embed, self.text_embed) < 1:
            raise ValueError("layers, ff, head_hidden, layer_embed, text_embed must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.token_vector not in TOKEN_VECTORS:
            raise ValueError(f"token_vector must be one of {TOKEN_VECTORS}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}")
        if self.max_length < 1:
            raise ValueError("max_length must be >= 1")


@dataclass(frozen=True)
class MoEBeyondTrainConfig(TrainConfig):
    """Optimisation settings. Theirs: 50 epochs of 4-prompt batches at lr 1e-4 (a GPU budget);
    the defaults here fit the CPU budget of 10 minutes on the embedded trace: 10 epochs of
    1-prompt batches at lr 3e-4. Weight decay 0.01 and early stopping after ``patience``
    epochs without a better validation score, as theirs."""

    epochs: int = 10
    batch_size: int = 1  # prompts per batch
    lr: float = 3e-4
    patience: int = 5

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0")
        if self.patience < 1:
            raise ValueError("patience must be >= 1")


def resolve_token_vector(choice: str, has_feature: Callable[[str], bool]) -> str:
    """``auto`` -> ``router_in`` if the trace records it, else ``text``."""
    if choice != "auto":
        return choice
    return "router_in" if has_feature("router_in") else "text"


def available_at(context: str, token_vector: str) -> str:
    """The table's tag: when the prediction of a row can exist (see the module docstring)."""
    if context == "prompt":
        return "prompt:complete"
    return {
        "router_in": "routed:same_layer",
        "pre_attn": "pre_attention:same_layer",
        "text": "token_start:any_layer",
    }[token_vector]


def text_vocab(tokens: list[str | None], min_count: int = 2) -> dict[str, int]:
    """Ids 1.. for the texts seen at least ``min_count`` times (sorted: deterministic); rarer
    texts map to :data:`OOV`, so the unseen-text vector is trained on the train split's rare
    texts instead of staying at its random initial value."""
    counts: dict[str, int] = {}
    for t in tokens:
        if t is not None:
            counts[t] = counts.get(t, 0) + 1
    kept = sorted(t for t, c in counts.items() if c >= min_count)
    return {t: i + 1 for i, t in enumerate(kept)}


class MoEBeyondNet(nn.Module):
    """Their ExpertPredictor, with the token vector either given or a learned text embedding."""

    def __init__(self, in_dim: int, vocab: int, num_layers: int, num_experts: int,
                 cfg: MoEBeyondConfig):
        super().__init__()
        self.text = nn.Embedding(vocab, cfg.text_embed) if vocab else None
        width = cfg.text_embed if vocab else in_dim
        self.layer_embed = nn.Embedding(num_layers, cfg.layer_embed)
        self.layer_embed.weight.requires_grad_(cfg.train_layer_embed)
        self.input_proj = nn.Linear(width + cfg.layer_embed, cfg.d_model)
        block = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ff, cfg.dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, num_experts),
        )
        self.heads = cfg.heads

    def forward(self, vec: torch.Tensor, layer: torch.Tensor, pad: torch.Tensor,
                block: torch.Tensor | None) -> torch.Tensor:
        """``vec`` float ``[B, S, D]`` or long ``[B, S]`` text ids, ``layer`` long ``[B, S]``,
        ``pad`` bool ``[B, S]`` (True = padding), ``block`` bool ``[B, S, S]`` (True = may not
        attend) or None -> logits ``[B, S, E]``."""
        tok = self.text(vec) if self.text is not None else vec
        x = self.input_proj(torch.cat([tok, self.layer_embed(layer)], dim=-1))
        mask = None
        if block is not None:  # one [S, S] mask serves every head (and a batch of one)
            mask = block[0] if block.shape[0] == 1 else block.repeat_interleave(self.heads, 0)
        x = self.encoder(x, mask=mask, src_key_padding_mask=pad)
        return self.head(x)


@dataclass
class Sequences:
    """The rows of each request as one sequence (indices into the trace's rows)."""

    rows: list[np.ndarray]  # per request: row indices, file order

    def __len__(self) -> int:
        return len(self.rows)


def sequences(request: np.ndarray, token: np.ndarray, rows: np.ndarray,
              max_tokens: int | None) -> Sequences:
    """Group ``rows`` by request; keep each request's first ``max_tokens`` tokens (None = all)."""
    out = []
    rows = np.asarray(rows)
    if len(rows) == 0:
        return Sequences([])
    req = request[rows]
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(rows)], strict=True):
        r = rows[a:b]
        if max_tokens is not None:
            r = r[token[r] < max_tokens]
        out.append(r)
    return Sequences(out)


def windows(request: np.ndarray, token: np.ndarray, rows: np.ndarray, size: int) -> Sequences:
    """Prediction sequences: each request cut into windows of ``size`` tokens (a request no
    longer than the training length is one sequence, as in their evaluation)."""
    out = []
    for seq in sequences(request, token, rows, None).rows:
        w = token[seq] // size
        for v in np.unique(w):
            out.append(seq[w == v])
    return Sequences(out)


@dataclass
class Batch:
    vec: torch.Tensor
    layer: torch.Tensor
    pad: torch.Tensor
    block: torch.Tensor | None
    index: np.ndarray  # [B, S] row index, -1 = padding


def make_batch(seqs: list[np.ndarray], vectors: np.ndarray, layer: np.ndarray,
               token: np.ndarray, causal: bool) -> Batch:
    """Pad a list of sequences; build the causal attention block mask when asked."""
    s = max(len(q) for q in seqs)
    b = len(seqs)
    index = np.full((b, s), -1, dtype=np.int64)
    for i, q in enumerate(seqs):
        index[i, : len(q)] = q
    real = index >= 0
    safe = np.where(real, index, 0)
    v = vectors[safe]
    v = np.where(real if v.ndim == 2 else real[..., None], v, 0)
    lay = np.where(real, layer[safe], 0)
    block = None
    if causal:
        big = np.iinfo(np.int64).max // 4
        t = np.where(real, token[safe], big)
        lj = np.where(real, layer[safe], big)
        # row i may attend row j if j is an earlier token, or the same token at a layer <= i's
        ok = (t[:, None, :] < t[:, :, None]) | (
            (t[:, None, :] == t[:, :, None]) & (lj[:, None, :] <= lj[:, :, None])
        )
        block = torch.from_numpy(~ok)
    vt = torch.from_numpy(np.ascontiguousarray(v))
    if vt.dtype != torch.int64:
        vt = vt.float()
    return Batch(vt, torch.from_numpy(lay), torch.from_numpy(~real), block, index)


def _budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Sequence indices grouped (shortest first, less padding) so that batch x longest^2 stays
    within ``budget`` attention cells per head (a longer sequence goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[i] ** 2 <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def predict_logits(model: MoEBeyondNet, seqs: Sequences, vectors: np.ndarray,
                   layer: np.ndarray, token: np.ndarray, n_rows: int, causal: bool,
                   budget: int = 1 << 22) -> np.ndarray:
    """Logits ``[n_rows, E]`` of every row of ``seqs`` (other rows stay 0). Attention memory
    is quadratic in a sequence's rows (tokens x layers), so batches are cut by ``budget``."""
    model.eval()
    out = np.zeros((n_rows, model.head[-1].out_features), dtype=np.float32)
    for group in _budget_batches([len(r) for r in seqs.rows], budget):
        bt = make_batch([seqs.rows[i] for i in group], vectors, layer, token, causal)
        lg = model(bt.vec, bt.layer, bt.pad, bt.block).numpy()
        real = bt.index >= 0
        out[bt.index[real]] = lg[real]
    return out


@dataclass
class MoEBeyondResult:
    model: MoEBeyondNet
    path: Path
    cached: bool
    train_seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def train_moe_beyond(
    vectors: np.ndarray, layer: np.ndarray, token: np.ndarray, true: np.ndarray,
    train: Sequences, val: Sequences, *, vocab: int, num_layers: int, num_experts: int,
    model_cfg: MoEBeyondConfig, train_cfg: MoEBeyondTrainConfig, key: str, directory: Path,
    retrain: bool = False, progress: bool = True, threads: int = 1,
    log: Callable[[str], None] = print,
) -> MoEBeyondResult:
    """Train (or load from the cache under ``key``) the model; seeded, CPU-exact.

    ``vectors`` is the per-row token vector ``[N, D]`` (float) or text id ``[N]`` (int64, with
    ``vocab`` ids); ``true`` the top-k ids ``[N, k]``.
    """
    in_dim = 0 if vocab else int(vectors.shape[1])
    path = directory / f"moe_beyond-{key}.pt"

    def build() -> MoEBeyondNet:
        return MoEBeyondNet(in_dim, vocab, num_layers, num_experts, model_cfg)

    cached = None if retrain else load_cached(path, build, log)
    if cached is not None:
        model, ckpt = cached
        return MoEBeyondResult(model, path, True, float(ckpt["train_seconds"]),
                               int(ckpt["best_epoch"]), list(ckpt["history"]))
    causal = model_cfg.context == "causal"
    y = torch.from_numpy(multi_hot(true, num_experts))
    val_rows = np.concatenate(val.rows) if len(val) else np.zeros(0, dtype=np.int64)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    gen = np.random.default_rng(train_cfg.seed)
    with seeded_training(train_cfg.seed, threads):
        model = build()
        lr = train_cfg.lr
        groups = [
            {"params": [p for p in (*(model.text.parameters() if model.text else ()),
                                    *model.input_proj.parameters(),
                                    *model.layer_embed.parameters()) if p.requires_grad],
             "lr": lr},
            {"params": list(model.encoder.parameters()), "lr": 0.9 * lr},
            {"params": list(model.head.parameters()), "lr": 0.8 * lr},
        ]
        opt = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
        best = BestEpoch(history)
        bar = tqdm(range(train_cfg.epochs), desc="moe_beyond", disable=not progress,
                   unit="epoch", leave=False)
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            perm = gen.permutation(len(train))
            for a in range(0, len(perm), train_cfg.batch_size):
                bt = make_batch([train.rows[i] for i in perm[a : a + train_cfg.batch_size]],
                                vectors, layer, token, causal)
                real = torch.from_numpy(bt.index >= 0)
                logits = model(bt.vec, bt.layer, bt.pad, bt.block)
                target = y[torch.from_numpy(np.where(bt.index >= 0, bt.index, 0))]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logits[real], target[real])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total += loss.item() * int(real.sum())
                count += int(real.sum())
            rec = {"epoch": float(epoch), "train_loss": total / max(count, 1)}
            if len(val_rows):
                lg = predict_logits(model, val, vectors, layer, token, len(layer), causal)
                lg = lg[val_rows]
                rec["val_loss"] = float(nn.functional.binary_cross_entropy_with_logits(
                    torch.from_numpy(lg), y[torch.from_numpy(val_rows)]))
                rec["val_exact"] = exact_rate(lg, true[val_rows])
            best.update(model, epoch, rec, bar)
            if epoch - best.epoch >= train_cfg.patience:
                log(f"early stop after epoch {epoch + 1} (best {best.epoch + 1})")
                break
        model.load_state_dict(best.state)
        model.eval()
    seconds = time.perf_counter() - t0
    save_checkpoint(path, best, seconds, model_cfg, train_cfg, log)
    return MoEBeyondResult(model, path, False, seconds, best.epoch, history)
