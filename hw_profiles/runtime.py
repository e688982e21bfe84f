"""Runtime profiles: what an inference runtime adds to the hardware's roofline.

A hardware profile says how fast the GPU, the host link and the host CPU *can* be; a runtime
profile (one YAML in ``hw_profiles/runtimes/``, the config group ``runtime``) says what one
software stack does on top of that: fixed host-side cost per layer, per routed-expert call and
per decode step (Python, kernel launches, gather/scatter), on-the-fly dequantisation of
quantised experts, and how it copies experts (pinned or pageable host memory, how many tensors
per expert and what each copy call costs, whether an eviction copies the evicted expert back to
the host on the same stream, staging buffers outside the cache).

Why a second axis: measured offloading systems on the same GPU differ by 2-4x, and the missing
time is additive and does not scale with the GPU (a single compute multiplier fitted on an A100
is 3-5x off on a T4). Every number here carries ``{value, unit, kind, source}`` like a hardware
profile; parameters fitted to published measurements have ``kind: fitted`` and name their
calibration set (``moesim.experiments.published.fit``), and are never judged on it.

The model is applied in one place, :func:`apply_runtime`, which wraps the profile's
``TransferModel`` and ``ComputeTimes``: both engines (SimPy and compiled) take every duration
from those two objects. Some copy rules are not durations and are laid out by the engines
(``sim.link.CopyRules``, read from :class:`RuntimeLink`): a swap copies an evicted expert back
when an install evicts one; copies on the compute stream pause while GPU kernels run (the
engines take the host part of each compute time from :class:`RuntimeCompute`'s ``*_host``);
``copy.order: fifo`` makes that stream run in issue order (a kernel waits for every copy
handed before it; ``copy.window`` demand copies are handed when a layer routes); and
``copy.host_s`` is the host's work to issue each demand copy and each prefetch copy that
starts, in series with the layer;
``copy.prefetch_stream: own`` (fifo only) moves prefetch copies to a stream of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .host_cpu import CpuKernels, parse_cpu_kernels
from .schema import (
    Ctx,
    ProfileError,
    Quantity,
    as_mapping,
    as_str,
    load_yaml,
    missing,
    quantity,
    reject_unknown,
)

RUNTIMES_DIR = Path(__file__).parent / "runtimes"
HOST_MEMORY = ("pinned", "pageable")
STREAMS = ("own", "compute")
# How a compute stream orders its kernels among its copies: ``ready`` (a kernel waits only for
# its own expert's copy) or ``fifo`` (for every copy handed to the stream before it).
ORDERS = ("ready", "fifo")
# Where the host waits for the compute stream (fifo only): ``none`` (only where the engines
# always wait: routing, an awaited copy) or ``expert`` (before each expert call's host work).
SYNCS = ("none", "expert")
# Which stream a prefetch copy runs on (fifo only): ``compute`` (handed to the compute stream
# once it starts on the link: it gates every later kernel and pauses while kernels run) or
# ``own`` (a stream of its own: it gates no kernel and runs on wall time, ``sim.link``).
PREFETCH_STREAMS = ("compute", "own")
# How a step's routed-expert kernels take its tokens (``compute.expert_calls``): ``batched``
# (one kernel per expert over all the tokens routed to it) or ``per_token`` (one single-token
# kernel per token and expert, as llama.cpp's CUDA backend ran MoE prompts from its first
# Mixtral support, PR #4406 of 2023-12-13, until PR #4538 of 2023-12-20: a multi-token step
# then costs each expert what that many one-token steps would).
EXPERT_CALLS = ("batched", "per_token")
# The free parameters a fit may set (dotted paths into the YAML) and their dimension.
FITTABLE: dict[str, str] = {
    "overhead.step_s": "s",
    "overhead.layer_s": "s",
    "overhead.expert_s": "s",
    "dequant.Bps": "Bps",
    "copy.per_copy_s": "s",
    "copy.host_s": "s",
    "copy.efficiency": "ratio",
    "prefetch.recall": "ratio",
    # a CPU kernel's throughput per dtype class, x the host's FLOP/s (``cpu_kernels``)
    "cpu_kernels.int4": "factor",
    "cpu_kernels.int8": "factor",
    "cpu_kernels.bf16": "factor",
    "cpu_kernels.fp32": "factor",
}
# The discrete (structural) choices a fit may select among, per dotted YAML key: a runtime's
# published entries may not say which of a system's rules held in the measured runs (its code
# may differ from the measured build), so the fit compares the declared alternatives on the
# calibration set alone (``moesim.experiments.published.fit.STRUCTURES``).
# A published entry may also name the choice its system's version makes (``runtime_options``:
# a fact read from that version's code, never fitted).
STRUCTURAL: dict[str, tuple[str, ...]] = {"copy.swap": ("false", "true", "always"),
                                          "compute.expert_calls": EXPERT_CALLS}
_ATTR = {"overhead.step_s": "step_s", "overhead.layer_s": "layer_s",
         "overhead.expert_s": "expert_s", "dequant.Bps": "dequant_Bps",
         "copy.per_copy_s": "per_copy_s", "copy.host_s": "host_s",
         "copy.efficiency": "efficiency",
         "prefetch.recall": "recall"}


def _zero(field_: str) -> Quantity:
    return Quantity(0.0, "estimate", "none", field_)


@dataclass(frozen=True)
class RuntimeProfile:
    """One inference runtime's costs on top of the hardware (all seconds / bytes per second)."""

    name: str
    system: str = ""
    description: str = ""
    host_memory: str | None = None  # None: the hardware profile's own choice
    stream: str = "own"  # "compute": copies share the compute stream (see ``swap``)
    swap: bool = False  # an eviction copies the evicted expert back (device -> host)
    # ``swap: always``: every load copies an expert back, evicting or not (the runtime's
    # device slots are always full: moesim's empty or per-token caches are not)
    swap_always: bool = False
    tensors_per_expert: Quantity = field(default_factory=lambda: missing("tensors_per_expert"))
    per_copy_s: Quantity = field(default_factory=lambda: _zero("copy.per_copy_s"))
    # the compute thread's own work to issue one demand copy (not on the link: in series
    # with the layer's host work; ``sim.link.CopyRules.issue_time``)
    host_s: Quantity = field(default_factory=lambda: _zero("copy.host_s"))
    # ``copy.order``: ``fifo`` runs the compute stream in issue order (``sim.link.CopyRules``);
    # ``window`` demand copies are handed to it when the layer routes (``copy.window``, else
    # ``staging_buffers - 1``), the next one after each loaded expert's kernel
    order: str = "ready"
    window: Quantity = field(default_factory=lambda: missing("copy.window"))
    sync: str = "none"  # ``copy.sync``: ``expert``: the host syncs before each expert call
    # ``copy.prefetch_stream`` (fifo only): ``own``: prefetch copies on a stream of their own
    prefetch_stream: str = "compute"
    efficiency: Quantity = field(default_factory=lambda: missing("copy.efficiency"))
    staging_buffers: int = 0
    whole_layer: bool = False  # every miss moves the whole MoE block (all experts of the layer)
    expert_calls: str = "batched"  # ``compute.expert_calls`` (see EXPERT_CALLS)
    step_s: Quantity = field(default_factory=lambda: _zero("overhead.step_s"))
    layer_s: Quantity = field(default_factory=lambda: _zero("overhead.layer_s"))
    expert_s: Quantity = field(default_factory=lambda: _zero("overhead.expert_s"))
    dequant_Bps: Quantity = field(default_factory=lambda: missing("dequant.Bps"))
    # The system's own next-layer pre-loader (published entries with prefetch: speculative):
    # the share of the next layer's true experts its guess finds (missing: 1, the oracle).
    recall: Quantity = field(default_factory=lambda: missing("prefetch.recall"))
    fit: tuple[str, ...] = ()
    notes: str = ""
    # the runtime's host-CPU expert kernels per weight dtype (``host_cpu.CpuKernels``); they
    # change only CPU-placed experts (``apply_runtime_cpu``), never the link or the GPU
    cpu_kernels: CpuKernels | None = None

    @property
    def is_none(self) -> bool:
        """True when the runtime adds nothing (the roofline runs exactly as without one)."""
        tensors = int(self.tensors_per_expert.value) if self.tensors_per_expert.known else 1
        eff = float(self.efficiency.value) if self.efficiency.known else 1.0
        return (self.host_memory is None and not self.swap and self.stream == "own"
                and not self.whole_layer and self.expert_calls == "batched"
                and tensors == 1 and eff == 1.0 and self.staging_buffers == 0
                and not self.dequant_Bps.known
                and all(self.value(k) == 0.0 for k in ("overhead.step_s", "overhead.layer_s",
                                                        "overhead.expert_s", "copy.per_copy_s",
                                                        "copy.host_s")))

    def value(self, name: str) -> float:
        """A parameter's value by its dotted YAML path (0 / None-as-0 for unknown numbers)."""
        q = self.quantity(name)
        return float(q.value) if q.known else 0.0

    @property
    def fifo_window(self) -> int:
        """Demand copies handed to the compute stream when a layer routes (0: not ``fifo``)."""
        if self.order != "fifo":
            return 0
        if self.window.known:
            return int(self.window.value)
        return self.staging_buffers - 1

    @property
    def prefetch_recall(self) -> float:
        return float(self.recall.value) if self.recall.known else 1.0

    def quantity(self, name: str) -> Quantity:
        if name.startswith("cpu_kernels.") and name in FITTABLE:
            rates = self.cpu_kernels.rates if self.cpu_kernels is not None else {}
            return rates.get(name.split(".", 1)[1]) or missing(name)
        attr = _ATTR.get(name)
        if attr is None:
            raise KeyError(name)
        return getattr(self, attr)

    def describe(self) -> str:
        """One line for the summary row: what this runtime adds."""
        parts = [f"step {self.value('overhead.step_s') * 1e3:.3g} ms",
                 f"layer {self.value('overhead.layer_s') * 1e6:.3g} us",
                 f"expert {self.value('overhead.expert_s') * 1e6:.3g} us"]
        if self.value("copy.host_s"):
            parts.append(f"issue {self.value('copy.host_s') * 1e6:.3g} us per copy started")
        if self.dequant_Bps.known:
            parts.append(f"dequant {float(self.dequant_Bps.value) / 1e9:.3g} GB/s")
        parts.append(f"copies {self.host_memory or 'profile'}-memory, {self.stream} stream"
                     + ((", swap always" if self.swap_always else ", swap") if self.swap
                        else "")
                     + (f", fifo window {self.fifo_window}" if self.order == "fifo" else "")
                     + (", host syncs per expert" if self.sync == "expert" else "")
                     + (", prefetches on their own stream" if self.prefetch_stream == "own"
                        else ""))
        if self.expert_calls == "per_token":
            parts.append("one expert kernel per token")
        return f"{self.name}: " + ", ".join(parts)


