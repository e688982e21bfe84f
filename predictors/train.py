"""Training loop and checkpoint cache for the torch predictors.

Checkpoints live in ``$MOESIM_CACHE/predictors`` (default ``~/.cache/moesim/predictors``) under
a key hashed from the model config, the training config, the trace's content hash, the feature
name, the train/val request ids and a code version: a sweep reuses a model trained on the very
same inputs (it never retrains silently; it says it loaded one) and a changed config or trace
never reuses a stale model. Training is seeded (``torch.random.fork_rng``, so the caller's RNG
state is untouched); on the CPU the same seed gives the same weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moesim.predictors.pre_attention import (
    PreAttentionConfig,
    PreAttentionNet,
    rank_matrix,
    ranking_loss,
)
from moesim.traces.cache import cache_root
from moesim.traces.store import atomic_path

CODE_VERSION = 1  # bump when training code changes what a config produces


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the best epoch by validation exact-match is kept."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("need epochs >= 1, batch_size >= 2, lr > 0, weight_decay >= 0")


@dataclass
class TrainResult:
    """A trained (or loaded) model with its provenance."""

    model: PreAttentionNet
    key: str
    path: Path
    cached: bool
    train_seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def cache_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$MOESIM_CACHE/predictors``, else ``~/.cache/moesim/predictors``."""
    if explicit:
        return Path(explicit)
    return cache_root() / "predictors"


