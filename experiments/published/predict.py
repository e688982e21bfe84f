"""Predict a published measurement: turn an entry's setup into one simulation and read off the
same metric.

What an entry maps to (every mapping a modelling choice, stated here and on the docs page):

- the model's real routing trace (``MODEL_TRACES``; an entry whose model has none is reported
  as not predictable, never guessed), its card deployed at the entry's bits per weight;
- the entry's hardware profile and runtime profile (``hw_profiles/runtimes/``);
- the cache: ``per_layer: N`` is an equal per-layer partition of N slots each (the runtime's
  staging buffers lend slots where N is below a layer's need), ``experts``/``fraction`` a
  global cache, ``gpu_memory_gib`` the experts that fit beside the non-expert weights and a
  fixed reserve (``RESERVE_GIB``), ``all`` every expert resident from the start (the cache
  starts full; the first ``WARMUP`` tokens of each request are still not measured), ``none``
  the smallest cache a step can run in, emptied before every token (nothing is reused:
  ``per_token_requests``);
- ``prefetch: speculative`` (a system's own next-layer guess) and ``oracle`` are the perfect
  next-layer prefetch issued right behind the layer's demand copies: an upper bound on what
  a speculative pre-loader achieves;
- decode tokens of the trace's requests, at most ``MAX_TOKENS`` each, ``max(MAX_REQUESTS,
  batch)`` requests decoded ``batch`` at a time; a batch above 1 takes requests that last the
  whole replay (:func:`full_batch`; where the trace has too few, ``batch`` consecutive segments
  of its decode tokens, :func:`batch_segments`); the predicted
  time per output token is the run's
  ``time_per_output_token_s`` (with a batch: step time over the batch's tokens), tokens/s its
  inverse (a throughput), a speed-up the ratio of two entries' predictions;
- ``placement``: ``fetch`` (the default), ``cpu_on_miss`` and ``fetch_or_cpu`` as the moesim
  placements of those names; ``static_cpu`` (llama.cpp ``--n-cpu-moe`` / ``-ot exps=CPU``,
  kTransformers) by its cache (:func:`placement_of`); ``cpu_layers`` (llama.cpp ``-ngl`` /
  Ollama ``num_gpu``: whole layers, attention included, on the CPU) and ``layer_offload``
  (accelerate's layer-order residency, every offloaded layer's weights copied in at each call)
  as the moesim placements of those names with the entry's ``gpu_layers`` assumption
  (:func:`gpu_layers_of`; without one the entry is not predictable), every expert of its GPU
  layers resident (a cache of every expert, full from the start); CPU times come from the
  profile's host CPU under the runtime's ``cpu_kernels`` (``apply_runtime_cpu``); a placement
  moesim cannot simulate would be reported as not predictable with its reason
  (``UNMODELLED_PLACEMENTS``), never approximated by a placement that differs;
- ``phase: prefill``: the trace's recorded prompts of at least ``input_tokens`` tokens, cut to
  that length, each one step (``replay=prefill``); tokens/s is the run's
  ``prefill_tokens_per_s``. ``phase: request`` (prompt and generation in one figure) is not
  predicted yet.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moesim.hw_profiles import list_profiles, load_profile
from moesim.hw_profiles.runtime import (
    RuntimeProfile,
    apply_runtime,
    apply_runtime_cpu,
    load_runtime,
    with_structure,
)
from moesim.sim import capacity_slots, dense_layers_before, simulate
from moesim.sim.hardware import host_side
from moesim.traces.model_card import ModelCard, load_card
from moesim.traces.trace import Trace

from .entries import Entry

# The named trace (experiments/conf/trace/<name>.yaml) holding each model card's real routing.
MODEL_TRACES: dict[str, str] = {
    "mixtral_8x7b": "mixtral_8x7b",
    "deepseek_v2_lite": "deepseek_v2_lite",
    # BigMoeOnEdge's one prompt (top-6 of the native 8: only routing-independent entries)
    "qwen3_30b_a3b": "qwen3_30b_a3b_bmoe",
    # moe_ocs_learning's MLX capture: one prompt (36 prefill + 128 decode tokens), all 40 layers,
    # 256 experts top-8 (the native k)
    "qwen36_35b_a3b": "qwen36_35b_a3b",
    # BigMoeOnEdge's prompts, top-6 of the native 8 and top-2 of the native 4: only entries
    # whose time does not depend on which experts are routed (``routing_independent``)
    "gemma4_26b_a4b": "gemma4_26b_a4b_bmoe",
    "gpt_oss_120b": "gpt_oss_120b_bmoe",
}
PREDICTED_PLACEMENTS = ("fetch", "static_cpu", "cpu_on_miss", "fetch_or_cpu", "cpu_layers",
                        "layer_offload")
# Placements that split the model by decoder layers (the entry's gpu_layers assumption).
LAYER_SPLITS = ("cpu_layers", "layer_offload")
# Placements an entry's source shows but moesim cannot simulate, with the reason reported for
# them (every other placement of entries.PLACEMENTS outside PREDICTED_PLACEMENTS: "not predicted
# so far").
UNMODELLED_PLACEMENTS: dict[str, str] = {}  # none at present
MAX_TOKENS = 64  # decode tokens per request replayed (the trace's requests, up to this)
MAX_REQUESTS = 4
BATCH_SEARCH = 256  # requests searched for a batch whose sequences all last the replay
PROMPT_SEARCH = 64  # requests searched for recorded prompts (prefill entries)
WARMUP = 8  # tokens per request that only warm a cache holding every expert
RESERVE_GIB = 1.5  # CUDA context, activations and KV cache beside the weights (assumption)


# Measured pinned host-to-device plateaus of an x16 link per PCIe generation, for entries whose
# source names a slower bus than the GPU's own (a Gen4 GPU in a Gen3 host): the profile's link
# curves are scaled by the ratio. Gen3: CUDA bandwidthTest on a V100-PCIe (v100_pcie.yaml, S21);
# Gen4: bandwidthTest on a DGX A100 (a100_sxm4.yaml, S34).
BUS_PINNED_BPS = {3: 12.4e9, 4: 25.7e9}
_GEN = re.compile(r"(?:gen\.?\s*|pcie\s*)([34])(?:\.0)?\b", re.I)


def bus_generation(text: str) -> int | None:
    """The PCIe generation a text names ("PCIe Gen.3", "PCIe 4.0 x16"), or None."""
    m = _GEN.search(text or "")
    return int(m.group(1)) if m else None


def bus_scale(entry: Entry, profile: Any) -> float:
    """Link scale for an entry whose stated bus is slower than its profile's (else 1)."""
    stated = bus_generation(entry.link)
    hl = getattr(profile, "host_link", None)
    own = bus_generation(str(getattr(hl, "bus", "") or "")) if hl is not None else None
    if stated is None or own is None or stated >= own:
        return 1.0
    return BUS_PINNED_BPS[stated] / BUS_PINNED_BPS[own]


