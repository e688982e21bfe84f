"""Frequency and recency baselines (numpy only): the floor a learned predictor must beat.

Both return a full ranking ``[N, E]`` per row so every metric cut-off (top-k, over-provisioned
top-k', top-10) is defined:

- ``frequency``: per layer, experts by descending count over the *training split* rows (ties:
  lower id first). Known before the run starts (``available_at = "static:any_layer"``).
- ``recency``: the previous token's experts at the same layer of the same request, in their
  router order, then the remaining experts in the frequency order; a request's first token
  falls back to the frequency ranking. Known once the previous token has routed this layer
  (``available_at = "previous_token:same_layer"``), i.e. a whole step ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.predictors.data import Rows


@dataclass(frozen=True)
class FrequencyTable:
    """Per-layer expert counts from the training rows and the ranking they induce."""

    counts: np.ndarray  # int64 [L, E]

    @property
    def order(self) -> np.ndarray:
        """``[L, E]`` expert ids by descending count (stable: lower id first on ties)."""
        return np.argsort(-self.counts, axis=1, kind="stable")


def fit_frequency(
    rows: Rows, mask: np.ndarray, num_layers: int, num_experts: int
) -> FrequencyTable:
    """Count each (layer, expert) over the selected rows."""
    lay = np.repeat(rows.layer[mask], rows.experts.shape[1])
    exp = rows.experts[mask].reshape(-1).astype(np.int64)
    keep = exp >= 0
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    np.add.at(counts, (lay[keep], exp[keep]), 1)
    return FrequencyTable(counts)


def rank_frequency(table: FrequencyTable, rows: Rows, mask: np.ndarray) -> np.ndarray:
    """Frequency ranking ``[n, E]`` of the selected rows."""
    return table.order[rows.layer[mask]].astype(np.int16)


def rank_recency(table: FrequencyTable, rows: Rows, mask: np.ndarray) -> np.ndarray:
    """Previous token's experts first, then the frequency order without them."""
    freq = table.order[rows.layer[mask]]  # [n, E]
    n, e = freq.shape
    prev = rows.prev[mask]
    has_prev = prev >= 0
    first = np.full((n, rows.experts.shape[1]), -1, dtype=np.int64)
    first[has_prev] = rows.experts[prev[has_prev]]
    # Rank key: position inside the previous token's list (0..k-1), else k + frequency position.
    key = np.empty((n, e), dtype=np.int64)
    key[np.arange(n)[:, None], freq] = np.arange(e)[None, :] + first.shape[1]
    for r in range(first.shape[1]):
        ok = first[:, r] >= 0
        key[np.flatnonzero(ok), first[ok, r]] = r
    return np.argsort(key, axis=1, kind="stable").astype(np.int16)