def cache_key(payload: dict[str, Any]) -> str:
    """Stable hash of a JSON-able description of everything that shapes the weights."""
    text = json.dumps({**payload, "code_version": CODE_VERSION}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def _batches(
    layer: np.ndarray, idx: np.ndarray, batch: int, gen: np.random.Generator, min_size: int,
    mixed: bool = False,
) -> list[tuple[int, np.ndarray]]:
    """Shuffled batches over rows ``idx``: single-layer ones (layer index, rows) for per-layer
    MLPs, or ``mixed`` ones (-1, rows) for the shared MLP."""
    out: list[tuple[int, np.ndarray]] = []
    if mixed:
        rows = gen.permutation(idx)
        out = [(-1, rows[a : a + batch]) for a in range(0, len(rows), batch)]
        return [b for b in out if len(b[1]) >= min_size]
    for j in np.unique(layer[idx]):
        rows = gen.permutation(idx[layer[idx] == j])
        out.extend((int(j), rows[a : a + batch]) for a in range(0, len(rows), batch))
    out = [b for b in out if len(b[1]) >= min_size]
    order = gen.permutation(len(out))
    return [out[i] for i in order]


@torch.no_grad()
def predict_logits(
    model: PreAttentionNet, x: np.ndarray, layer: np.ndarray, batch: int = 4096
) -> np.ndarray:
    """Logits ``[N, E]`` for rows of any layers (eval mode, batched per layer)."""
    model.eval()
    out: np.ndarray | None = None
    for j in np.unique(layer):
        rows = np.flatnonzero(layer == j)
        for a in range(0, len(rows), batch):
            r = rows[a : a + batch]
            y = model(torch.from_numpy(np.asarray(x[r], dtype=np.float32)), int(j)).numpy()
            if out is None:
                out = np.zeros((len(x), y.shape[1]), dtype=np.float32)
            out[r] = y
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@contextmanager
def seeded_training(seed: int, threads: int) -> Iterator[None]:
    """Run a training loop with ``threads`` torch threads and torch seeded with ``seed``; the
    caller's thread count and RNG state are restored afterwards."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(old_threads)


def multi_hot(true: np.ndarray, num_experts: int) -> np.ndarray:
    """``[N, E]`` float32 targets with a 1 for each expert id in ``true`` (-1 entries ignored)."""
    y = np.zeros((len(true), num_experts + 1), dtype=np.float32)
    y[np.arange(len(true))[:, None], np.where(true >= 0, true, num_experts)] = 1.0
    return y[:, :num_experts]


def load_cached(
    path: Path, build: Callable[[], torch.nn.Module], log: Callable[[str], None]
) -> tuple[Any, dict] | None:
    """The model ``build()`` makes with the checkpoint at ``path`` loaded (eval mode) and the
    checkpoint, or None when there is none. The caller's RNG state is left untouched."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):
        model = build()
    model.load_state_dict(ckpt["state"])
    model.eval()
    log(f"loaded cached model {path} (trained in {ckpt['train_seconds']:.1f} s)")
    return model, ckpt


def save_checkpoint(path: Path, best: BestEpoch, seconds: float, model_cfg: Any,
                    train_cfg: Any, log: Callable[[str], None]) -> None:
    """Write the best epoch's weights and provenance atomically and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state": best.state, "train_seconds": seconds, "best_epoch": best.epoch,
                    "history": best.history, "config": asdict(model_cfg),
                    "train": asdict(train_cfg)}, tmp)
    log(f"trained in {seconds:.1f} s (best epoch {best.epoch + 1}, ran {len(best.history)} of "
        f"{train_cfg.epochs}); saved {path}")


def exact_rate(logits: np.ndarray, true: np.ndarray) -> float:
    """Share of rows whose top-k logits are exactly the true top-k set."""
    k = true.shape[1]
    top = np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)
    return float(np.mean((top == np.sort(true, axis=1)).all(axis=1))) if len(true) else 0.0


class BestEpoch:
    """Epoch bookkeeping shared by the training loops: history, progress bar, and the weights
    of the best epoch by (validation exact-match, -validation loss), or the last epoch when
    there is no validation split."""

    def __init__(self, history: list[dict[str, float]]) -> None:
        self.history = history
        self.score: tuple[float, float] | None = None
        self.epoch = 0
        self.state: dict[str, torch.Tensor] = {}

    def update(self, model: torch.nn.Module, epoch: int, rec: dict[str, float],
               bar: tqdm) -> None:
        val = "val_exact" in rec
        score = (rec["val_exact"], -rec["val_loss"]) if val else (float(epoch), 0.0)
        self.history.append(rec)
        bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k != "epoch"})
        if self.score is None or score > self.score:
            self.score, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_pre_attention(
    x: np.ndarray,
    layer: np.ndarray,
    true: np.ndarray,
    ranks: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    num_layers: int,
    num_experts: int,
    model_cfg: PreAttentionConfig,
    train_cfg: TrainConfig,
    key: str,
    directory: Path,
    retrain: bool = False,
    progress: bool = True,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or load from the cache) a pre-attention predictor.

    ``ranks`` is the true rank of every expert ``[N, E]`` (see :func:`rank_matrix`); ``true``
    the top-k ids. Selection: the epoch with the best validation exact-match (lower validation
    loss on ties); with no validation rows, the last epoch. ``threads``: torch intra-op threads
    while training (restored after); 1 is fastest for these small matrices on a shared CPU.
    """
    model_cfg.check()
    train_cfg.check()
    d = x.shape[1]
    path = directory / f"pre_attention-{key}.pt"
    cached = None if retrain else load_cached(
        path, lambda: PreAttentionNet(d, num_layers, num_experts, model_cfg), log
    )
    if cached is not None:
        model, ckpt = cached
        return TrainResult(
            model, key, path, True, float(ckpt["train_seconds"]), int(ckpt["best_epoch"]),
            list(ckpt["history"]),
        )
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    rt = torch.from_numpy(np.asarray(ranks, dtype=np.int64))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        model, best = _fit(
            xt, rt, x, layer, true, ranks, train_idx, val_idx, d, num_layers, num_experts,
            model_cfg, train_cfg, history, progress,
        )
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    save_checkpoint(path, best, seconds, model_cfg, train_cfg, log)
    return TrainResult(model, key, path, False, seconds, best.epoch, history)


def _fit(
    xt: torch.Tensor, rt: torch.Tensor, x: np.ndarray, layer: np.ndarray, true: np.ndarray,
    ranks: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, d: int, num_layers: int,
    num_experts: int, model_cfg: PreAttentionConfig, train_cfg: TrainConfig,
    history: list[dict[str, float]], progress: bool,
) -> tuple[PreAttentionNet, BestEpoch]:
    """The seeded epoch loop; returns the best model and its epoch bookkeeping."""
    top_k = true.shape[1]
    lt = torch.from_numpy(np.asarray(layer, dtype=np.int64))
    gen = np.random.default_rng(train_cfg.seed)
    min_size = 2 if model_cfg.arch == "bn_gelu" else 1  # BatchNorm needs 2 rows in training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        model = PreAttentionNet(d, num_layers, num_experts, model_cfg)
        opt = torch.optim.AdamW(
            model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        best = BestEpoch(history)
        bar = tqdm(range(train_cfg.epochs), desc="pre_attention", disable=not progress,
                   unit="epoch", leave=False)
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            batches = _batches(layer, train_idx, train_cfg.batch_size, gen, min_size,
                               mixed=not model_cfg.per_layer)
            for j, rows in batches:
                r = torch.from_numpy(rows)
                which = lt[r] if j < 0 else j
                loss = ranking_loss(model(xt[r], which), rt[r], top_k, model_cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(rows)
                count += len(rows)
            rec = {"epoch": float(epoch), "train_loss": total / max(count, 1)}
            if len(val_idx):
                logits = predict_logits(model, x[val_idx], layer[val_idx])
                with torch.no_grad():
                    vl = float(_val_loss(logits, ranks[val_idx], layer[val_idx], top_k, model_cfg))
                rec["val_loss"] = vl
                rec["val_exact"] = exact_rate(logits, true[val_idx])
            best.update(model, epoch, rec, bar)
        model.load_state_dict(best.state)
        model.eval()
    return model, best


def _val_loss(
    logits: np.ndarray, ranks: np.ndarray, layer: np.ndarray, top_k: int, cfg: PreAttentionConfig
) -> float:
    del layer  # the loss is per row; kept for symmetry with training batches
    return float(ranking_loss(torch.from_numpy(logits), torch.from_numpy(ranks.astype(np.int64)),
                              top_k, cfg))


def ranks_from(true: np.ndarray, num_experts: int, full_logits: np.ndarray | None) -> np.ndarray:
    """Numpy wrapper of :func:`rank_matrix` (int16 ``[N, E]``)."""
    t = torch.from_numpy(true.astype(np.int64))
    lg = None if full_logits is None else torch.from_numpy(full_logits.astype(np.float32))
    return rank_matrix(t, num_experts, lg).numpy().astype(np.int16)
