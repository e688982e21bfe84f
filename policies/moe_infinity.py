"""MoE-Infinity (EfficientMoE/MoE-Infinity, arXiv 2401.14361), reproduced from its code.

Three registered policies; all know only the past (``knows: past``):

``moe_infinity`` (prefetch; default eviction ``moe_infinity_lfu``)
    *EAM collection* (``memory/expert_tracer.py``): every request keeps an expert activation
    matrix (EAM) ``[L, E]`` of routing counts, fed from the keys of ``on_routed``. With batch 1
    a step is one token, so the counts are the code's per-token counts. With batch > 1 (or a
    prefill chunk) the hook only sees the *union* of the step's experts: each request in the
    step then gets +1 for every expert of that union, so its EAM is per step-batch, an
    approximation.
    *EAMC*: a collection of past EAMs, ``eamc_capacity`` slots (code default 1000), filled
    online with each finished request's EAM (a request is finished once it is no longer in the
    running batch when a new request joins: with batch 1, when the next one starts; the last
    request of a run is never added). Insertion as ``finish_entry``: the first empty slot, else
    the non-persistent slot with the smallest access count (first such slot on ties); its
    access count is set to 1. ``warm_eamc_path`` pre-fills the EAMC from a trace file (the
    paper's offline EAMC, ``load_trace``): one EAM per request over all its tokens; those slots
    are persistent (never replaced) and start with access count 0, as in the code.
    *Matching* (``find_most_similar``): for the current layer ``l`` the stored EAMs get rows
    0..l set to a constant 1e-9 (``mask_observed=true``, as written; ``false`` keeps them),
    rows are normalised, cosine similarity is taken per layer, distance = 1 - mean over layers,
    the argmin is picked (first on ties) and its access count incremented.
    *Priority* (``expert_predictor.py::predict``): ``P`` = the matched raw EAM; ``P[:l] = 0``;
    ``P[i] = (P[i] + 1e-8) * (1 - (i - l) / (L + 1))`` for ``i`` in ``l..L-1``. Because of the
    +1e-8 every expert of layers ``l..L-1`` is positive, so the list holds them all. Layer ``l``
    is kept as written although its demand is already issued: its demanded experts are
    resident or loading (no transfer), its other experts are prefetched at the top of the list.
    *Queue* (``expert_prefetcher.py::prefetch_experts`` and ``task_scheduler.cpp``): at every
    ``on_demand_issued`` (after routing, behind demand, as the code's per-layer call) the
    queued prefetches are flushed (``ReplaceCacheCandidates``), the list with ``P > 0`` is
    sorted by score descending (stable: lower layer, then lower expert first on ties, as
    Python's ``sorted``), queued in that order (one ``ctx.prefetch`` call, FIFO = score order)
    and becomes the protected candidate set.
    Options that deviate on purpose: ``horizon`` (``null``/``"all"`` = every later layer as in
    the code; an int ``h`` keeps layers ``l..l+h``) and ``prefetch_width`` (0 = every expert
    with ``P > 0`` as in the code; ``n > 0`` = only the top ``n`` of each layer).
    With batch > 1 the code predicts once per sequence and each call flushes the queue: every
    request of the step is matched (each match counts an access) and the last one's list stays.

``moe_infinity_lfu`` (eviction; ``core/parallel/expert_dispatcher.cpp`` and the task pool)
    In-cache visit count: 1 when an expert enters the cache (demand or prefetch), +1 per demand
    access (a prefetch of a resident expert does not count), forgotten on eviction. Victim: the
    minimum count (``order=min``, the HEAD on-demand rule); ties: the expert that entered the
    cache first. ``order=max`` is the task pool's ``RemoveCachedSparseNode`` sort (descending:
    evict the most visited first), exposed as written although it looks like a bug.
    Candidate protection: experts in the prefetcher's current candidate set are skipped. For a
    prefetch, if only candidates are evictable the prefetch is dropped ("evict failed" in
    the code); a demand fetch then takes a candidate (the demand must be served). The two
    cases are told apart by the prefetcher, which marks the demand phase of each layer
    (``on_routed`` .. ``on_demand_issued``, where the simulator serves demand). The code
    applies candidate protection on the prefetch path; here it also orders demand victims
    (non-candidates first), and ``order`` applies to both.

``moe_infinity_priority`` (eviction; paper-era ``memory/expert_priority_score.py``)
    ``score = T * D * F``, evict the argmin (ties: lowest key), skipping the prefetcher's
    candidates like ``moe_infinity_lfu``. ``F`` = in-cache visit counts (as above) normalised
    ``F / sum F + 1e-6`` (all ones if no counts); ``T`` = topology, ``D`` = the current request's
    EAM, each row normalised (empty rows -> 1), ``D / sum D + 1e-6``. The code was written for
    encoder-decoder models (``N_enc = L // 2``); here a decoder-only model is one decoder stack
    (``N_enc = 0``, the code's decoder branch over all ``L`` layers): ``T[i] = 1`` for
    ``i <= l`` else ``i / (L + 1)`` (``decay_from_last``), then ``T / sum T + 1e-6``. ``D`` comes
    from the ``moe_infinity`` prefetcher (the last request of the step); without it ``D`` is
    all ones. Scores are recomputed at each victim choice (vectorised over all keys).

**Sharing state between the prefetcher and the evictor.** Candidate protection needs the two
objects of one run to see each other: they meet in ``setup.params["_peers"]``, the dict the
simulator shares between all policy instances of a run (key ``"moe_infinity"``: the candidate
set, the demand-phase flag, the registered eviction instances and the current request's EAM).
Without ``_peers`` (policies built by hand) there is no protection; then, because every
prefetch may evict another one, only the first ``capacity`` absent experts of the list are
queued (a longer list would only evict its own head). With another eviction policy
(``policy.eviction=lru``) the candidates are not protected either, and the same cap applies.

**Queue length.** With protection, a prefetch succeeds only while a free slot or an evictable
non-candidate is left, and each success makes one more candidate. The evictor reports that
room, and only the first ``room + E`` absent experts of the list (per cache partition) are
queued; resident ones are always passed (so ``on_prefetch_resident`` sees them). In
zero-latency mode this places exactly the same experts as queueing the whole list (room is
an upper bound on what can land); the later entries would all be dropped, so
``prefetch_dropped`` counts at most ``E`` drops per prediction instead of the rest of the
list (``tests/policies``: ``test_truncated_queue_places_what_the_whole_list_would``). In timed
mode room can grow before the next flush only when a demand fetch has to take a candidate's
slot (at most one layer's demand, ``<= E``, hence the slack); in our checks against the whole
list (3 traces x 3 sizes x 3 variants) hits and stall time were identical, but a demand for a
list entry still waiting in the link's queue counts as a late hit (promoted prefetch) with the
whole list and as a miss here (MoE-Infinity's ``StartExec`` also drops the queued task and
fetches on demand).

**Cost.** Per request the matcher keeps dot products ``U[c, i] . M[i]`` of the unit-normalised
stored rows with the current EAM, updated per routed layer in ``O(N k)`` (``N`` = filled EAMC
slots); a match is one ``[N, L]`` expression, building the list one stable sort of up to
``L E`` scores; the evictor keeps its scores up to date per access, so a victim is one
``np.where`` + ``argmin`` over ``L E`` keys and a prefetch with no room left is refused in
O(1). On DeepSeek-V2-Lite (L=26, E=64, N=999 warm EAMs) one layer-step costs ~75 us to match,
~50 us to build and sort the list and ~25 us to update the EAM; a zero-latency replay of the
100-prompt test trace (40k layer-steps) takes ~20 s. EAMC memory is two float64 ``[N, L, E]``
arrays (26 MB at N=1000) plus ``[N, L]`` dot products per running request.

**Compiled twin.** With its own evictors (``moe_infinity_lfu`` / ``moe_infinity_priority``) the
prefetcher runs on the compiled engine (``sim/compiled/eamc.py``), which reproduces every float
here with numpy's summation order; ``engine=auto`` uses it, other evictions run on SimPy.

Other deviations: stored EAMs with an all-zero row count cosine 0 there (the code would get
NaN); empty EAMC slots are never matched (the code matches against all ``capacity`` slots);
if all slots are persistent, finished requests are not added (the code would overwrite slot
0); with the EAMC empty no prediction is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.policies.base import (
    EvictionPolicy,
    ModelShape,
    PolicyError,
    PolicySetup,
    PrefetchPolicy,
)
from moesim.policies.registry import register_eviction, register_prefetch

_NONE = np.iinfo(np.int64).max
_SEQ_BITS = 36
_COUNT_OFFSET = 1 << 26
_PEER_KEY = "moe_infinity"


@dataclass
class _Shared:
    """State shared by the prefetcher and the eviction instances of one run."""

    cand: np.ndarray  # bool [num_keys]: the current candidate set
    has_cand: bool = False
    demand: bool = False  # True while the simulator serves the current layer's demand
    evictors: dict[tuple[int, ...], Any] = field(default_factory=dict)  # partition -> evictor
    request_eam: np.ndarray | None = None  # [L, E] EAM of the last request of the step


def _shared(setup: PolicySetup) -> _Shared | None:
    peers = setup.params.get("_peers")
    if not isinstance(peers, dict):
        return None
    sh = peers.get(_PEER_KEY)
    if sh is None:
        sh = peers[_PEER_KEY] = _Shared(np.zeros(setup.shape.num_keys, dtype=bool))
    return sh


# -- eviction ------------------------------------------------------------------------------


class _VisitCounts(EvictionPolicy):
    """In-cache visit counts plus candidate protection; subclasses choose the score."""

    def __init__(self, setup):
        super().__init__(setup)
        shape = setup.shape
        self._count = np.zeros(shape.num_keys, dtype=np.int64)  # 0 = not in the cache
        self._ins = np.zeros(shape.num_keys, dtype=np.int64)  # insertion sequence number
        self._seq = 0
        self._n = 0  # keys holding a slot of this partition
        self._nc = 0  # of which not candidates
        layers = setup.partition_layers
        self._layers = tuple(range(shape.num_layers)) if layers is None else tuple(layers)
        self.shared = _shared(setup)
        if self.shared is not None:
            self.shared.evictors[self._layers] = self

    def _protected(self, key: int) -> bool:
        sh = self.shared
        return sh is not None and bool(sh.cand[key])

    def on_insert(self, key: int, prefetch: bool) -> None:
        self._seq += 1
        self._count[key] = 1
        self._ins[key] = self._seq
        self._n += 1
        if not self._protected(key):
            self._nc += 1

    def on_access(self, key: int) -> None:
        self._count[key] += 1

    def on_evict(self, key: int) -> None:
        self._count[key] = 0
        self._n -= 1
        if not self._protected(key):
            self._nc -= 1

    def recount(self) -> None:
        """The candidate set changed."""
        held = self._count > 0
        sh = self.shared
        if sh is not None and sh.has_cand:
            held &= ~sh.cand
        self._nc = int(np.count_nonzero(held))

    def visit_count(self, key: int) -> int:
        return int(self._count[key])

    def in_cache(self) -> np.ndarray:
        """Bool [num_keys]: keys holding a slot of this partition (resident or loading)."""
        return self._count > 0

    def prefetch_room(self) -> int:
        """Free slots plus held non-candidates: an upper bound on the prefetches that can land
        before the candidate set changes (pinned and in-flight keys are counted too)."""
        return self.setup.capacity - self._n + self._nc

    def _scores(self) -> tuple[np.ndarray, bool]:
        """Scores of all keys, lower leaves first, ``none`` for keys without a slot; and
        whether the array is a fresh copy the caller may modify."""
        raise NotImplementedError

    def victim(self, can_evict: Callable[[int], bool]) -> int | None:
        if self._n == 0:
            return None
        sh = self.shared
        protect = sh is not None and sh.has_cand
        if protect and self._nc == 0 and not sh.demand:
            return None  # a prefetch that finds only candidates is dropped ("evict failed")
        scores, fresh = self._scores()
        none = _NONE if scores.dtype == np.int64 else np.inf
        if protect:
            found = _pick(np.where(sh.cand, none, scores), none, can_evict)
            if found is not None or not sh.demand:
                return found
            # a demand fetch must be served: it may take a candidate
        return _pick(scores if fresh else scores.copy(), none, can_evict)


def _pick(scores: np.ndarray, none: Any, can_evict: Callable[[int], bool]) -> int | None:
    """Lowest score whose key can be evicted (scores is modified)."""
    while True:
        key = int(np.argmin(scores))
        if scores[key] == none:
            return None
        if can_evict(key):
            return key
        scores[key] = none


@register_eviction
class MoEInfinityLFU(_VisitCounts):
    """MoE-Infinity's in-cache visit-count eviction with candidate protection."""

    name = "moe_infinity_lfu"
    params = {"order": "min"}

    def __init__(self, setup):
        super().__init__(setup)
        order = setup.params.get("order", "min")
        if order not in ("min", "max"):
            raise PolicyError(f"moe_infinity_lfu: order must be 'min' or 'max', got {order!r}")
        self._sign = 1 if order == "min" else -1
        self._score = np.full(setup.shape.num_keys, _NONE, dtype=np.int64)

    def _set(self, key: int) -> None:
        self._score[key] = ((self._sign * int(self._count[key]) + _COUNT_OFFSET) << _SEQ_BITS) \
            + int(self._ins[key])

    def on_insert(self, key: int, prefetch: bool) -> None:
        super().on_insert(key, prefetch)
        self._set(key)

    def on_access(self, key: int) -> None:
        super().on_access(key)
        self._set(key)

    def on_evict(self, key: int) -> None:
        super().on_evict(key)
        self._score[key] = _NONE

    def _scores(self) -> tuple[np.ndarray, bool]:
        return self._score, False