def _cpu_kernels(ctx: Ctx, raw: Mapping[str, Any] | None, name: str,
                 fit: Any) -> CpuKernels | None:
    """A runtime's ``cpu_kernels``: its own, or ``{same_as: <runtime>}``, the kernels of
    another shipped runtime running the same CPU code (llama.cpp's build eras share ggml's),
    so that their factors and sources live in one YAML. Shared factors are that runtime's to
    fit, never this one's."""
    if not raw:
        return None
    if "same_as" not in raw:
        return parse_cpu_kernels(ctx, raw, name)
    reject_unknown(ctx, raw, {"same_as"})
    other = as_str(ctx.sub("same_as"), raw.get("same_as"), required=True)
    if other == name:
        raise ctx.sub("same_as").error("names this runtime itself", other)
    if isinstance(fit, list) and any(str(f).startswith("cpu_kernels.") for f in fit):
        raise ctx.sub("same_as").error(f"shared kernels are fitted in {other}'s profile, "
                                       "not in fit here", other)
    try:
        shared = load_runtime(other).cpu_kernels
    except ProfileError as exc:
        raise ctx.sub("same_as").error(str(exc), other) from None
    if shared is None:
        raise ctx.sub("same_as").error(f"runtime {other!r} has no CPU kernels", other)
    from dataclasses import replace

    return replace(shared, runtime=name)


