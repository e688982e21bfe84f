"""Find the MoE hook points of a transformers model from its module structure.

Why not a table of module names per checkpoint: new MoE models appear monthly and the names
move between transformers releases. Instead:

1. The router is the module class a model declares as the source of ``router_logits`` in its
   ``_can_record_outputs`` (transformers >= 4.56 "output capturing"; this is what
   ``output_router_logits=True`` reads), or, failing that, a child named ``gate``/``router`` of
   a module that also has an ``experts`` child.
2. The layer is the router's index in the outermost ``nn.ModuleList`` on its module path
   (``model.layers.N`` / ``encoder.block.N``). Several stacks (encoder, decoder) get flat ids:
   encoder first, then decoder, so decoder block i is ``len(encoder) + i``.
3. The pre-attention norm is the layer's ``input_layernorm`` child, or else the first
   normalisation module of the layer that is not inside an attention module.
4. The router's *input* (a forward pre-hook) is the MoE block input, i.e. the
   post-attention-norm hidden state, whatever the block calls it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moesim.traces.collect.errors import CollectError

ROUTER_NAMES = ("gate", "router")


@dataclass
class MoELayer:
    """Hook points of one MoE layer."""

    layer_id: int  # flat id (encoder then decoder)
    stack: str  # "decoder" for decoder-only models, else "encoder" / "decoder"
    router_name: str
    router: nn.Module
    logits_index: int | None  # position of the logits in the router's output tuple
    pre_attn_norm: nn.Module | None
    num_experts: int
    weight: torch.Tensor  # [E, d] router weight


@dataclass
class ModelLayout:
    """All MoE layers plus what the trace metadata needs about the rest of the model."""

    moe: list[MoELayer]
    dense_layers: tuple[int, ...]
    stacks: dict[str, tuple[int, int]]  # stack name -> (first flat id, count)
    num_experts: int
    router_class: str
    how_found: str
    notes: dict[str, str] = field(default_factory=dict)


def _declared_router_classes(model: nn.Module) -> list[tuple[type, int]]:
    """(class, index) pairs a model declares for ``router_logits`` via ``_can_record_outputs``."""
    found: list[tuple[type, int]] = []
    for mod in model.modules():
        spec = getattr(type(mod), "_can_record_outputs", None) or {}
        rec = spec.get("router_logits") if isinstance(spec, dict) else None
        if rec is None:
            continue
        for r in rec if isinstance(rec, (list, tuple)) else [rec]:
            cls = getattr(r, "target_class", None)
            if isinstance(cls, type) and (cls, int(getattr(r, "index", 0))) not in found:
                found.append((cls, int(getattr(r, "index", 0))))
    return found


def _router_weight(router: nn.Module) -> torch.Tensor | None:
    """The router's [E, d] matrix: its first 2-D parameter (own or in a Linear child)."""
    for _, p in router.named_parameters():
        if p.ndim == 2:
            return p
    return None


def _outer_list(model: nn.Module, name: str) -> tuple[str, int] | None:
    """(name of the outermost ModuleList on ``name``'s path, index in it)."""
    parts = name.split(".")
    mod: nn.Module = model
    for i, part in enumerate(parts[:-1]):
        mod = getattr(mod, part)
        if isinstance(mod, nn.ModuleList) and parts[i + 1].isdigit():
            return ".".join(parts[: i + 1]), int(parts[i + 1])
    return None


