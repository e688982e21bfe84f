"""The model the executor runs: a model card shrunk by ``scale``, and its expert file layout.

``scale`` multiplies hidden, expert/shared/dense intermediate sizes and the attention head width
(head count kept), rounded; ``dtype`` replaces the card's, so the scaled
card's ``expert_bytes`` is exactly what one copy moves and what the simulator is told. No torch
here: the simulator side of a validation needs the scaled card too.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.hw_profiles.direct_io import BLOCK, round_up
from moesim.traces.model_card import DTYPE_BYTES, ModelCard

PAGE = BLOCK  # experts are page-aligned records in the file and the slot pool
EXECUTOR_DTYPES = ("float32", "bfloat16")


def scaled_card(card: ModelCard, scale: float, dtype: str = "float32") -> ModelCard:
    """``card.scaled(scale, dtype)`` (ModelCard.scaled: the profiler's shrinking rule, torch-
    free, so the simulator side of a validation can use it) for a dtype the executor stores."""
    if dtype not in EXECUTOR_DTYPES:
        raise ValueError(f"executor dtype must be one of {EXECUTOR_DTYPES}, got {dtype!r}")
    return card.scaled(scale, dtype)


@dataclass(frozen=True)
class ExpertLayout:
    """Where each expert lives in the weights file: gate [I, H], up [I, H], down [H, I], in that
    order and contiguous, each expert padded to a whole page so O_DIRECT can read it."""

    num_keys: int
    hidden: int
    intermediate: int
    dtype: str

    @classmethod
    def of(cls, card: ModelCard) -> ExpertLayout:
        if card.dtype not in EXECUTOR_DTYPES:
            raise ValueError(f"executor runs {EXECUTOR_DTYPES} weights, card has {card.dtype!r}")
        if not card.gated:
            raise ValueError("the executor computes SwiGLU experts (gated cards only)")
        return cls(card.routed_experts_total, card.hidden_size, card.moe_intermediate_size,
                   card.dtype)

    @property
    def elem_bytes(self) -> int:
        return int(DTYPE_BYTES[self.dtype])

    @property
    def matrix_elems(self) -> int:
        return self.hidden * self.intermediate

    @property
    def expert_bytes(self) -> int:
        return 3 * self.matrix_elems * self.elem_bytes

    @property
    def stride(self) -> int:
        """Bytes between two experts in the file and in the slot pool (page-rounded)."""
        return round_up(self.expert_bytes)

    @property
    def file_bytes(self) -> int:
        return self.num_keys * self.stride

    def offset(self, key: int) -> int:
        return key * self.stride
