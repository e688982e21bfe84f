"""Fate's expert cache (arXiv 2502.12224; ``research/SYSU/Fate`` in mindspore-lab/models):
shallow-favouring per-layer budgets, each layer an ARC cache. Knows: past.

Allocation (``utils.py::memory_cost_qwen``): if four whole layers fit, layers 0-3 are cached in
full and every deeper layer gets an equal share of the rest; otherwise whole layers are filled
from layer 0, then a partial layer. Adaptation: in this simulator every slot, including the
ones a layer's on-demand experts pass through, comes out of the cache budget, so each layer
first keeps ``widest step + copy engines`` staging slots and Fate's rule splits the rest.
Each layer's ARC starts filled with experts 0..n-1, as Fate initialises it.

ARC (``expert_ARC_cache.py``, Megiddo & Modha): T1/T2 resident lists, ghost lists B1/B2 and the
adaptive target p, updated with every routed expert. Deviations: the victim rule ignores the
"incoming key is in B2" tie case (the simulator asks for a victim before naming the incoming
expert), and a prefetched expert is transient (evicted first) until it is accessed, then
enters ARC as a miss would; Fate clears unused prefetches unless ARC keeps them.
Run it with ``cache.partition=per_layer``; Fate's INT2/INT4 copies are not modelled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from moesim.policies.base import EvictionPolicy, PolicyError
from moesim.policies.registry import register_eviction

FULL_LAYERS = 4


def fate_allocation(capacity: int, reserve: Sequence[int], num_experts: int) -> list[int]:
    """Slots per layer: staging ``reserve`` plus Fate's shallow-favouring share of the rest."""
    num_l = len(reserve)
    room = [num_experts - min(r, num_experts) for r in reserve]  # cacheable beyond staging
    left = capacity - sum(min(r, num_experts) for r in reserve)
    if left < 0:  # too small for staging alone: equal split, the simulator reports it
        base, extra = divmod(capacity, num_l)
        return [base + (1 if j < extra else 0) for j in range(num_l)]
    extra = [0] * num_l
    head = min(FULL_LAYERS, num_l)
    if left >= sum(room[:head]):
        for j in range(head):
            extra[j] = room[j]
        left -= sum(room[:head])
        rest = list(range(head, num_l))
        while left > 0 and rest:  # equal shares, capped at a full layer
            share = max(left // len(rest), 1)
            for j in list(rest):
                add = min(share, room[j] - extra[j], left)
                extra[j] += add
                left -= add
                if extra[j] == room[j]:
                    rest.remove(j)
                if left == 0:
                    break
    else:
        for j in range(num_l):  # whole layers from layer 0, then a partial one
            add = min(room[j], left)
            extra[j] = add
            left -= add
    caps = [min(r, num_experts) + e for r, e in zip(reserve, extra, strict=True)]
    caps[0] += capacity - sum(caps)  # anything left (every layer full) stays with layer 0
    return caps


@register_eviction
class FateARC(EvictionPolicy):
    """One ARC per layer partition."""

    name = "fate_arc"
    prefills = True
    partition_required = "per_layer"

    @staticmethod
    def layer_capacities(capacity: int, reserve: Sequence[int], num_experts: int,
                         params: dict[str, Any]) -> list[int]:
        return fate_allocation(capacity, reserve, num_experts)

    def __init__(self, setup):
        super().__init__(setup)
        layers = setup.partition_layers or []
        if len(layers) != 1:
            raise PolicyError("fate_arc keeps one ARC per layer: set cache.partition=per_layer")
        self._layer = layers[0]
        self._c = setup.capacity
        self._arc_size = max(setup.capacity - setup.reserve, 0)
        self._p = 0.0
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        self._transient: OrderedDict[int, None] = OrderedDict()

    def initial_contents(self) -> list[int]:
        base = self._layer * self.setup.shape.num_experts
        return list(range(base, base + min(self._arc_size, self.setup.shape.num_experts)))

    def _admit(self, key: int) -> None:
        """A key enters ARC on a miss: ghost hits adapt p and go to T2, others to T1."""
        c = self._c
        if key in self._b1:
            self._p = min(c, self._p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        while len(self._t1) + len(self._b1) > c and self._b1:
            self._b1.popitem(last=False)
        while len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c and self._b2:
            self._b2.popitem(last=False)

    def on_insert(self, key: int, prefetch: bool) -> None:
        if prefetch:
            self._transient[key] = None
        else:
            self._admit(key)

    def on_access(self, key: int) -> None:
        if key in self._transient:  # a prefetched expert is used: ARC sees it as a miss
            del self._transient[key]
            self._admit(key)
            return
        self._t1.pop(key, None)
        self._t2.pop(key, None)
        self._t2[key] = None

    def on_evict(self, key: int) -> None:
        if key in self._transient:
            del self._transient[key]
        elif key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        elif key in self._t2:
            del self._t2[key]
            self._b2[key] = None

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        for key in self._transient:
            if can_evict(key):
                return key
        first, second = (self._t1, self._t2) if len(self._t1) > self._p else (self._t2, self._t1)
        for lst in (first, second):
            for key in lst:
                if can_evict(key):
                    return key
        return None
