"""Speculative next-layer pre-loading with a given recall: the true experts of layer l+d, each
kept with probability ``recall`` (one seeded draw per routed expert, made when the run starts),
queued at a chosen point of layer l.

Why: systems such as mixtral-offloading guess layer l+1's experts by applying its gate to layer
l's hidden state; the guess finds most of the experts, not all. ``oracle_prefetch`` is the
recall-1 bound and overstates what such a pre-loader saves; this policy keeps the timing and
the lead and drops each true expert with probability 1 - recall. It issues no wrong guesses
(their cost, wasted copies on the link, is not modelled: precision is taken as 1).
Knows: oracle (the true future, thinned). Its thinned table is drawn once, so the compiled
engine replays it as ``oracle_prefetch`` over that table, equal run for run.
"""

from __future__ import annotations

import numpy as np

from moesim.policies.base import PolicyError
from moesim.policies.oracle_prefetch import OraclePrefetch
from moesim.policies.registry import register_prefetch


@register_prefetch
class SpeculativePrefetch(OraclePrefetch):
    """Next-layer prefetch of the true experts, each kept with probability ``recall``."""

    name = "speculative_prefetch"
    params = {"point": "demand_issued", "lookahead": 1, "recall": 0.8}

    def __init__(self, setup):
        super().__init__(setup)
        recall = float(setup.params.get("recall", 0.8))
        if not 0.0 <= recall <= 1.0:
            raise PolicyError(f"speculative_prefetch: recall must be in [0, 1], got {recall}")
        self.recall = recall
        self.table: np.ndarray = self.thin(setup.rng, recall, setup.future.keys)

    @staticmethod
    def thin(rng: np.random.Generator, recall: float, keys: np.ndarray,
             width: int | None = None) -> np.ndarray:
        """``keys`` (``[steps, layers, k]``, -1 padded) with each kept with probability
        ``recall``: one draw per slot of ``[steps, layers, width]`` in order, ``width`` the
        run's widest step (default: ``keys``' own). A streamed run thins chunk by chunk with
        the run's width, so its draws are the in-memory table's wherever the chunks are cut."""
        width = keys.shape[2] if width is None else width
        if keys.shape[2] > width:
            raise ValueError(f"keys {keys.shape[2]} wide, beyond the run's widest step {width}")
        drop = rng.random((keys.shape[0], keys.shape[1], width)) >= recall
        return np.where(drop[:, :, :keys.shape[2]], np.int32(-1), keys).astype(keys.dtype)

    def issue(self, ctx, layer: int) -> None:
        num_layers = ctx.shape.num_layers
        step, target = divmod(ctx.clock.step * num_layers + layer + self._ahead, num_layers)
        if step >= self.table.shape[0]:
            return
        row = self.table[step, target]
        kept = row[row >= 0].tolist()
        if kept:
            ctx.prefetch(kept)