def runtime_from_mapping(data: Mapping[str, Any], where: str = "<runtime>",
                         allow_bare: bool = True) -> RuntimeProfile:
    """Validate a runtime YAML (or a Hydra node) into a profile; one clear error on bad input."""
    ctx = Ctx(where, allow_bare=allow_bare)
    if not isinstance(data, Mapping):
        raise ctx.error("a runtime profile must be a mapping", data)
    reject_unknown(ctx, data, {"name", "system", "description", "copy", "overhead", "dequant",
                               "prefetch", "fit", "notes", "cpu_kernels", "compute"})
    name = as_str(ctx.sub("name"), data.get("name"), required=True)
    kraw = as_mapping(ctx.sub("cpu_kernels"), data.get("cpu_kernels"))
    kernels = _cpu_kernels(ctx.sub("cpu_kernels"), kraw, name, data.get("fit") or [])
    copy = as_mapping(ctx.sub("copy"), data.get("copy")) or {}
    cctx = ctx.sub("copy")
    reject_unknown(cctx, copy, {"host_memory", "stream", "swap", "tensors_per_expert",
                                "per_copy_s", "host_s", "efficiency", "staging_buffers",
                                "whole_layer", "order", "window", "sync", "prefetch_stream"})
    whole = copy.get("whole_layer", False)
    if not isinstance(whole, bool):
        raise cctx.sub("whole_layer").error("expected true or false", whole)
    pre = as_mapping(ctx.sub("prefetch"), data.get("prefetch")) or {}
    reject_unknown(ctx.sub("prefetch"), pre, {"recall"})
    host_memory = copy.get("host_memory")
    if host_memory is not None and host_memory not in HOST_MEMORY:
        raise cctx.sub("host_memory").error(f"must be one of {list(HOST_MEMORY)} or null",
                                            host_memory)
    stream = copy.get("stream", "own")
    if stream not in STREAMS:
        raise cctx.sub("stream").error(f"must be one of {list(STREAMS)}", stream)
    swap = copy.get("swap", False)
    if not isinstance(swap, bool) and swap != "always":
        raise cctx.sub("swap").error("expected true, false or always", swap)
    staging = copy.get("staging_buffers", 0)
    if isinstance(staging, Mapping):
        staging = staging.get("value", 0)
    if isinstance(staging, bool) or not isinstance(staging, int) or staging < 0:
        raise cctx.sub("staging_buffers").error("must be a whole number >= 0", staging)
    order = copy.get("order", "ready")
    if order not in ORDERS:
        raise cctx.sub("order").error(f"must be one of {list(ORDERS)}", order)
    if order == "fifo" and stream != "compute":
        raise cctx.sub("order").error("fifo orders the compute stream: it needs copy.stream: "
                                      "compute", order)
    window = quantity(cctx.sub("window"), copy.get("window"), "count")
    if window.known and order != "fifo":
        raise cctx.sub("window").error("is the fifo hand-off window: it needs copy.order: "
                                       "fifo", copy.get("window"))
    if order == "fifo":
        w = window.value if window.known else staging - 1
        if not window.known and staging < 2:
            raise cctx.sub("order").error(
                "fifo needs copy.window or copy.staging_buffers >= 2 (the window is "
                f"staging_buffers - 1 = {w})", order)
        if window.known and (w != int(w) or w < 1):
            raise cctx.sub("window").error("must be a whole number >= 1",
                                           copy.get("window"))
    sync = copy.get("sync", "none")
    if sync not in SYNCS:
        raise cctx.sub("sync").error(f"must be one of {list(SYNCS)}", sync)
    if sync != "none" and order != "fifo":
        raise cctx.sub("sync").error("a host sync with the compute stream needs copy.order: "
                                     "fifo", sync)
    pstream = copy.get("prefetch_stream", "compute")
    if pstream not in PREFETCH_STREAMS:
        raise cctx.sub("prefetch_stream").error(f"must be one of {list(PREFETCH_STREAMS)}",
                                                pstream)
    if pstream == "own" and order != "fifo":
        raise cctx.sub("prefetch_stream").error(
            "own separates prefetches from the compute stream's issue order: it needs "
            "copy.order: fifo", pstream)
    comp = as_mapping(ctx.sub("compute"), data.get("compute")) or {}
    reject_unknown(ctx.sub("compute"), comp, {"expert_calls"})
    calls = comp.get("expert_calls", "batched")
    if calls not in EXPERT_CALLS:
        raise ctx.sub("compute").sub("expert_calls").error(
            f"must be one of {list(EXPERT_CALLS)}", calls)
    over = as_mapping(ctx.sub("overhead"), data.get("overhead")) or {}
    octx = ctx.sub("overhead")
    reject_unknown(octx, over, {"step_s", "layer_s", "expert_s"})
    deq = as_mapping(ctx.sub("dequant"), data.get("dequant")) or {}
    reject_unknown(ctx.sub("dequant"), deq, {"Bps"})

    def q(c: Ctx, node: Mapping[str, Any], key: str, dim: str, positive: bool) -> Quantity:
        out = quantity(c.sub(key), node.get(key), dim, positive=positive)
        return out if out.known or node.get(key) is not None else _zero(c.sub(key).path)

    fit = data.get("fit") or []
    if not isinstance(fit, list) or any(f not in FITTABLE for f in fit):
        raise ctx.sub("fit").error(f"must be a list of {sorted(FITTABLE)}", fit)
    return RuntimeProfile(
        name=name,
        system=as_str(ctx.sub("system"), data.get("system")),
        description=as_str(ctx.sub("description"), data.get("description")),
        host_memory=host_memory,
        stream=stream,
        swap=bool(swap),
        swap_always=swap == "always",
        tensors_per_expert=quantity(cctx.sub("tensors_per_expert"),
                                    copy.get("tensors_per_expert"), "count"),
        per_copy_s=q(cctx, copy, "per_copy_s", "s", False),
        host_s=q(cctx, copy, "host_s", "s", False),
        order=order,
        window=window,
        sync=sync,
        prefetch_stream=pstream,
        efficiency=quantity(cctx.sub("efficiency"), copy.get("efficiency"), "ratio"),
        staging_buffers=int(staging),
        whole_layer=whole,
        expert_calls=calls,
        recall=quantity(ctx.sub("prefetch").sub("recall"), pre.get("recall"), "ratio"),
        step_s=q(octx, over, "step_s", "s", False),
        layer_s=q(octx, over, "layer_s", "s", False),
        expert_s=q(octx, over, "expert_s", "s", False),
        dequant_Bps=quantity(ctx.sub("dequant").sub("Bps"), deq.get("Bps"), "Bps"),
        fit=tuple(fit),
        notes=as_str(ctx.sub("notes"), data.get("notes")),
        cpu_kernels=kernels,
    )