@register_eviction
class MoEInfinityPriority(_VisitCounts):
    """Paper-era activation-aware score T * D * F (decoder-only: one decoder stack)."""

    name = "moe_infinity_priority"

    def _scores(self) -> tuple[np.ndarray, bool]:
        shape = self.setup.shape
        num_l, num_e = shape.num_layers, shape.num_experts
        count = self._count
        f = count.astype(float)
        total = f.sum()
        f = (np.ones_like(f) / f.size if total == 0 else f / total) + 1e-6
        cur = self.setup.clock.layer
        t = np.arange(num_l, dtype=float) / (num_l + 1)
        t[: cur + 1] = 1.0
        t = t / (t.sum() * num_e) + 1e-6
        sh = self.shared
        d = None if sh is None or sh.request_eam is None else sh.request_eam.astype(float)
        if d is None:
            d = np.ones((num_l, num_e))
        else:
            d[d.sum(axis=1) == 0] = 1.0
            d = d / d.sum(axis=1, keepdims=True)
        d = d / d.sum() + 1e-6
        out = (t[:, None] * d).ravel() * f
        out[count == 0] = np.inf
        return out, True


# -- prefetch ------------------------------------------------------------------------------


class _Request:
    """One running request: its EAM and the dot products with the stored unit rows."""

    __slots__ = ("dots", "eam", "sq")

    def __init__(self, capacity: int, num_l: int, num_e: int) -> None:
        self.eam = np.zeros((num_l, num_e))
        self.sq = np.zeros(num_l)  # squared row norms of eam
        self.dots = np.zeros((capacity, num_l))  # U[c, i] . eam[i]


