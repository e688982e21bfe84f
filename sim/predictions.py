"""Prediction tables as policies see them: predicted expert keys per (step, layer).

Predictors (and importers of published predictions) write tables keyed by (request, token,
layer); the workload decides which tokens run in which step, so the view is built per run.
With batching, a step's prediction for a layer is the union over its tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sim.workload import Workload


class PredictionView:
    """``keys_at(step, layer)``: predicted expert keys, first-predicted first, no duplicates."""

    def __init__(
        self,
        workload: Workload,
        per_request: Mapping[int, np.ndarray],
        available_at: str | None = None,
    ) -> None:
        self.available_at = available_at  # e.g. "pre_attention:same_layer" (table metadata)
        shape = workload.shape
        self.num_steps = workload.num_steps
        self._rows: list[list[list[int]]] = []
        offsets = np.arange(shape.num_layers, dtype=np.int64) * shape.num_experts
        missing = 0
        for s in range(workload.num_steps):
            a, b = int(workload.req_offsets[s]), int(workload.req_offsets[s + 1])
            layers: list[list[int]] = [[] for _ in range(shape.num_layers)]
            for u in range(a, b):
                pred = per_request.get(int(workload.req_ids[u]))
                t0, t1 = int(workload.token_start[u]), int(workload.token_end[u])
                if pred is None or t0 >= pred.shape[0]:
                    missing += 1
                    continue
                block = pred[t0:t1].astype(np.int64)
                keys = np.where(block >= 0, block + offsets[None, :, None], -1)
                for j in range(shape.num_layers):
                    for k in keys[:, j, :].ravel().tolist():
                        if k >= 0 and k not in layers[j]:
                            layers[j].append(k)
            self._rows.append(layers)
        self.missing_units = missing

    def keys_at(self, step: int, layer: int) -> list[int]:
        if step >= self.num_steps:
            return []
        return self._rows[step][layer]
