"""Model cards: the shapes of an MoE model that the simulator needs.

A card is one YAML file in ``traces/models/``. Expert and shared-expert bytes are derived from
the shapes and the dtype, never typed in, so a card cannot disagree with itself. Values that
could not be verified against an official config are listed under ``unverified``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

MODELS_DIR = Path(__file__).parent / "models"

DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}


class ModelCardError(ValueError):
    """A model card is missing a field or has a value out of range."""


@dataclass(frozen=True)
class ModelCard:
    """Shapes of one MoE model. Layer ids are the model's own decoder-layer indices."""

    name: str
    hf_id: str
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0  # total over all shared experts of one layer
    dense_intermediate_size: int = 0
    num_attention_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    dtype: str = "bfloat16"
    gated: bool = True  # SwiGLU experts have 3 matrices (gate, up, down); ReLU experts 2
    # Bits per weight of a quantised deployment, per component (fractional: a format's scales
    # and zeros included, e.g. 2.6 for HQQ 2-bit with group 16, 4.5 for Q4_K_M); None: the
    # card's dtype. Activations and the KV cache stay in ``dtype``.
    experts_bits: float | None = None
    attention_bits: float | None = None  # attention, router and dense-FFN weights
    shared_bits: float | None = None  # shared experts (None: as the routed experts)
    unverified: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "num_layers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelCardError(f"model card {self.name!r}: {name} must be > 0")
        if self.top_k > self.num_experts:
            raise ModelCardError(f"model card {self.name!r}: top_k > num_experts")
        if self.dtype not in DTYPE_BYTES:
            raise ModelCardError(
                f"model card {self.name!r}: dtype {self.dtype!r} not one of {sorted(DTYPE_BYTES)}"
            )
        for name in ("experts_bits", "attention_bits", "shared_bits"):
            bits = getattr(self, name)
            if bits is not None and not (isinstance(bits, (int, float)) and 0 < bits <= 32):
                raise ModelCardError(
                    f"model card {self.name!r}: {name} must be a number in (0, 32], got {bits!r}")
        if not self.moe_layers or any(not 0 <= x < self.num_layers for x in self.moe_layers):
            raise ModelCardError(
                f"model card {self.name!r}: moe_layers must be non-empty ids in [0, num_layers)"
            )
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise ModelCardError(f"model card {self.name!r}: moe_layers must be ascending, unique")

    @property
    def matrices_per_expert(self) -> int:
        return 3 if self.gated else 2

    @property
    def expert_params(self) -> int:
        return self.matrices_per_expert * self.hidden_size * self.moe_intermediate_size

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_weight_bytes(self) -> float:
        """Bytes per routed-expert weight: ``experts_bits / 8``, else the dtype's width."""
        return self.dtype_bytes if self.experts_bits is None else self.experts_bits / 8

    @property
    def attention_weight_bytes(self) -> float:
        """Bytes per attention / router / dense-FFN weight."""
        return self.dtype_bytes if self.attention_bits is None else self.attention_bits / 8

    @property
    def shared_weight_bytes(self) -> float:
        """Bytes per shared-expert weight (as the routed experts unless given)."""
        return self.expert_weight_bytes if self.shared_bits is None else self.shared_bits / 8

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (no biases, no router)."""
        return int(self.expert_params * self.expert_weight_bytes)

    @property
    def shared_bytes_per_layer(self) -> int:
        return int(
            self.matrices_per_expert
            * self.hidden_size
            * self.shared_intermediate_size
            * self.shared_weight_bytes
        )

    def with_weights(self, experts_bits: float | None = None,
                     attention_bits: float | None = None,
                     shared_bits: float | None = None) -> ModelCard:
        """This card deployed in a quantised format: the given components' bits per weight
        replaced (None keeps the card's own). One place that turns a published setup's weight
        format (HQQ 2-bit experts with 4-bit attention, Q4_K_M, ...) into bytes."""
        changes = {k: float(v) for k, v in (("experts_bits", experts_bits),
                                           ("attention_bits", attention_bits),
                                           ("shared_bits", shared_bits)) if v is not None}
        return replace(self, **changes) if changes else self

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def routed_experts_total(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def routed_bytes_total(self) -> int:
        return self.routed_experts_total * self.expert_bytes

    def scaled(self, scale: float, dtype: str | None = None) -> ModelCard:
        """This card (same name) with hidden, routed/shared/dense intermediate sizes and the
        head width times ``scale`` (head counts kept; rounded, at least 1 where non-zero) and
        weights in ``dtype`` (default: the card's). One shrinking rule for the profiler
        (``hw_profiles.cpu_ops``) and the executor, so a measured table's ``measured_at`` shape
        matches the card the executor runs."""
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        dtype = dtype or self.dtype

        def s(n: int) -> int:
            return max(1, round(n * scale)) if n > 0 else 0

        return replace(
            self,
            hidden_size=s(self.hidden_size),
            moe_intermediate_size=s(self.moe_intermediate_size),
            shared_intermediate_size=s(self.shared_intermediate_size),
            dense_intermediate_size=s(self.dense_intermediate_size),
            head_dim=s(self.head_dim),
            dtype=dtype,
            notes=f"{self.notes} [scaled x{scale:g} to {dtype}]",
        )


def _moe_layers_from(spec: Any, num_layers: int, where: str) -> tuple[int, ...]:
    """Accept an explicit list, or ``{first: a, step: s}`` (every s-th layer from a)."""
    if isinstance(spec, Mapping):
        first = int(spec.get("first", 0))
        step = int(spec.get("step", 1))
        last = int(spec.get("last", num_layers - 1))
        if step <= 0:
            raise ModelCardError(f"{where}: moe_layers.step must be > 0")
        return tuple(range(first, last + 1, step))
    if isinstance(spec, (list, tuple)):
        return tuple(int(x) for x in spec)
    raise ModelCardError(f"{where}: moe_layers must be a list or {{first, step, last}}")


def card_from_mapping(data: Mapping[str, Any], where: str = "<mapping>") -> ModelCard:
    """Build a card from a parsed YAML/OmegaConf mapping, with one clear error on bad input."""
    data = dict(data)
    known = {f.name for f in fields(ModelCard)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelCardError(f"{where}: unknown field(s) {unknown}")
    for required in ("name", "hidden_size", "moe_intermediate_size", "num_experts", "top_k",
                     "num_layers", "moe_layers"):
        if data.get(required) is None:
            raise ModelCardError(f"{where}: field {required!r} is required")
    data["moe_layers"] = _moe_layers_from(data["moe_layers"], int(data["num_layers"]), where)
    for key in ("unverified", "sources"):
        data[key] = tuple(data.get(key) or ())
    data.setdefault("hf_id", "")
    data["extra"] = dict(data.get("extra") or {})
    try:
        return ModelCard(**data)
    except TypeError as exc:  # wrong value types from YAML
        raise ModelCardError(f"{where}: {exc}") from None


def load_card(name_or_path: str | Path) -> ModelCard:
    """Load a card by name (``deepseek_v2_lite``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODELS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ModelCardError(
            f"model card {str(name_or_path)!r} not found; known cards: {', '.join(list_cards())}"
        )
    with path.open() as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, Mapping):
        raise ModelCardError(f"{path}: expected a mapping at top level")
    return card_from_mapping(data, where=str(path))


def list_cards() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
