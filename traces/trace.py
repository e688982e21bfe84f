"""In-memory routing trace: what the simulator and predictors consume.

A trace is a list of requests; each request holds a dense ``[tokens, moe_layers, top_k]`` array of
expert ids (router rank order when known, ``-1`` where a (token, layer) row was not recorded).
Layer axis ``j`` is the j-th entry of ``TraceMeta.moe_layers`` (the model's own layer ids), so
code never has to care whether a source numbered its MoE layers from 0 or 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

PREFILL = 0
DECODE = 1
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class TraceMeta:
    """Model and provenance facts stored in the parquet file's key-value metadata."""

    model: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    dense_layers: tuple[int, ...] = ()
    expert_bytes: int = 0
    source: str = ""
    license: str = ""
    partial: bool = False
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def layer_index(self, layer_id: int) -> int:
        """Dense index (0..L-1) of a model layer id."""
        return self.moe_layers.index(layer_id)


@dataclass
class RequestRouting:
    """Routing of one request: ``experts[t, j, r]`` is the r-th expert of token t at MoE layer j."""

    request_id: int
    experts: np.ndarray  # int16 [T, L, k]; -1 = not recorded
    phase: np.ndarray  # uint8 [T]: PREFILL or DECODE
    scores: np.ndarray | None = None  # float32 [T, L, k]; NaN = not recorded
    tokens: list[str] | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.experts.ndim != 3:
            raise ValueError(f"request {self.request_id}: experts must be [tokens, layers, k]")
        if self.phase.shape != (self.experts.shape[0],):
            raise ValueError(f"request {self.request_id}: phase must have one entry per token")

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])


@dataclass
class Trace:
    """A whole trace held in memory (the DeepSeek training set is ~30 MB this way)."""

    meta: TraceMeta
    requests: list[RequestRouting]

    def __iter__(self) -> Iterator[RequestRouting]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)

    @property
    def num_rows(self) -> int:
        """Recorded (token, layer) rows."""
        return int(sum(np.count_nonzero(r.experts[:, :, 0] >= 0) for r in self.requests))

    def subset(self, max_requests: int | None = None, max_tokens: int | None = None) -> Trace:
        """First requests (and first tokens of each) for quick runs; shares arrays, copies none."""
        reqs = self.requests if max_requests is None else self.requests[:max_requests]
        if max_tokens is not None:
            reqs = [
                RequestRouting(
                    r.request_id,
                    r.experts[:max_tokens],
                    r.phase[:max_tokens],
                    None if r.scores is None else r.scores[:max_tokens],
                    None if r.tokens is None else r.tokens[:max_tokens],
                    r.label,
                )
                for r in reqs
            ]
        return Trace(self.meta, list(reqs))