def list_runtimes() -> list[str]:
    """Names of the runtime YAMLs shipped in hw_profiles/runtimes/ and in plugins."""
    from moesim.plugins import profile_files

    return sorted(profile_files("moesim.runtimes", RUNTIMES_DIR))


def runtime_path(name: str) -> Path:
    from moesim.plugins import profile_files

    path = profile_files("moesim.runtimes", RUNTIMES_DIR).get(name, RUNTIMES_DIR / "-")
    if not path.is_file():
        raise ProfileError(f"unknown runtime {name!r}; shipped: {', '.join(list_runtimes())}")
    return path


def load_runtime(name_or_path: str | Path) -> RuntimeProfile:
    """A shipped runtime by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = runtime_path(str(name_or_path))
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read runtime profile: {exc.strerror}") from None
    return runtime_from_mapping(load_yaml(text, str(path)), str(path), allow_bare=False)


def with_values(rt: RuntimeProfile, values: Mapping[str, float], source: str) -> RuntimeProfile:
    """``rt`` with fittable parameters replaced (``kind: fitted``): what a fit evaluates."""
    from dataclasses import replace

    attr = _ATTR
    changes: dict[str, Any] = {}
    rates = dict(rt.cpu_kernels.rates) if rt.cpu_kernels is not None else {}
    for key, v in values.items():
        if key not in attr and not (key.startswith("cpu_kernels.") and key in FITTABLE):
            raise KeyError(key)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{key} must be finite and >= 0, got {v}")
        if key in attr:
            changes[attr[key]] = Quantity(float(v), "fitted", source, key)
        else:
            rates[key.split(".", 1)[1]] = Quantity(float(v), "fitted", source, key)
    if rt.cpu_kernels is not None or rates:
        kernels = rt.cpu_kernels or CpuKernels(rt.name)
        changes["cpu_kernels"] = replace(kernels, rates=rates)
    return replace(rt, **changes)


def structure_value(rt: RuntimeProfile, key: str) -> str:
    """A structural choice of ``rt`` as its YAML spells it (see :data:`STRUCTURAL`)."""
    if key == "copy.swap":
        return "always" if rt.swap_always else ("true" if rt.swap else "false")
    if key == "compute.expert_calls":
        return rt.expert_calls
    raise KeyError(key)


def with_structure(rt: RuntimeProfile, choice: Mapping[str, str]) -> RuntimeProfile:
    """``rt`` with structural choices replaced (what a fit's alternative evaluates)."""
    from dataclasses import replace

    changes: dict[str, Any] = {}
    for key, v in choice.items():
        allowed = STRUCTURAL.get(key)
        if allowed is None:
            raise KeyError(key)
        if v not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {v!r}")
        if key == "copy.swap":
            changes["swap"] = v != "false"
            changes["swap_always"] = v == "always"
        elif key == "compute.expert_calls":
            changes["expert_calls"] = v
    return replace(rt, **changes)


# --------------------------------------------------------------------------------------------
# The model: one wrapper per protocol, used by both engines.


@dataclass(frozen=True)
class RuntimeLink:
    """Copy time of one copy under a runtime: ``tensors x per_copy_s`` call cost and the wire
    time at the runtime's share of the link (``efficiency``).

    ``swap`` (mixtral-offloading's ``ExpertCache._swap``): an install that evicts a resident
    expert first copies the evicted one back device -> host, on the same stream as the load.
    It is an event of the link (``sim.link.HostLink``, mirrored by the compiled link), not a
    blanket factor: a copy that evicts nothing (a cold cache, a per-token cache loading into
    free slots or staging buffers) copies nothing back, unless ``swap_always`` (``swap:
    always``): every load copies one back, as a runtime whose device slots are always full
    does (mixtral-offloading fills its main modules when experts are registered, and
    ``_swap`` always evicts one), whatever moesim's cache holds. :meth:`swap_time` is its
    cost. With
    ``stream: compute`` the load waits behind it (both on the one stream); with ``stream: own``
    it runs on the other direction of the full-duplex link, where nothing else is copied in
    this model, and costs the load nothing (it is still counted).

    ``stream: compute``: the copies are issued on the compute stream, so they cannot run while
    a GPU kernel of that stream runs, only while the GPU waits on the host (the runtime's
    ``overhead.*`` times, :class:`RuntimeCompute`'s ``*_host`` parts) or on the copy itself.
    Both engines run such a link on a clock that stops during kernels (``sim.link``).

    ``host_s`` (``copy.host_s``): the compute thread's own work to issue one demand copy
    (a cache lookup, the eviction decision, the hand-off to a copy worker or the copy call),
    paid on the host in series with the layer's other host work, never on the link: the
    layer's demand copies, and the prefetch copies started on the link since the previous
    layer's routing, cost ``n x host_s`` right after routing (``sim.link.CopyRules``).

    ``window`` (``copy.order: fifo``, compute stream only): the stream runs copies and kernels
    in the order the host hands them over, so a kernel waits for every copy handed before it,
    not only its own; a layer's first ``window`` demand copies are handed when it routes
    (before any of its kernels), each further one after the kernel of the loaded expert
    ``window`` places before it (mixtral-offloading's ``ExpertCache.load_experts``).
    ``sync`` (``copy.sync: expert``): the host waits for the stream before each expert call's
    host work (mixtral-offloading's ``top_x.tolist()`` per expert), so that work cannot run
    beside a copy handed before it. ``prefetch_stream`` (``copy.prefetch_stream: own``, fifo
    only): prefetch copies run on a stream of their own, so they hold no kernel of the
    compute stream and are not paused by its kernels; they still queue on the copy engines
    with the demand copies, and an expert whose prefetch is in flight waits for it
    (``sim.link.CopyRules.own_prefetch``). It needs fifo because only there is it exact to
    run the link on wall time: no demand copy overlaps a kernel in issue order.

    ``bytes_factor`` (``copy.whole_layer``): a runtime that moves a whole MoE block whenever the
    layer runs (HF accelerate's module offloading) copies num_experts / top_k experts' bytes per
    routed expert it misses; with no cache of its own every routed expert misses, so a layer
    costs its whole block (an expert reused from the minimal cache saves its share: understated
    by that reuse). That holds at batch 1; a batch that misses more than top_k distinct experts
    of a layer pays more than one block here, as the ``fetch`` placement charges each miss.
    ``layer_offload`` charges an offloaded layer's block once per step instead
    (``sim.cpu_layers.offload_layer_times``).
    """

    base: Any  # TransferModel
    tensors: int = 1
    per_copy_s: float = 0.0
    efficiency: float = 1.0
    swap: bool = False  # an eviction copies the evicted expert back (device -> host)
    bytes_factor: float = 1.0  # whole-layer runtimes: the layer's experts per routed expert
    stream: str = "own"  # "compute": copies pause while the compute stream runs a kernel
    swap_always: bool = False  # every load copies an expert back, evicting or not
    host_s: float = 0.0  # the compute thread's work to issue one demand copy (``copy.host_s``)
    window: int = 0  # ``copy.order: fifo``: demand copies handed at routing (0: ``ready``)
    sync: bool = False  # ``copy.sync: expert``: the host waits for the stream per expert call
    prefetch_stream: str = "compute"  # ``own``: prefetch copies on their own stream (fifo)

    @property
    def compute_stream(self) -> bool:
        return self.stream == "compute"

    @property
    def copy_engines(self) -> int:
        return int(self.base.copy_engines)

    def transfer_time(self, nbytes: int) -> float:
        if nbytes <= 0:
            return 0.0
        nbytes = int(nbytes * self.bytes_factor)
        per = max(1, int(nbytes) // self.tensors)
        wire = self.tensors * self.base.transfer_time(per) / self.efficiency
        return self.tensors * self.per_copy_s + wire

    def swap_time(self, nbytes: int) -> float:
        """The device -> host copy of one evicted expert of ``nbytes`` (0 without ``swap``):
        the same calls and wire rate as the load (PCIe is symmetric; pinned memory)."""
        return self.transfer_time(nbytes) if self.swap else 0.0


@dataclass(frozen=True)
class RuntimeCompute:
    """Compute times under a runtime: the hardware's times plus fixed host-side costs.

    ``step_s`` (embedding, LM head, sampling, the Python loop) is spread evenly over the step's
    layers (the engine times layers, not steps; the step's total is exact). Each routed or
    shared expert call adds ``expert_s`` and, with a dequantising runtime, reading its packed
    weights once more at ``dequant_Bps``. With ``per_token`` (``compute.expert_calls``) a
    routed expert with ``n`` tokens is ``n`` single-token calls: ``n`` times one token's time,
    host part included (each call reads the expert's weights again). GPU experts only: a
    CPU-placed expert's time is the host side's (``apply_runtime_cpu``)."""

    base: Any  # ComputeTimes
    layers: int
    step_s: float = 0.0
    layer_s: float = 0.0
    expert_s: float = 0.0
    expert_dequant_s: float = 0.0
    shared_dequant_s: float = 0.0
    per_token: bool = False

    def _fixed(self) -> float:
        return self.layer_s + self.step_s / max(1, self.layers)

    # The host-side parts of the times below (the ``overhead.*`` costs: Python, launches,
    # gather/scatter), during which the GPU's stream is idle: copies on the compute stream
    # (``RuntimeLink.stream``) run then. The rest of each time is GPU kernel time
    # (dequantisation included: HQQ's Triton kernels dequantise on the GPU).
    def attention_host(self, batch: int) -> float:
        return self._fixed() if batch > 0 else 0.0

    def dense_layer_host(self, batch: int) -> float:
        return self._fixed() if batch > 0 else 0.0

    def expert_host(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.expert_s * tokens if self.per_token else self.expert_s

    def shared_host(self, tokens: int) -> float:
        return self.expert_s if self.base.shared_time(tokens) > 0 else 0.0

    def attention_time(self, batch: int, context: int) -> float:
        t = self.base.attention_time(batch, context)
        return t + self._fixed() if batch > 0 else t

    def router_time(self, batch: int) -> float:
        return self.base.router_time(batch)

    def expert_time(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        if self.per_token:
            return tokens * (self.base.expert_time(1) + self.expert_s + self.expert_dequant_s)
        return self.base.expert_time(tokens) + self.expert_s + self.expert_dequant_s

    def shared_time(self, tokens: int) -> float:
        t = self.base.shared_time(tokens)
        return t + self.expert_s + self.shared_dequant_s if t > 0 else t

    def dense_layer_time(self, batch: int, context: int) -> float:
        t = self.base.dense_layer_time(batch, context)
        return t + self._fixed() if batch > 0 else t


def apply_runtime(rt: RuntimeProfile | None, link: Any, compute: Any, card: Any,
                  pageable: Callable[[], Any] | None = None) -> tuple[Any, Any]:
    """(link, compute) of a run under ``rt``; unchanged objects when the runtime adds nothing,
    so runs without a runtime (``runtime=none``) are bit-identical to before runtimes existed.

    ``pageable`` builds the hardware profile's pageable-memory link (e.g.
    ``lambda: profile.host_link_model("pageable")``); it is called only when the runtime copies
    from pageable host memory, so other runs never build that link."""
    if rt is None or rt.is_none:
        return link, compute
    if link is not None:
        base = link
        if rt.host_memory == "pageable":
            try:
                base = pageable() if pageable is not None else None
            except ProfileError:
                base = None
            if base is None:
                raise ProfileError(f"runtime {rt.name!r} copies from pageable host memory, but "
                                   "the hardware profile has no host_link.pageable rate")
        tensors = int(rt.tensors_per_expert.value) if rt.tensors_per_expert.known else 1
        eff = float(rt.efficiency.value) if rt.efficiency.known else 1.0
        factor = card.num_experts / card.top_k if rt.whole_layer else 1.0
        tensors = max(1, round(tensors * factor))  # a whole block: every tensor of it
        link = RuntimeLink(base, tensors, rt.value("copy.per_copy_s"), eff, rt.swap, factor,
                           rt.stream, rt.swap_always, rt.value("copy.host_s"), rt.fifo_window,
                           rt.sync == "expert", rt.prefetch_stream)
    if compute is not None:
        deq_e = deq_s = 0.0
        if rt.dequant_Bps.known:
            bps = float(rt.dequant_Bps.value)
            deq_e = card.expert_bytes / bps
            deq_s = card.shared_bytes_per_layer / bps
        compute = RuntimeCompute(compute, max(1, int(card.num_layers)), rt.value("overhead.step_s"),
                                 rt.value("overhead.layer_s"), rt.value("overhead.expert_s"),
                                 deq_e, deq_s, rt.expert_calls == "per_token")
    return link, compute


def apply_runtime_cpu(rt: RuntimeProfile | None, host: Any, where: str = "host_cpu") -> Any:
    """The run's host side (``sim.hardware.HostSide``) under ``rt``'s CPU expert kernels: its
    host CPU model with the runtime's per-dtype kernels (``HostCpuModel.with_kernels``);
    unchanged without kernels or without a host CPU. The one place both engines' CPU expert
    times get the runtime from (the engines take them from ``host.cpu``)."""
    if rt is None or rt.cpu_kernels is None or host is None or host.cpu is None:
        return host
    from dataclasses import replace

    if not hasattr(host.cpu, "with_kernels"):
        raise ProfileError(f"runtime {rt.name!r} has CPU kernels, but the host CPU model "
                           f"{type(host.cpu).__name__} cannot take them")
    try:
        return replace(host, cpu=host.cpu.with_kernels(rt.cpu_kernels, where))
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
