"""The model the executor runs: a model card shrunk by ``scale``, and its expert file layout.

``scale`` multiplies hidden, expert/shared/dense intermediate sizes and the attention head width
(head count kept), rounded; ``dtype`` replaces the card's, so the scaled
card's ``expert_bytes`` is exactly what one copy moves and what the simulator is told. No torch
here: the simulator side of a validation needs the scaled card too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from traces.model_card import DTYPE_BYTES, ModelCard

PAGE = 4096
EXECUTOR_DTYPES = ("float32", "bfloat16")


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def _scaled(x: int, scale: float) -> int:
    return max(1, round(x * scale)) if x > 0 else 0


def scaled_card(card: ModelCard, scale: float, dtype: str = "float32") -> ModelCard:
    """``card`` with every width times ``scale`` and weights in ``dtype``.

    The same shapes and name as ``hw_profiles.cpu_ops.scaled_card`` (which needs torch; this
    one must not, the simulator side of a validation uses it): a measured profile's table for
    the card applies when its ``measured_at`` shape matches.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"executor scale must be in (0, 1], got {scale}")
    if dtype not in EXECUTOR_DTYPES:
        raise ValueError(f"executor dtype must be one of {EXECUTOR_DTYPES}, got {dtype!r}")
    return replace(
        card,
        hidden_size=_scaled(card.hidden_size, scale),
        moe_intermediate_size=_scaled(card.moe_intermediate_size, scale),
        shared_intermediate_size=_scaled(card.shared_intermediate_size, scale),
        dense_intermediate_size=_scaled(card.dense_intermediate_size, scale),
        head_dim=_scaled(card.head_dim, scale),
        dtype=dtype,
    )


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