class EAMC:
    """The expert activation matrix collection and its masked-cosine matcher."""

    def __init__(self, capacity: int, num_layers: int, num_experts: int,
                 mask_observed: bool = True) -> None:
        if capacity < 1:
            raise PolicyError("moe_infinity: eamc_capacity must be >= 1")
        self.capacity, self.num_l, self.num_e = capacity, num_layers, num_experts
        self.mask = mask_observed
        self.eams = np.zeros((capacity, num_layers, num_experts))
        self.unit = np.zeros((capacity, num_layers, num_experts))  # rows scaled to norm 1
        self.access = np.zeros(capacity)
        self.filled = 0  # slots 0..filled-1 hold an EAM
        self.persistent = 0  # slots 0..persistent-1 are never replaced

    def new_request(self) -> _Request:
        return _Request(self.capacity, self.num_l, self.num_e)

    def add(self, eam: np.ndarray, persistent: bool = False) -> int | None:
        """Store an EAM as ``finish_entry`` does; returns its slot (None if not stored)."""
        if not eam.any():
            return None
        if self.filled < self.capacity:
            idx = self.filled
            self.filled += 1
        elif self.persistent < self.capacity:
            idx = self.persistent + int(np.argmin(self.access[self.persistent:]))
        else:
            return None
        self.eams[idx] = eam
        norms = np.linalg.norm(eam, axis=1, keepdims=True)
        self.unit[idx] = np.divide(eam, norms, out=np.zeros_like(eam), where=norms > 0)
        if persistent:
            self.persistent = idx + 1
            self.access[idx] = 0
        else:
            self.access[idx] = 1
        return idx

    def observe(self, req: _Request, layer: int, experts: np.ndarray) -> None:
        """Add one routed layer (+1 per expert) to a request's EAM and dot products."""
        row = req.eam[layer]
        req.sq[layer] += float(np.sum(2.0 * row[experts] + 1.0))
        row[experts] += 1.0
        n = self.filled
        if n:
            req.dots[:n, layer] += self.unit[:n, layer][:, experts].sum(axis=1)

    def refresh(self, req: _Request, idx: int) -> None:
        """Recompute a request's dot products with slot ``idx`` (after it was rewritten): a
        row-wise ``sum`` (numpy's pairwise order, which the compiled twin reproduces; einsum's
        SIMD order depends on the CPU)."""
        req.dots[idx] = (self.unit[idx] * req.eam).sum(axis=1)

    def distances(self, req: _Request, layer: int) -> np.ndarray:
        """The code's ``1 - mean_l cos`` against every filled slot."""
        n = self.filled
        norms = np.sqrt(req.sq)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        cos = req.dots[:n] * inv  # [n, L]
        if self.mask:
            # Stored rows 0..layer are a constant: cosine with the uniform row, same for all.
            obs = slice(0, layer + 1)
            masked = float(np.sum(req.eam[obs].sum(axis=1) * inv[obs])) / np.sqrt(self.num_e)
            total = masked + cos[:, layer + 1:].sum(axis=1)
        else:
            total = cos.sum(axis=1)
        return 1.0 - total / self.num_l

    def match(self, req: _Request, layer: int) -> int:
        idx = int(np.argmin(self.distances(req, layer)))
        self.access[idx] += 1
        return idx