def _is_norm(mod: nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower()


def _pre_attn_norm(layer: nn.Module) -> nn.Module | None:
    direct = getattr(layer, "input_layernorm", None)
    if isinstance(direct, nn.Module):
        return direct
    for name, mod in layer.named_modules():
        if name and _is_norm(mod) and not re.search(r"attn|attention", name, re.IGNORECASE):
            return mod
    return None


def _stack_kind(list_name: str) -> str:
    low = list_name.lower()
    if "encoder" in low:
        return "encoder"
    return "decoder"


def find_layout(model: nn.Module) -> ModelLayout:
    """Locate routers, layer ids and norms; raise :class:`CollectError` if the model has none."""
    declared = _declared_router_classes(model)
    named = list(model.named_modules())
    routers: list[tuple[str, nn.Module, int | None]] = []
    how = ""
    if declared:
        classes = tuple(c for c, _ in declared)
        for name, mod in named:
            if isinstance(mod, classes):
                idx = next(i for c, i in declared if isinstance(mod, c))
                routers.append((name, mod, idx))
        how = "class declared for router_logits in _can_record_outputs"
    if not routers:
        for name, mod in named:
            parent_name, _, leaf = name.rpartition(".")
            if leaf in ROUTER_NAMES and parent_name:
                parent = model.get_submodule(parent_name)
                if hasattr(parent, "experts") and _router_weight(mod) is not None:
                    routers.append((name, mod, None))
        how = "child named gate/router of a module with experts"
    if not routers:
        raise CollectError(
            f"{type(model).__name__}: no MoE router found (not a mixture-of-experts model?)"
        )

    lists: dict[str, nn.ModuleList] = {}
    placed: list[tuple[str, int, str, nn.Module, int | None]] = []
    for name, mod, idx in routers:
        loc = _outer_list(model, name)
        if loc is None:
            raise CollectError(f"router {name} is not inside a list of layers")
        lists.setdefault(loc[0], model.get_submodule(loc[0]))  # type: ignore[arg-type]
        placed.append((loc[0], loc[1], name, mod, idx))
    # encoder stacks first, then the rest in module order
    order = sorted(lists, key=lambda n: (_stack_kind(n) != "encoder", list(lists).index(n)))
    stacks: dict[str, tuple[int, int]] = {}
    first: dict[str, int] = {}
    kinds: dict[str, str] = {}
    offset = 0
    for n in order:
        kind = _stack_kind(n) if len(order) > 1 else "decoder"
        if kind in stacks:
            kind = n
        stacks[kind] = (offset, len(lists[n]))
        first[n], kinds[n] = offset, kind
        offset += len(lists[n])

    moe: list[MoELayer] = []
    for list_name, i, name, mod, idx in placed:
        w = _router_weight(mod)
        if w is None:
            raise CollectError(f"router {name} has no 2-D weight")
        moe.append(
            MoELayer(
                layer_id=first[list_name] + i,
                stack=kinds[list_name],
                router_name=name,
                router=mod,
                logits_index=idx,
                pre_attn_norm=_pre_attn_norm(lists[list_name][i]),
                num_experts=int(w.shape[0]),
                weight=w,
            )
        )
    moe.sort(key=lambda m: m.layer_id)
    if len({m.layer_id for m in moe}) != len(moe):
        raise CollectError("two routers in one layer: not supported")
    sizes = {m.num_experts for m in moe}
    if len(sizes) != 1:
        raise CollectError(f"MoE layers disagree on the number of experts: {sorted(sizes)}")
    moe_ids = {m.layer_id for m in moe}
    dense = tuple(i for i in range(offset) if i not in moe_ids)
    return ModelLayout(
        moe=moe,
        dense_layers=dense,
        stacks=stacks,
        num_experts=sizes.pop(),
        router_class=type(moe[0].router).__name__,
        how_found=how,
    )


@dataclass
class RouterCall:
    """What one router call produced for the current forward pass (rows = tokens)."""

    ids: torch.Tensor  # int64 [n, k], rank order (descending weight)
    weights: torch.Tensor | None  # float32 [n, k]
    logits: torch.Tensor  # float32 [n, E]
    router_in: torch.Tensor  # [n, d]


def parse_router_output(
    out: Any, logits_index: int | None, num_experts: int, top_k_hint: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(ids [n, k], weights [n, k] or None, logits [n, E]) from whatever the router returned.

    Routers return (logits, weights, indices) in various orders (Switch: one-hot dispatch mask,
    probability of the chosen expert, logits); a plain Linear gate returns only logits, and then
    the top-k is softmax-then-top-k with ``top_k_hint`` (the common Mixtral-style rule).
    """
    tensors = list(out) if isinstance(out, (tuple, list)) else [out]
    if logits_index is None:
        logits_index = next(
            (
                i
                for i, t in enumerate(tensors)
                if torch.is_tensor(t) and t.is_floating_point() and t.shape[-1] == num_experts
            ),
            0,
        )
    logits = tensors[logits_index].reshape(-1, num_experts).float()
    n = logits.shape[0]
    ints = [t for t in tensors if torch.is_tensor(t) and not t.is_floating_point()]
    floats = [
        t
        for i, t in enumerate(tensors)
        if i != logits_index and torch.is_tensor(t) and t.is_floating_point()
    ]
    weights: torch.Tensor | None = None
    if ints and ints[0].shape[-1] != num_experts:
        ids = ints[0].reshape(n, -1).long()
    elif ints:  # one-hot dispatch mask (Switch); capacity-dropped tokens have an all-zero row
        mask = ints[0].reshape(n, num_experts)
        k = max(1, int(mask.sum(-1).max().item()))
        ids = torch.topk(logits, k, dim=-1).indices
    else:
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, top_k_hint, dim=-1)
        weights = w
    k = ids.shape[1]
    if weights is None:
        for t in floats:
            if t.numel() == n * k:
                weights = t.reshape(n, k).float()
                break
    if weights is not None and k > 1:  # router rank order: descending weight, stable
        order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
        ids = ids.gather(1, order)
        weights = weights.gather(1, order)
    return ids, weights, logits


class HookSet:
    """Forward hooks on every router and pre-attention norm; ``take()`` drains one pass."""

    def __init__(self, layout: ModelLayout, top_k_hint: int, want_pre_attn: bool) -> None:
        self.layout = layout
        self.top_k_hint = top_k_hint
        self._calls: dict[int, list[RouterCall]] = {}
        self._pre: dict[int, list[torch.Tensor]] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        for m in layout.moe:
            self._handles.append(m.router.register_forward_pre_hook(self._pre_router(m)))
            self._handles.append(m.router.register_forward_hook(self._post_router(m)))
            if want_pre_attn and m.pre_attn_norm is not None:
                self._handles.append(m.pre_attn_norm.register_forward_hook(self._norm(m)))

    def _pre_router(self, m: MoELayer) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            self._inputs[m.layer_id] = args[0].detach()

        return hook

    def _post_router(self, m: MoELayer) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            ids, w, logits = parse_router_output(
                out, m.logits_index, m.num_experts, self.top_k_hint
            )
            x = self._inputs.pop(m.layer_id)
            self._calls.setdefault(m.layer_id, []).append(
                RouterCall(
                    ids.detach(),
                    None if w is None else w.detach(),
                    logits.detach(),
                    x.reshape(-1, x.shape[-1]),
                )
            )

        return hook

    def _norm(self, m: MoELayer) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            self._pre.setdefault(m.layer_id, []).append(t.detach().reshape(-1, t.shape[-1]))

        return hook

    def take(self) -> tuple[dict[int, RouterCall], dict[int, torch.Tensor]]:
        """Router results and pre-attention states of the pass just run, per layer id."""
        calls, pre = self._calls, self._pre
        self._calls, self._pre, self._inputs = {}, {}, {}
        out_calls = {}
        for lid, cs in calls.items():
            if len(cs) != 1:
                raise CollectError(f"layer {lid}: router ran {len(cs)} times in one forward pass")
            out_calls[lid] = cs[0]
        return out_calls, {lid: ts[-1] for lid, ts in pre.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