class NotPredictable(Exception):
    """The entry's setup cannot be simulated here (no trace of the model, ...): reported."""


@dataclass(frozen=True)
class Prepared:
    """Everything of one entry's run except the runtime (what a fit varies)."""

    entry: Entry
    trace: Trace
    card: ModelCard
    profile: Any
    capacity: int
    partition: str
    warmup: int
    link_scale: float  # the entry's bus generation against the profile's (BUS_PINNED_BPS)
    no_reuse: bool = False  # cache: none -- nothing stays on the GPU from one token to the next
    batch: int = 1  # requests decoded together (the entry's batch)
    replay: str = "decode"  # "prefill": the entry times the prompt (phase prefill)
    placement: Any = None  # the moesim placement ({"name": ...}; None: fetch)
    routing: str = ""  # the routing replayed: the trace's name, and how it was completed


@functools.cache
def _read(name: str, requests: int) -> Trace:
    """The named trace's first ``requests`` requests (its config group file, read without
    Hydra: this also runs inside ``moesim-sim experiment=published``)."""
    from omegaconf import OmegaConf

    from moesim.experiments.configs import CONF_DIR
    from moesim.experiments.inputs import trace_file
    from moesim.traces import TraceError
    from moesim.traces import load_trace as read

    node = OmegaConf.load(CONF_DIR / "trace" / f"{name}.yaml")
    try:
        return read(trace_file(str(node.path), node.get("format")), max_requests=requests)
    except TraceError as exc:
        raise NotPredictable(f"trace {name}: {exc}") from None