def priority(eam: np.ndarray, layer: int) -> np.ndarray:
    """``predict``'s decayed score matrix for the matched EAM at ``layer``."""
    num_l = eam.shape[0]
    p = eam.astype(float).copy()
    p[:layer] = 0.0
    decay = 1.0 - (np.arange(layer, num_l) - layer) / (num_l + 1)
    p[layer:] = (p[layer:] + 1e-8) * decay[:, None]
    return p


def ordered_keys(p: np.ndarray, layer: int) -> np.ndarray:
    """Keys with ``P > 0`` of layers ``layer..``, by score descending (stable on ties)."""
    num_e = p.shape[1]
    flat = p[layer:].ravel()
    nz = np.flatnonzero(flat > 0)
    order = nz[np.argsort(-flat[nz], kind="stable")]
    return order + layer * num_e


def eams_of_trace(path: str, shape: ModelShape) -> list[np.ndarray]:
    """One EAM per request of a trace file (counts over all its tokens)."""
    from moesim.traces import load_trace

    trace = load_trace(path)
    num_l, num_e = shape.num_layers, shape.num_experts
    if trace.meta.num_moe_layers != num_l or trace.meta.num_experts != num_e:
        raise PolicyError(
            f"moe_infinity: warm_eamc_path {path} has {trace.meta.num_moe_layers} layers x "
            f"{trace.meta.num_experts} experts, the run has {num_l} x {num_e}"
        )
    offs = (np.arange(num_l) * num_e)[None, :, None]
    out = []
    for req in trace.requests:
        ex = np.asarray(req.experts, dtype=np.int64)
        keys = (ex + offs)[ex >= 0]
        out.append(np.bincount(keys, minlength=num_l * num_e).reshape(num_l, num_e).astype(float))
    return out


