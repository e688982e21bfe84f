"""Compute time per (model card, hardware profile): roofline fallback, measured tables override.

Roofline: each op takes ``max(bytes / memory_bandwidth, flops / fp16_throughput)`` with the
profile's *effective* figures (measured when the profile has them, else spec x efficiency).

Why measured tables matter: the pre-attention paper (S30) measured 6.2-10.3 ms of expert compute
per DeepSeek-V2-Lite layer on V100/A100, while bytes / bandwidth gives ~0.15 ms (V100) or
~0.07 ms (A100). Eager per-expert loops are dominated by fixed per-module cost, which no roofline
sees. A measured table therefore anchors the time at the measured batch (or context) and only
the *growth* beyond the last measured point comes from the roofline ("additive" calibration):

    t(x) = interpolate(measured, x)                         inside the measured range
    t(x) = t(x_last) + roofline(x) - roofline(x_last)       beyond it
    t(x) = t(x_first)                                       below it
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moesim.traces.model_card import DTYPE_BYTES, ModelCard

from .schema import (
    Ctx,
    Quantity,
    as_mapping,
    as_number,
    as_str,
    missing,
    quantity,
    reject_unknown,
    table_quantity,
)

Points = tuple[tuple[float, float], ...]

MEASURED_FIELDS: tuple[str, ...] = (
    "pre_attn_norm_s",
    "attention_s",
    "post_attn_norm_s",
    "router_s",
    "expert_s",
    "shared_s",
    "experts_layer_s",
    "dense_layer_s",
    "dense_ffn_s",
)

# Shape a table was measured at (``measured_at``): a table applies to a card only if these match,
# so a profile measured on a scaled card never silently times the full-size one.
SHAPE_KEYS: tuple[str, ...] = (
    "hidden_size",
    "moe_intermediate_size",
    "shared_intermediate_size",
    "dense_intermediate_size",
    "head_dim",
)
MEASURED_AT_KEYS = frozenset({*SHAPE_KEYS, "dtype", "scale", "torch_threads", "base_card"})


@dataclass(frozen=True)
class MeasuredTable:
    """Measured per-layer times for one model card on one profile (seconds, batch 1 unless a
    list is given). ``attention_s`` as a list is ``[[context, s], ...]``; the other lists are
    ``[[batch_or_tokens, s], ...]``. ``experts_layer_s`` is all routed (top_k) plus shared
    expert compute of one layer at batch 1, split by weight bytes when ``expert_s``/``shared_s``
    are absent."""

    card: str
    pre_attn_norm_s: Quantity = field(default_factory=lambda: missing("pre_attn_norm_s"))
    attention_s: Quantity = field(default_factory=lambda: missing("attention_s"))
    post_attn_norm_s: Quantity = field(default_factory=lambda: missing("post_attn_norm_s"))
    attention_context: Quantity = field(default_factory=lambda: missing("attention_context"))
    router_s: Quantity = field(default_factory=lambda: missing("router_s"))
    expert_s: Quantity = field(default_factory=lambda: missing("expert_s"))
    shared_s: Quantity = field(default_factory=lambda: missing("shared_s"))
    experts_layer_s: Quantity = field(default_factory=lambda: missing("experts_layer_s"))
    dense_layer_s: Quantity = field(default_factory=lambda: missing("dense_layer_s"))
    dense_ffn_s: Quantity = field(default_factory=lambda: missing("dense_ffn_s"))
    notes: str = ""
    measured_at: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def mismatch(self, card: ModelCard) -> str:
        """Why this table does not describe ``card`` ("" if it does, or if no shape is given)."""
        diffs = [f"{k} {self.measured_at[k]} vs the card's {getattr(card, k)}"
                 for k in SHAPE_KEYS if k in self.measured_at
                 and int(self.measured_at[k]) != int(getattr(card, k))]
        if "dtype" in self.measured_at and self.measured_at["dtype"] != card.dtype:
            diffs.append(f"dtype {self.measured_at['dtype']} vs the card's {card.dtype}")
        if not diffs:
            return ""
        return "measured at another shape (" + "; ".join(diffs) + ")"


def _measured_at(ctx: Ctx, raw: Any) -> dict[str, Any]:
    """Validate the plain shape mapping a table was measured at (not quantities: settings)."""
    data = as_mapping(ctx, raw) or {}
    reject_unknown(ctx, data, MEASURED_AT_KEYS)
    out: dict[str, Any] = {}
    for key, value in data.items():
        kctx = ctx.sub(str(key))
        if key in ("dtype", "base_card"):
            out[key] = as_str(kctx, value, required=True)
            if key == "dtype" and value not in DTYPE_BYTES:
                raise kctx.error(f"must be one of {sorted(DTYPE_BYTES)}", value)
            continue
        x = as_number(kctx, value)
        if key == "scale":
            if not 0 < x <= 1:
                raise kctx.error("must be in (0, 1]", value)
        elif x != int(x) or x < (1 if key in ("hidden_size", "torch_threads") else 0):
            raise kctx.error("must be a whole number (>= 1 for hidden_size, torch_threads)",
                             value)
        out[key] = x if key == "scale" else int(x)
    return out


def parse_measured_table(ctx: Ctx, card: str, data: Mapping[str, Any]) -> MeasuredTable:
    reject_unknown(ctx, data, {*MEASURED_FIELDS, "attention_context", "notes", "measured_at"})
    ctx_q = quantity(ctx.sub("attention_context"), data.get("attention_context"), "count")
    values: dict[str, Quantity] = {}
    for name in MEASURED_FIELDS:
        scalar_x = 1.0
        if name == "attention_s":
            scalar_x = float(ctx_q.value) if ctx_q.known else 0.0
        values[name] = table_quantity(ctx.sub(name), data.get(name), scalar_x=scalar_x)
    layer = values["experts_layer_s"]
    if layer.known and len(layer.value) != 1:
        raise ctx.sub("experts_layer_s").error(
            "must be one number (all experts of a layer at batch 1); give per-batch lists as "
            "expert_s / shared_s instead", data.get("experts_layer_s"))
    notes = as_str(ctx.sub("notes"), data.get("notes"))
    measured_at = _measured_at(ctx.sub("measured_at"), data.get("measured_at"))
    return MeasuredTable(card=card, attention_context=ctx_q, notes=notes,
                         measured_at=measured_at, **values)


def _anchored(points: Points, x: float, roof: Callable[[float], float]) -> float:
    """Measured points inside their range, roofline growth beyond it (see module doc)."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        x_last, y_last = points[-1]
        return y_last + max(0.0, roof(x) - roof(x_last))
    i = bisect_right(xs, x) - 1
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class ComputeModel:
    """All times in seconds, per layer. Batch/tokens <= 0 cost nothing."""

    card: ModelCard
    memory_bandwidth_Bps: float  # effective (measured, or spec x efficiency)
    flops: float  # effective fp16/bf16 tensor throughput
    measured: MeasuredTable | None = None
    profile: str = ""
    skipped: str = ""  # why a table for this card's name was not used (shape mismatch)

    def __post_init__(self) -> None:
        if self.memory_bandwidth_Bps <= 0 or self.flops <= 0:
            raise ValueError("ComputeModel needs positive memory bandwidth and flops")

    # ---- roofline pieces ------------------------------------------------------------------

    def _roof(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.memory_bandwidth_Bps, flops / self.flops)

    @property
    def _attn_dims(self) -> tuple[int, int]:
        """(query width, kv width); unknown heads fall back to multi-head attention of width H."""
        c = self.card
        if c.num_attention_heads > 0 and c.head_dim > 0:
            q = c.num_attention_heads * c.head_dim
            kv = (c.num_kv_heads or c.num_attention_heads) * c.head_dim
            return q, kv
        return c.hidden_size, c.hidden_size

    def roofline_attention(self, batch: float, context: float) -> float:
        """Q/K/V/O projections + reading the KV cache + two RMSNorms (MLA treated as MHA)."""
        if batch <= 0:
            return 0.0
        h, db = self.card.hidden_size, self.card.dtype_bytes  # activations, norms, KV cache
        wb = self.card.attention_weight_bytes
        q, kv = self._attn_dims
        proj = 2 * h * q + 2 * h * kv
        nbytes = proj * wb + 2 * h * db + batch * max(context, 0) * 2 * kv * db
        flops = 2 * batch * proj + 4 * batch * max(context, 0) * q
        return self._roof(nbytes, flops)

    def roofline_router(self, batch: float) -> float:
        if batch <= 0:
            return 0.0
        params = self.card.hidden_size * self.card.num_experts
        return self._roof(params * self.card.attention_weight_bytes, 2 * batch * params)

    def _roofline_mlp(self, intermediate: int, tokens: float, weight_bytes: float) -> float:
        if tokens <= 0 or intermediate <= 0:
            return 0.0
        params = self.card.matrices_per_expert * self.card.hidden_size * intermediate
        return self._roof(params * weight_bytes, 2 * tokens * params)

    def roofline_expert(self, tokens: float) -> float:
        return self._roofline_mlp(self.card.moe_intermediate_size, tokens,
                                  self.card.expert_weight_bytes)

    def roofline_shared(self, tokens: float) -> float:
        return self._roofline_mlp(self.card.shared_intermediate_size, tokens,
                                  self.card.shared_weight_bytes)

    def roofline_dense_ffn(self, batch: float) -> float:
        return self._roofline_mlp(self.card.dense_intermediate_size, batch,
                                  self.card.attention_weight_bytes)

    # ---- measured lookups -----------------------------------------------------------------

    def _points(self, name: str) -> Points | None:
        if self.measured is None:
            return None
        q: Quantity = getattr(self.measured, name)
        return q.value if q.known else None

    def _expert_share(self) -> tuple[float, float] | None:
        """Per-expert and shared seconds at batch 1 from a whole-layer ``experts_layer_s``."""
        pts = self._points("experts_layer_s")
        if pts is None:
            return None
        c = self.card
        total = c.top_k * c.expert_bytes + c.shared_bytes_per_layer
        layer = pts[0][1]
        return layer * c.expert_bytes / total, layer * c.shared_bytes_per_layer / total

    def _expert_points(self) -> Points | None:
        pts = self._points("expert_s")
        if pts is None and (share := self._expert_share()) is not None:
            pts = ((1.0, share[0]),)
        return pts

    def _norms(self, batch: int) -> float:
        total = 0.0
        for name in ("pre_attn_norm_s", "post_attn_norm_s"):
            pts = self._points(name)
            if pts is not None:
                total += _anchored(pts, batch, lambda _b: 0.0)
        return total

    # ---- the interface the simulator calls ------------------------------------------------

    def attention_time(self, batch: int, context: int) -> float:
        """Per MoE layer: pre-attention norm + attention + post-attention norm."""
        if batch <= 0:
            return 0.0
        pts = self._points("attention_s")
        if pts is None:
            return self.roofline_attention(batch, context) + self._norms(batch)
        at_b1 = _anchored(pts, context, lambda c: self.roofline_attention(1, c))
        growth = self.roofline_attention(batch, context) - self.roofline_attention(1, context)
        return at_b1 + growth + self._norms(batch)

    def router_time(self, batch: int) -> float:
        if batch <= 0:
            return 0.0
        pts = self._points("router_s")
        if pts is None:
            return self.roofline_router(batch)
        return _anchored(pts, batch, self.roofline_router)

    def expert_time(self, tokens: int) -> float:
        """One routed expert FFN over ``tokens`` tokens."""
        if tokens <= 0:
            return 0.0
        pts = self._expert_points()
        if pts is None:
            return self.roofline_expert(tokens)
        return _anchored(pts, tokens, self.roofline_expert)

    def shared_time(self, tokens: int) -> float:
        """All shared experts of one layer (0 if the model has none)."""
        if tokens <= 0 or self.card.shared_intermediate_size <= 0:
            return 0.0
        pts = self._points("shared_s")
        if pts is None and (share := self._expert_share()) is not None:
            pts = ((1.0, share[1]),)
        if pts is None:
            return self.roofline_shared(tokens)
        return _anchored(pts, tokens, self.roofline_shared)

    def mlp_overhead(self) -> float:
        """Fixed per-MLP cost implied by a measured expert time (0 without one)."""
        pts = self._expert_points()
        if pts is None:
            return 0.0
        return max(0.0, _anchored(pts, 1, self.roofline_expert) - self.roofline_expert(1))

    def dense_layer_time(self, batch: int, context: int) -> float:
        """A whole non-MoE layer: attention + dense FFN.

        Without a measured ``dense_layer_s`` the dense FFN is its roofline plus the same fixed
        per-MLP cost that a measured expert time implies (one MLP module, one overhead).
        """
        if batch <= 0:
            return 0.0
        ffn_pts = self._points("dense_ffn_s")
        if ffn_pts is not None:  # measured dense FFN: the layer is attention + that FFN
            ffn = 0.0
            if self.card.dense_intermediate_size > 0:
                ffn = _anchored(ffn_pts, batch, self.roofline_dense_ffn)
            return self.attention_time(batch, context) + ffn
        pts = self._points("dense_layer_s")
        if pts is None:
            ffn = self.roofline_dense_ffn(batch)
            if ffn > 0:
                ffn += self.mlp_overhead()
            return self.attention_time(batch, context) + ffn
        ref_c = float(self.measured.attention_context.value or 0) if self.measured else 0.0
        roof = self.roofline_attention(batch, context) + self.roofline_dense_ffn(batch)
        at_b = _anchored(
            pts, batch, lambda b: self.roofline_attention(b, ref_c) + self.roofline_dense_ffn(b)
        )
        ctx_growth = self.roofline_attention(batch, context) - self.roofline_attention(batch, ref_c)
        return max(at_b + ctx_growth, roof)

    def calibration(self) -> dict[str, str]:
        """Which ops come from a measured table (with its source) and which from the roofline."""
        out: dict[str, str] = {}
        ops = {
            "attention": ("attention_s",),
            "router": ("router_s",),
            "expert": ("expert_s", "experts_layer_s"),
            "shared": ("shared_s", "experts_layer_s"),
            "dense_layer": ("dense_ffn_s", "dense_layer_s"),
        }
        for op, names in ops.items():
            out[op] = f"roofline ({self.skipped})" if self.skipped else "roofline"
            for name in names:
                if self._points(name) is not None and self.measured is not None:
                    q: Quantity = getattr(self.measured, name)
                    out[op] = f"{q.kind} ({name}: {q.source})"
                    break
        return out


@dataclass(frozen=True)
class ScaledCompute:
    """What-if: every compute time of ``base`` multiplied by ``factor``.

    Roofline compute is the fastest a kernel can be; real runtimes add fixed per-module cost
    (the pre-attention paper measured DeepSeek-V2-Lite's experts at ~100x their roofline on an
    A100, see ``a100_pcie.yaml``). ``moesim-sim compute_scale=...`` sweeps that factor to find
    where a setting turns from link-bound (prefetch timing cannot matter) to compute-bound
    (demand copies already hide behind compute). It changes no copy time.
    """

    base: Any  # a ComputeModel or anything with the same five *_time methods
    factor: float

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"compute scale must be > 0, got {self.factor}")

    def attention_time(self, batch: int, context: int) -> float:
        return self.factor * self.base.attention_time(batch, context)

    def router_time(self, batch: int) -> float:
        return self.factor * self.base.router_time(batch)

    def expert_time(self, tokens: int) -> float:
        return self.factor * self.base.expert_time(tokens)

    def shared_time(self, tokens: int) -> float:
        return self.factor * self.base.shared_time(tokens)

    def dense_layer_time(self, batch: int, context: int) -> float:
        return self.factor * self.base.dense_layer_time(batch, context)