def _trace(name: str, batch: int = 1) -> Trace:
    """The first ``max(MAX_REQUESTS, batch)`` requests of the named trace, their first tokens
    only. A batch above 1 is :func:`full_batch`: ``batch`` sequences that all last the
    replay."""
    requests = max(MAX_REQUESTS, batch)
    trace = _read(name, requests)
    if batch > 1:
        try:
            trace = full_batch(trace, batch, lambda: _read(name, BATCH_SEARCH))
        except ValueError as exc:
            raise NotPredictable(f"batch {batch}: trace {name}: {exc}") from None
    return trace.subset(requests, MAX_TOKENS + WARMUP)


def full_batch(trace: Trace, batch: int, wider: Callable[[], Trace]) -> Trace:
    """``batch`` sequences that each last the whole replay (``MAX_TOKENS + WARMUP`` tokens).
    A published throughput cell keeps its batch full while it is timed (MoE-Gen pads every
    request to one length and decodes each for the same number of tokens); replaying the
    trace's first requests as they are would let the short ones finish, and the batch shrink
    under the cell (DeepSeek-V2-Lite's prompts are 4 to 496 tokens: 32 fell to 9). So: the
    first ``batch`` requests with enough tokens, in the trace's order, searched among the
    first :data:`BATCH_SEARCH` (``wider``); a trace with too few such requests gives
    :func:`batch_segments` of its decode tokens (a trace of prompts only, as DeepSeek-V2-Lite's,
    has none to cut: ValueError). As many requests as the batch-1 replay's
    (``max(MAX_REQUESTS, batch)``) where the trace has them."""
    from moesim.traces.trace import RequestRouting

    need, keep = MAX_TOKENS + WARMUP, max(MAX_REQUESTS, batch)
    if len(trace.requests) >= keep and all(len(r.phase) >= need
                                           for r in trace.requests[:keep]):
        return trace
    wide = wider()
    long = [r for r in wide.requests if len(r.phase) >= need][:keep]
    if len(long) < batch:
        return batch_segments(wide, batch)
    return Trace(wide.meta, [RequestRouting(n, r.experts, r.phase, r.scores, r.tokens, r.label)
                             for n, r in enumerate(long)])