@register_prefetch
class MoEInfinity(PrefetchPolicy):
    """EAMC matching and decayed-priority prefetch of all later layers (see module doc)."""

    name = "moe_infinity"
    default_eviction = "moe_infinity_lfu"
    params = {
        "eamc_capacity": 1000,
        "mask_observed": True,
        "horizon": None,
        "prefetch_width": 0,
        "warm_eamc_path": "",
    }

    def __init__(self, setup):
        super().__init__(setup)
        p = setup.params
        shape = setup.shape
        self._num_l, self._num_e = shape.num_layers, shape.num_experts
        self.eamc = EAMC(int(p.get("eamc_capacity", 1000)), self._num_l, self._num_e,
                         bool(p.get("mask_observed", True)))
        horizon = p.get("horizon")
        if horizon in (None, "all"):
            self._horizon = None
        elif isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 0:
            self._horizon = horizon
        else:
            raise PolicyError(f"moe_infinity: horizon must be 'all'/null or an int >= 0, "
                              f"got {horizon!r}")
        self._width = int(p.get("prefetch_width", 0))
        if self._width < 0:
            raise PolicyError("moe_infinity: prefetch_width must be >= 0")
        path = p.get("warm_eamc_path") or ""
        if path:
            eams = eams_of_trace(path, shape)
            if len(eams) > self.eamc.capacity:
                raise PolicyError(
                    f"moe_infinity: warm EAMC has {len(eams)} requests, more than "
                    f"eamc_capacity={self.eamc.capacity}"
                )
            for eam in eams:
                self.eamc.add(eam, persistent=True)
        self.shared = _shared(setup)
        self._live: dict[int, _Request] = {}
        self.predictions = 0  # lists queued (each one flushed the queue first)
        self.last_keys: np.ndarray = np.zeros(0, dtype=np.int64)

    # -- request bookkeeping ---------------------------------------------------------------
    def _finish_gone(self, running: Sequence[int]) -> None:
        gone = sorted(set(self._live) - set(running))
        for rid in gone:
            idx = self.eamc.add(self._live.pop(rid).eam)
            if idx is not None:
                for req in self._live.values():
                    self.eamc.refresh(req, idx)

    def _request(self, rid: int) -> _Request:
        req = self._live.get(rid)
        if req is None:
            req = self._live[rid] = self.eamc.new_request()
        return req

    def on_request_start(self, ctx, request_id):
        self._finish_gone(ctx.request_ids)
        self._request(request_id)

    # -- layer hooks -----------------------------------------------------------------------
    def on_routed(self, ctx, layer, keys):
        if self.shared is not None:
            self.shared.demand = True
        if not keys:
            return
        experts = np.unique(np.asarray(keys, dtype=np.int64) - layer * self._num_e)
        for rid in ctx.request_ids:
            self.eamc.observe(self._request(rid), layer, experts)

    def on_demand_issued(self, ctx, layer, keys):
        sh = self.shared
        if sh is not None:
            sh.demand = False
        rids = list(ctx.request_ids)
        if not rids:
            return
        if sh is not None:
            sh.request_eam = self._request(rids[-1]).eam  # for moe_infinity_priority
        if self.eamc.filled == 0:
            return
        for rid in rids:  # each sequence's predict() flushes the previous one's list
            idx = self.eamc.match(self._request(rid), layer)
        order = ordered_keys(self._trim(priority(self.eamc.eams[idx], layer), layer), layer)
        self.last_keys = order
        ctx.cancel_prefetches()
        self.predictions += 1
        if sh is not None:
            sh.cand[:] = False
            sh.cand[order] = True
            sh.has_cand = True
            for ev in sh.evictors.values():
                ev.recount()
        send = self._queueable(ctx, order)
        if send:
            ctx.prefetch(send)

    def _trim(self, p: np.ndarray, layer: int) -> np.ndarray:
        if self._horizon is not None:
            p[layer + self._horizon + 1:] = 0.0
        if self._width:
            rows = p[layer:]
            drop = np.argsort(-rows, axis=1, kind="stable")[:, self._width:]
            np.put_along_axis(rows, drop, 0.0, axis=1)
        return p

    def _queueable(self, ctx, order: np.ndarray) -> list[int]:
        """The list as queued: resident entries plus the absent ones that can still land."""
        sh = self.shared
        evictors = {} if sh is None else sh.evictors
        if not evictors:
            return self._first_absent(ctx, order.tolist(), self.setup.capacity)
        layers = order // self._num_e
        if len(evictors) == 1:
            ((part_layers, ev),) = evictors.items()
            if len(part_layers) == self._num_l:  # one global cache
                held = ev.in_cache()[order]
                budget = ev.prefetch_room() + self._num_e
                return order[held | (np.cumsum(~held) <= budget)].tolist()
        keep = np.zeros(order.size, dtype=bool)
        covered = np.zeros(self._num_l, dtype=bool)
        for part_layers, ev in evictors.items():
            covered[list(part_layers)] = True
            mine = np.isin(layers, part_layers)
            held = ev.in_cache()[order] & mine
            absent = mine & ~held
            budget = ev.prefetch_room() + self._num_e
            keep |= held | (absent & (np.cumsum(absent) <= budget))
        keep |= ~covered[layers]  # layers without a registered evictor: send all
        return order[keep].tolist()

    @staticmethod
    def _first_absent(ctx, keys: list[int], limit: int) -> list[int]:
        out, n = [], 0
        for key in keys:
            if not (ctx.is_resident(key) or ctx.is_loading(key)):
                if n >= limit:
                    break
                n += 1
            out.append(key)
        return out