def batch_segments(trace: Trace, batch: int) -> Trace:
    """``batch`` concurrent sequences from a trace with fewer requests (Mixtral's has 5; MoE-
    Infinity's and MoE-Gen's throughput cells run 16 or 32): each request's decode tokens are
    cut into consecutive segments of one length, the longest that gives at least ``batch`` of
    them, taken round-robin over the requests (every request's first segment, then every
    second one, ...). Each segment is real decode routing in its real order, but its context
    starts at the segment (attention's KV read is understated, as in
    :func:`per_token_requests`) and segments of one request share its prompt, so the batch's
    sequences are more alike than independent requests would be (an assumption: the entries
    that use it name it)."""
    from moesim.traces.trace import DECODE, RequestRouting

    decode = [np.flatnonzero(r.phase == DECODE) for r in trace.requests]
    lengths = [len(d) for d in decode]
    length = next((n for n in range(max(lengths, default=0), 0, -1)
                   if sum(x // n for x in lengths) >= batch), 0)
    if length == 0:
        raise ValueError(f"{sum(lengths)} decode tokens cannot make {batch} sequences")
    pieces = [x // length for x in lengths]
    order = [(i, s) for s in range(max(pieces)) for i in range(len(pieces))
             if s < pieces[i]][:batch]
    out = []
    for n, (i, s) in enumerate(order):
        r, idx = trace.requests[i], decode[i][s * length:(s + 1) * length]
        out.append(RequestRouting(
            n, r.experts[idx], r.phase[idx], None if r.scores is None else r.scores[idx],
            None if r.tokens is None else [r.tokens[j] for j in idx], r.label))
    return Trace(trace.meta, out)


@functools.cache
def _prompts(name: str, tokens: int) -> Trace:
    """The trace's requests whose recorded prompt has at least ``tokens`` tokens, each cut to
    its first ``tokens`` prompt tokens (at most ``MAX_REQUESTS`` of them, searched among the
    first ``PROMPT_SEARCH`` requests): what a prefill entry with that input length replays."""
    from moesim.traces.trace import PREFILL, RequestRouting

    trace = _read(name, PROMPT_SEARCH)
    out = []
    for r in trace.requests:
        if len(r.phase) >= tokens and (r.phase[:tokens] == PREFILL).all():
            out.append(RequestRouting(len(out), r.experts[:tokens], r.phase[:tokens],
                                      None if r.scores is None else r.scores[:tokens]))
        if len(out) == MAX_REQUESTS:
            break
    if not out:
        raise NotPredictable(f"no request of trace {name} has a recorded prompt of {tokens} "
                             "tokens")
    return Trace(trace.meta, out)


def _non_expert_bytes(card: ModelCard) -> float:
    """Attention, router, dense FFN, shared experts, embeddings and LM head (GPU-resident)."""
    h = card.hidden_size
    q = (card.num_attention_heads * card.head_dim) or h
    kv = ((card.num_kv_heads or card.num_attention_heads) * card.head_dim) or h
    attn = card.num_layers * (2 * h * q + 2 * h * kv + h * card.num_experts)
    dense = len(card.dense_layers) * card.matrices_per_expert * h * card.dense_intermediate_size
    shared = card.num_moe_layers * card.shared_bytes_per_layer
    embed = 2 * card.vocab_size * h * card.dtype_bytes
    return (attn + dense) * card.attention_weight_bytes + shared + embed


def cache_setup(entry: Entry, card: ModelCard) -> tuple[int, str, int]:
    """(capacity in slots, partition, warm-up tokens) of the entry's cache."""
    layers, experts = card.num_moe_layers, card.num_experts
    total = layers * experts
    (kind, value), = entry.cache.items()
    if kind == "per_layer":
        return min(int(value), experts) * layers, "per_layer", 0
    if kind == "experts":
        return min(int(value), total), "global", 0
    if kind == "fraction":
        return capacity_slots(total, card.expert_bytes, fraction=float(value)), "global", 0
    if kind == "all":
        return total, "global", WARMUP
    if kind == "none":
        return (card.top_k + 1) * layers, "per_layer", 0
    free = float(value) * 2**30 - RESERVE_GIB * 2**30 - _non_expert_bytes(card)
    slots = math.floor(free / card.expert_bytes)
    if slots < layers:
        raise NotPredictable(f"{value} GiB leaves {max(slots, 0)} expert slots beside the "
                             "non-expert weights: fewer than one per layer")
    return min(slots, total), "global", 0


def policy_of(entry: Entry, recall: float = 1.0) -> dict[str, Any]:
    """The moesim policy of the entry (``policy: none`` -- no cache of its own -- is the
    smallest LRU a step runs in, see ``cache_setup``). A system's own speculative pre-loader
    finds the share ``recall`` of the next layer's experts (its runtime's ``prefetch.recall``;
    1: the oracle bound)."""
    eviction = "lru" if entry.policy == "none" else entry.policy
    if entry.policy == "moe_infinity":
        return {"name": "moe_infinity"}
    if entry.prefetch == "speculative" and recall < 1.0:
        return {"name": "speculative_prefetch", "eviction": eviction,
                "point": "demand_issued", "lookahead": 1, "recall": recall}
    if entry.prefetch in ("speculative", "oracle"):
        return {"name": "oracle_prefetch", "eviction": eviction, "point": "demand_issued",
                "lookahead": 1}
    if entry.prefetch == "next_layer_all":
        return {"name": "next_layer_all", "eviction": eviction}
    return {"name": eviction}


def prepare(entry: Entry) -> Prepared:
    trace_name = MODEL_TRACES.get(entry.model)
    if trace_name is None:
        raise NotPredictable(f"no real routing trace of {entry.model} in this project")
    if entry.phase == "request":
        raise NotPredictable("phase request (prefill and decode in one figure): not predicted "
                             "so far (the metrics have the split: prefill_time_s, "
                             "decode_time_s)")
    if entry.phase == "prefill" and entry.batch != 1:
        raise NotPredictable(f"prefill at batch {entry.batch}: only batch 1 is predicted")
    if entry.placement in UNMODELLED_PLACEMENTS:
        raise NotPredictable(f"placement {entry.placement}: "
                             f"{UNMODELLED_PLACEMENTS[entry.placement]}")
    if entry.placement not in PREDICTED_PLACEMENTS:
        raise NotPredictable(f"placement {entry.placement}: not predicted so far")
    if entry.placement in LAYER_SPLITS:
        gpu_layers_of(entry)  # refused before any trace is read
    if entry.phase == "prefill":
        if not entry.input_tokens:
            raise NotPredictable("prefill entry without an input length")
        trace = _prompts(trace_name, int(entry.input_tokens))
    else:
        trace = _trace(trace_name, entry.batch)
    card = load_card(entry.model).with_weights(
        entry.bits("experts"), entry.bits("attention"), entry.bits("shared"))
    from moesim.experiments.inputs import with_card_bytes

    routing = trace_name
    if trace.meta.top_k < card.top_k:
        if not routing_independent(entry):
            raise NotPredictable(f"trace {trace_name} routes top-{trace.meta.top_k} of the "
                                 f"model's {card.top_k} experts per token (it would understate "
                                 "the work of a setup whose time depends on the routing)")
        try:
            trace = complete_routing(trace, card.top_k, seed=0)
        except ValueError as exc:
            raise NotPredictable(f"trace {trace_name}: {exc}") from None
        routing = f"{trace_name}, completed to top-{card.top_k} (routing-independent entry)"
    trace = with_card_bytes(trace, card)
    capacity, partition, warmup = cache_setup(entry, card)
    placement = placement_of(entry, card)
    # --n-cpu-moe: whole layers' experts on the CPU, every other layer's on the GPU from load
    # (llama.cpp loads them before it serves), never fetched in the timed replay; a system that
    # caches the GPU share dynamically (HybriMoE's policy) starts empty
    static_split = placement == {"name": "static_cpu", "layers": None} and entry.policy == "static"
    if static_split:
        cpu = max(card.num_moe_layers - capacity // card.num_experts, 0)  # as static_cpu does
        placement = {"name": "static_cpu", "layers": cpu}
    if entry.placement in LAYER_SPLITS or static_split:  # a GPU layer's experts stay resident
        capacity, partition, warmup = card.num_moe_layers * card.num_experts, "global", WARMUP
    from moesim.policies.base import PolicyError
    from moesim.policies.registry import resolve

    try:  # an unknown policy is reported now, by the registry, not at the first prediction
        resolve(policy_of(entry))
    except PolicyError:
        raise NotPredictable(f"policy {entry.policy!r} has no moesim eviction policy") from None
    if entry.hw not in list_profiles():  # a GPU no profile describes yet (the entry names it)
        raise NotPredictable(f"no hardware profile {entry.hw!r} yet")
    profile = load_profile(entry.hw)  # a shipped profile that fails to load is an error
    no_reuse = "none" in entry.cache and placement is None
    if no_reuse:
        trace = per_token_requests(trace)
    replay = "prefill" if entry.phase == "prefill" else "decode"
    return Prepared(entry, trace, card, profile, capacity, partition, warmup,
                    bus_scale(entry, profile), no_reuse, entry.batch, replay, placement,
                    routing)


def routing_independent(entry: Entry) -> bool:
    """True when the entry's predicted time cannot depend on which experts the tokens route
    to, only on how many: one sequence decoding (each step reads exactly top-k experts per
    MoE layer, all of one size) where every expert sits in a place fixed before the run --
    all on the GPU (cache ``all``), whole layers' experts on the host CPU (``static_cpu``
    with no cache, ``-ot exps=CPU``, or a static split of a global budget, ``--n-cpu-moe``),
    or whole decoder layers on the CPU (``cpu_layers``). A cache that evicts (a dynamic
    policy beside the CPU layers), a per-layer GPU share, a prefetcher or a batch make the time
    depend on the routing. Such an entry of a model whose trace records fewer than its native
    top-k is replayed on the trace completed to top-k (:func:`complete_routing`); that the
    prediction does not move when a full trace is cut and completed is tested on models whose
    traces have the native k."""
    if entry.batch != 1 or entry.phase != "decode" or entry.prefetch != "none":
        return False
    if entry.placement == "fetch":
        return "all" in entry.cache
    if entry.placement == "static_cpu":  # all experts on the CPU, or a static layer split
        return "none" in entry.cache or ("per_layer" not in entry.cache
                                         and entry.policy == "static")
    return entry.placement == "cpu_layers"


def complete_routing(trace: Trace, top_k: int, seed: int) -> Trace:
    """``trace`` with every token's experts at every layer completed to ``top_k`` distinct
    ones: the recorded experts first, then experts drawn without replacement from the rest
    (``seed``). A layer the trace did not record for a token (a prompt's last layer, which
    llama.cpp computes for the prompt's last token only) is drawn whole, as the decode replay
    makes every token a step that routes at every layer. Scores are dropped (the added experts
    have none). Only for entries whose time does not depend on the routing
    (:func:`routing_independent`)."""
    from moesim.traces.trace import RequestRouting

    e, k = trace.meta.num_experts, trace.meta.top_k
    if top_k < k or top_k > e:
        raise ValueError(f"cannot complete top-{k} routing to top-{top_k} of {e} experts")
    rng = np.random.default_rng(seed)
    out = []
    for req in trace.requests:
        t, layers, _ = req.experts.shape
        full = np.empty((t, layers, top_k), np.int16)
        for i in range(t):
            for j in range(layers):
                have = req.experts[i, j]
                have = have[have >= 0]
                if len(have) not in (0, k) or len(np.unique(have)) != len(have):
                    raise ValueError(f"request {req.request_id}, token {i}, layer {j}: "
                                     f"neither {k} distinct recorded experts nor none")
                full[i, j, :len(have)] = have
                full[i, j, len(have):] = rng.choice(np.setdiff1d(np.arange(e), have),
                                                    top_k - len(have), replace=False)
        out.append(RequestRouting(req.request_id, full, req.phase, None, req.tokens,
                                  req.label))
    return Trace(replace(trace.meta, top_k=top_k), out)


def placement_of(entry: Entry, card: ModelCard) -> dict[str, Any] | None:
    """The moesim placement of the entry (None: fetch). ``static_cpu`` follows the cache: no
    cache puts every routed expert on the CPU (kTransformers, ``-ot exps=CPU``); ``per_layer:
    N`` keeps the policy's N experts of each layer on the GPU and computes every other one on
    the CPU (kTransformers' GPU experts); a global budget puts the routed experts of the first
    layers on the CPU, as many as do not fit (llama.cpp's ``--n-cpu-moe``)."""
    if entry.placement == "fetch":
        return None
    if entry.placement in LAYER_SPLITS:
        return {"name": entry.placement, "gpu_layers": gpu_layers_of(entry)}
    if entry.placement != "static_cpu":
        return {"name": entry.placement}
    if "none" in entry.cache:
        return {"name": "static_cpu", "layers": card.num_moe_layers}
    if "per_layer" in entry.cache:
        return {"name": "cpu_on_miss"}
    return {"name": "static_cpu", "layers": None}


def gpu_layers_of(entry: Entry) -> int:
    """The decoder layers on the GPU of a ``cpu_layers`` or ``layer_offload`` entry
    (llama.cpp's ``-ngl``, accelerate's device map): its ``gpu_layers`` assumption (stated by
    the source or reasoned from it; no source states it so far), never derived from the
    measurement."""
    for a in entry.assumptions:
        if a.field == "gpu_layers" and (a.entries is None or entry.id in a.entries):
            v = a.value
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise NotPredictable(f"placement {entry.placement}: gpu_layers assumption "
                                     f"{v!r} is not a whole number >= 0")
            return v
    raise NotPredictable(f"placement {entry.placement}: the entry has no gpu_layers assumption "
                         "(how many decoder layers ran on the GPU)")


def per_token_requests(trace: Trace) -> Trace:
    """Every token as a request of its own: with ``cache.reset_per_request`` the cache starts
    empty at every token, so a system without an expert cache reuses nothing (both engines
    reset the same way). Each token's attention then sees a context of 1 (the roofline's KV
    read is understated; at batch 1 it is microseconds beside the runtimes' overheads)."""
    from moesim.traces.trace import RequestRouting

    out, n = [], 0
    for req in trace.requests:
        for t in range(req.experts.shape[0]):
            scores = None if req.scores is None else req.scores[t:t + 1]
            out.append(RequestRouting(n, req.experts[t:t + 1], req.phase[t:t + 1], scores))
            n += 1
    return Trace(trace.meta, out)


def run_prepared(p: Prepared, runtime: RuntimeProfile,
                 policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of the prepared run under ``runtime`` (``policy``: another policy on the
    same setup, for what-if comparisons; default: the entry's own)."""
    def bus(link: Any) -> Any:  # the entry's PCIe generation (bus_scale)
        if p.link_scale == 1.0:
            return link
        return link.scaled_to_peak(link.peak_bandwidth_Bps * p.link_scale)

    # A cache with a slot for every expert (``p.warmup``: cache ``all`` and the layer splits'
    # GPU layers) starts full: a random fill of it is every expert. Warm-up tokens alone left
    # the experts they never routed to as demand copies later (5 of them in MoE-Gen's batch-32
    # DeepSeek-V2-Lite cell), though such a system loads every expert before it serves.
    prompt_only = p.replay == "prefill"
    if p.entry.runtime_options:  # the measured version's own rules (read from its code)
        runtime = with_structure(runtime, p.entry.runtime_options)
    link, compute = apply_runtime(runtime, bus(p.profile.expert_link()),
                                  p.profile.compute_model(p.card), p.card,
                                  lambda: bus(p.profile.host_link_model("pageable")))
    host = host_side(p.profile, p.card)
    if p.placement is not None:  # experts on the host CPU: the runtime's kernels
        host = apply_runtime_cpu(runtime, host, f"{p.profile.name} host_cpu")
    result = simulate(
        p.trace, policy or policy_of(p.entry, runtime.prefetch_recall), capacity=p.capacity,
        mode="timed", link=link, compute=compute, partition=p.partition,
        warmup_tokens=0 if prompt_only else p.warmup, seed=0, reset_per_request=p.no_reuse,
        batch=p.batch, prefill="random" if p.warmup else "empty",
        replay=p.replay,  # type: ignore[arg-type]
        dense_before=dense_layers_before(p.trace.meta.moe_layers, p.card.num_layers),
        host=host, staging=runtime.staging_buffers, placement=p.placement,
    )
    return result.summary


def predict_s_per_token(p: Prepared, runtime: RuntimeProfile) -> float:
    """Predicted seconds per token of the prepared run under ``runtime``: per output token
    (decode; with a batch, the step time over the batch's tokens, i.e. 1 / throughput), or
    per prompt token (phase prefill: the prompt as one chunk)."""
    s = run_prepared(p, runtime)
    if p.replay == "prefill":
        return 1.0 / float(s["prefill_tokens_per_s"])
    return float(s["time_per_output_token_s"])


def as_metric(entry: Entry, s_per_token: float) -> float:
    """The entry's metric from a predicted time per output token (not for speed-ups)."""
    if entry.metric == "tokens_per_s":
        return 1.0 / s_per_token
    if entry.metric == "s_per_token":
        return s_per_token
    raise ValueError(f"{entry.id}: a speed-up is a ratio of two predictions")


def runtime_of(entry: Entry) -> RuntimeProfile:
    return load_runtime(entry.runtime)
