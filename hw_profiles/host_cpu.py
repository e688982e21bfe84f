"""The host CPU as a place to run a missed expert: profile section ``host_cpu`` and its time model.

Why: a missed expert need not be copied to the GPU. Fiddler (arXiv 2402.07033) computes it on the
CPU where its weights already are and ships only the activations; llama.cpp (``--n-cpu-moe``,
``-ot exps=CPU``) and kTransformers keep routed experts on the CPU for good. Whether that beats a
copy depends on how fast the host runs one expert FFN, which this module models the way
``compute.py`` models the GPU:

* a roofline over the host's *effective* memory bandwidth and FLOP/s (measured if the profile has
  them, else spec x efficiency), because a decode-size expert FFN on a CPU reads every weight
  once for a few tokens and is memory-bound (Fiddler's own analysis), turning compute-bound only
  at large token counts;
* plus a fixed per-expert overhead (thread-pool wake-up, kernel dispatch) that no roofline sees;
* optionally a measured per-expert table for one model card (``measured.<card>.expert_s``,
  ``[[tokens, s], ...]``) that replaces the roofline where it applies: inside the measured token
  range it is interpolated, beyond it the roofline's growth is added, and only for a card of
  exactly the measured shape and dtype (``measured_at``, as ``compute.MeasuredTable``).

``parallel`` is how many expert executions the host runs at once. The shipped profiles assume 1,
as Fiddler does: one expert at a time with every core (its CPU kernel parallelises inside the
matmuls), and so does llama.cpp's thread pool. With ``parallel`` k each execution gets 1/k of the
bandwidth and FLOP/s, so k experts take as long as k one after the other would; a simulator
models the queue.

Low precision (HOBBIT-style int8/int4 copies computed on the CPU): ``expert_time(tokens, bits)``
scales the weight bytes by ``bits / (card dtype bits)``. The arithmetic is unchanged (weights are
dequantised to the compute type), so a compute-bound expert gains nothing. With a measured
table (taken at the card's dtype) the part above the fixed overhead is scaled by the roofline's
ratio ``roofline(bits) / roofline(card dtype)`` at that token count.

Runtime CPU kernels (``cpu_kernels`` of a runtime profile, :class:`CpuKernels`): what a
runtime's own expert kernel achieves per weight dtype on this host. The host section lists the
CPU's instruction sets (``isa``: avx2, avx512f, avx512_bf16, avx512_vnni, amx, ...); the runtime
gives, per dtype class (``int4`` up to 6.6 bits per weight: k-quants, Q4_0, GPTQ/AWQ groups;
``int8`` up to 8.5; ``bf16`` (fp16 too) up to 16; ``fp32``), the kernel's arithmetic
throughput as a factor of the host's effective FLOP/s (``<dtype>``, or ``<dtype>_on_<isa>``
where the host has that ISA: bf16 with AVX512-BF16 or AMX, int8 with VNNI) and, where the
kernel converts the weights to its compute type once per call (PyTorch's bf16 upconverted to
fp32 on a CPU without AVX512-BF16), the conversion rate ``<dtype>_dequant_Bps`` of the packed
bytes. One expert then takes::

    overhead + max(packed bytes / bandwidth,
                   packed bytes / dequant_Bps + 2 x tokens x params / (FLOP/s x factor))

memory-bound at one token at the dtype's bytes, compute-bound with tokens at the kernel's rate
(the crossover with fetching moves with it). Without runtime kernels the plain roofline above
runs unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moesim.traces.model_card import ModelCard

from .compute import MeasuredTable, _anchored, parse_measured_table
from .schema import Ctx, Quantity, as_mapping, as_str, quantity, reject_unknown

HOST_CPU_KEYS = frozenset({
    "cpu", "isa", "cores", "parallel", "memory_bandwidth_Bps", "memory_bandwidth_measured_Bps",
    "memory_efficiency", "flops", "flops_measured", "flops_efficiency", "per_expert_overhead_s",
    "measured", "notes",
})
TABLE_KEYS = frozenset({"expert_s", "notes", "measured_at"})
# Instruction sets a host may list (``host_cpu.isa``) and a runtime kernel may need.
ISAS = ("sse4", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx", "neon", "sve")
# Weight dtype classes of CPU kernels, by the most bits per weight each serves.
DTYPE_CLASSES: tuple[tuple[str, float], ...] = (("int4", 6.6), ("int8", 8.5), ("bf16", 16.0),
                                                ("fp32", 32.0))


def dtype_class(bits: float) -> str:
    """The CPU-kernel dtype class of weights stored at ``bits`` per weight."""
    for name, top in DTYPE_CLASSES:
        if bits <= top + 1e-9:
            return name
    raise ValueError(f"bits per weight must be in (0, 32], got {bits}")


@dataclass(frozen=True)
class Isa:
    """The host CPU's instruction sets, with provenance (``host_cpu.isa``)."""

    flags: tuple[str, ...] = ()
    kind: str = "estimate"
    source: str = ""


@dataclass(frozen=True)
class CpuKernels:
    """A runtime's CPU expert kernels (``cpu_kernels`` of a runtime YAML): per dtype class a
    throughput factor of the host's effective FLOP/s (``rates[dtype]``, or the fastest
    ``rates[f"{dtype}_on_{isa}"]`` whose ``isa`` the host has) and an optional per-call
    conversion rate (``rates[f"{dtype}_dequant_Bps"]``, bytes/s of packed weights).
    ``needs``: the ISA every kernel here needs (a host without it is an error)."""

    runtime: str
    rates: Mapping[str, Quantity] = field(default_factory=dict)
    needs: str | None = None

    def select(self, bits: float, isa: tuple[str, ...]) -> tuple[float, float | None, str]:
        """(FLOP/s factor, conversion bytes/s or None, label) of the kernel for ``bits`` per
        weight on a host with ``isa``; a dtype the runtime gives no kernel for runs at the
        host's own roofline (factor 1, no conversion)."""
        cls = dtype_class(bits)
        # the runtime's best path on this host: the fastest variant for an ISA it has
        variants = [self.rates[f"{cls}_on_{i}"] for i in isa if f"{cls}_on_{i}" in self.rates]
        variants = [v for v in variants if v.known]
        q = (max(variants, key=lambda v: float(v.value)) if variants
             else self.rates.get(cls))
        deq = self.rates.get(f"{cls}_dequant_Bps")
        deq_v = float(deq.value) if deq is not None and deq.known else None
        if q is None or not q.known:
            return 1.0, deq_v, f"{cls}: no {self.runtime} kernel, host roofline"
        where = q.field.rsplit(".", 1)[-1]
        text = f"{where} x{float(q.value):.3g} FLOP/s ({q.kind})"
        if deq_v is not None:
            text += f" + conversion at {deq_v / 1e9:.3g} GB/s ({deq.kind})"  # type: ignore[union-attr]
        return float(q.value), deq_v, text

    def check_host(self, isa: Isa, where: str) -> None:
        """A host must list its ISA and have the one the kernels need."""
        if not isa.flags:
            raise ValueError(f"{where}: runtime {self.runtime!r} has CPU kernels, but the host "
                             "lists no instruction sets (host_cpu.isa)")
        if self.needs is not None and self.needs not in isa.flags:
            raise ValueError(f"{where}: runtime {self.runtime!r}'s CPU kernels need "
                             f"{self.needs}; the host lists {list(isa.flags)}")


@dataclass(frozen=True)
class HostCpuSpec:
    """The ``host_cpu`` section of a profile, validated; ``model(card)`` gives the times.

    ``memory_bandwidth_Bps`` is the DRAM bandwidth of every socket together (channels x
    transfer rate x 8 B); ``flops`` the peak at the precision the CPU computes expert matmuls
    in. ``memory_efficiency`` and ``flops_efficiency`` are the share of the figure one expert
    FFN gets, NUMA and kernel quality included. Unlike the GPU section they also apply to a
    measured figure: ``*_measured`` is a streaming read or a large matmul, which an expert FFN
    does not reach either (``moesim-profile host-cpu`` fits the share).
    """

    cpu: str
    cores: Quantity
    parallel: Quantity
    memory_bandwidth_Bps: Quantity
    memory_bandwidth_measured_Bps: Quantity
    memory_efficiency: Quantity
    flops: Quantity
    flops_measured: Quantity
    flops_efficiency: Quantity
    per_expert_overhead_s: Quantity
    measured: Mapping[str, MeasuredTable] = field(default_factory=dict, compare=False)
    notes: str = ""
    profile: str = field(default="", compare=False)
    isa: Isa = field(default_factory=Isa)

    @property
    def effective_memory_bandwidth_Bps(self) -> float:
        """(Measured streaming read if given, else spec) x memory_efficiency."""
        return _measured_or_spec(self.memory_bandwidth_measured_Bps, self.memory_bandwidth_Bps,
                                 self.memory_efficiency)

    @property
    def effective_flops(self) -> float:
        """(Measured matmul FLOP/s if given, else spec) x flops_efficiency."""
        return _measured_or_spec(self.flops_measured, self.flops, self.flops_efficiency)

    def model(self, card: ModelCard) -> HostCpuModel:
        """Per-expert CPU times for ``card``; its measured table only if taken at its shape."""
        table = self.measured.get(card.name)
        skipped = table.mismatch(card) if table is not None else ""
        used = None if skipped else table
        return HostCpuModel(
            card=card,
            memory_bandwidth_Bps=self.effective_memory_bandwidth_Bps,
            flops=self.effective_flops,
            overhead_s=float(self.per_expert_overhead_s.value),
            parallel=int(self.parallel.value),
            measured=used,
            source=self._source(card, used, skipped),
            skipped=skipped,
            isa=self.isa.flags,
        )

    def _source(self, card: ModelCard, table: MeasuredTable | None, skipped: str) -> str:
        def kind(*qs: Quantity) -> str:
            return "/".join(sorted({str(q.kind) for q in qs if q.known}))

        bw = (self.memory_bandwidth_measured_Bps if self.memory_bandwidth_measured_Bps.known
              else self.memory_bandwidth_Bps)
        fl = self.flops_measured if self.flops_measured.known else self.flops
        where = f"{self.profile} host_cpu" if self.profile else "host_cpu"
        isa = f", isa {'/'.join(self.isa.flags)} ({self.isa.kind})" if self.isa.flags else ""
        text = (f"{where} ({self.cpu}, parallel {int(self.parallel.value)}{isa}): roofline "
                f"{self.effective_memory_bandwidth_Bps / 1e9:.3g} GB/s "
                f"({kind(bw, self.memory_efficiency)}), "
                f"{self.effective_flops / 1e12:.3g} TFLOP/s ({kind(fl, self.flops_efficiency)}) "
                f"+ {float(self.per_expert_overhead_s.value) * 1e6:.3g} us per expert "
                f"({kind(self.per_expert_overhead_s)})")
        if table is not None:
            text += f"; {card.name} measured table ({table.expert_s.kind}) inside its range"
        elif skipped:
            text += f"; {card.name} table not used: {skipped}"
        return text


@dataclass(frozen=True)
class HostCpuModel:
    """Seconds for one routed expert FFN of ``card`` on the host CPU. Tokens <= 0 cost nothing.

    ``memory_bandwidth_Bps`` and ``flops`` are the whole CPU's effective figures; each of the
    ``parallel`` concurrent executions gets 1/parallel of them.
    """

    card: ModelCard
    memory_bandwidth_Bps: float
    flops: float
    overhead_s: float
    parallel: int = 1
    measured: MeasuredTable | None = None
    source: str = ""
    skipped: str = ""
    isa: tuple[str, ...] = ()
    kernels: CpuKernels | None = None  # a runtime's CPU kernels (``with_kernels``)

    def __post_init__(self) -> None:
        if not (self.memory_bandwidth_Bps > 0 and self.flops > 0):
            raise ValueError("HostCpuModel needs positive memory bandwidth and FLOP/s")
        if self.overhead_s < 0 or self.parallel < 1:
            raise ValueError("HostCpuModel needs overhead_s >= 0 and parallel >= 1")

    @property
    def card_bits(self) -> float:
        return self.card.expert_weight_bytes * 8

    def weight_bytes(self, bits: int | None = None) -> float:
        """Bytes of one expert's weights at ``bits`` per weight (None: the card's dtype)."""
        return self.card.expert_params * self._bits(bits) / 8

    def activation_bytes(self, tokens: int) -> int:
        """Bytes of ``tokens`` hidden vectors in the card's dtype: what crosses the link each
        way when an expert runs on the host (weights stay put)."""
        return int(max(tokens, 0) * self.card.hidden_size * self.card.dtype_bytes)

    def with_kernels(self, kernels: CpuKernels | None, where: str = "host_cpu"
                     ) -> HostCpuModel:
        """This host under a runtime's CPU kernels (``None``: unchanged). The kernels replace
        the roofline and any measured table (taken without the runtime's kernels)."""
        if kernels is None:
            return self
        from dataclasses import replace

        kernels.check_host(Isa(self.isa), where)
        _, _, label = kernels.select(self.card_bits, self.isa)
        return replace(self, kernels=kernels, measured=None,
                       source=f"{self.source}; {kernels.runtime} CPU kernels: {label}")

    def kernel_time(self, tokens: float, bits: float, params: float | None = None,
                    share: float | None = None) -> float:
        """One execution under the runtime's kernels, without the overhead: memory-bound at
        the dtype's packed bytes, compute-bound at the kernel's rate plus its conversion
        (``params`` weights, default one routed expert's; ``share`` of the host, default
        one of the ``parallel`` lanes)."""
        assert self.kernels is not None
        factor, deq, _ = self.kernels.select(bits, self.isa)
        share = 1.0 / self.parallel if share is None else share
        params = self.card.expert_params if params is None else params
        nbytes = params * bits / 8
        work = 2.0 * tokens * params / (self.flops * factor * share)
        if deq is not None:
            work += nbytes / (deq * share)
        return max(nbytes / (self.memory_bandwidth_Bps * share), work)

    def _bits(self, bits: int | None) -> float:
        if bits is None:
            return self.card_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
            raise ValueError(f"bits must be a positive whole number or None, got {bits!r}")
        return float(bits)

    def roofline(self, tokens: float, bits: int | None = None) -> float:
        """max(bytes / bandwidth, flops / FLOP/s) of one execution, without the overhead."""
        if tokens <= 0:
            return 0.0
        share = 1.0 / self.parallel
        nbytes = self.weight_bytes(bits)
        work = 2.0 * tokens * self.card.expert_params
        return max(nbytes / (self.memory_bandwidth_Bps * share), work / (self.flops * share))

    def expert_time(self, tokens: int, bits: int | None = None) -> float:
        """One routed expert's FFN over ``tokens`` tokens on the host, weights at ``bits``."""
        if tokens <= 0:
            return 0.0
        if self.kernels is not None:
            return self.overhead_s + self.kernel_time(tokens, self._bits(bits))
        low = self.roofline(tokens, bits)
        pts = self.measured.expert_s.value if self.measured is not None else None
        if pts is None:
            return self.overhead_s + low
        # The table is one execution with the whole host; ``parallel`` k executions at once
        # each get 1/k of it, as the roofline's share: the part above the overhead x k.
        k = self.parallel
        whole = _anchored(pts, tokens, lambda x: self.overhead_s + self.roofline(x) / k)
        full = self.overhead_s + max(0.0, whole - self.overhead_s) * k
        if bits is None or float(bits) == self.card_bits:
            return full
        return self.overhead_s + max(0.0, full - self.overhead_s) * low / self.roofline(tokens)

    # -- whole layers on the host (placement ``cpu_layers``: llama.cpp's -ngl) ---------------
    # A layer that runs whole on the host has the whole CPU (every lane): its ops run one
    # after another, each parallelised inside (ggml's thread pool), so they take share 1.

    def _weights_time(self, tokens: float, params: float, bits: float) -> float:
        """One matmul group of ``params`` weights at ``bits`` per weight over ``tokens``
        tokens with the whole host: the runtime's kernel for that dtype where it has one,
        else the host roofline (the weights read once; 2 FLOPs per weight and token)."""
        if tokens <= 0 or params <= 0:
            return 0.0
        if self.kernels is not None:
            return self.kernel_time(tokens, bits, params, 1.0)
        return max(params * bits / 8 / self.memory_bandwidth_Bps,
                   2.0 * tokens * params / self.flops)

    def attention_time(self, batch: int, context: int) -> float:
        """One layer's attention and router on the host for ``batch`` tokens, each attending
        to ``context`` earlier tokens: the Q/K/V/O projections and the router read at the
        attention weights' bits (the runtime's kernel for that dtype, as for experts), plus
        the layer's KV cache read at the card's dtype and the score and value products
        (4 x context x query width FLOPs per token) at the host's FLOP/s (the roofline
        ``compute.ComputeModel.roofline_attention`` uses on the GPU, MLA as MHA), plus one
        ``overhead_s`` (the layer's thread-pool dispatch)."""
        if batch <= 0:
            return 0.0
        c = self.card
        h = c.hidden_size
        q = c.num_attention_heads * c.head_dim or h
        kv = (c.num_kv_heads or c.num_attention_heads) * c.head_dim or h
        proj = 2 * h * q + 2 * h * kv + h * c.num_experts  # projections + router
        ctx = max(context, 0)
        kv_bytes = batch * ctx * 2 * kv * c.dtype_bytes
        kv_flops = 4.0 * batch * ctx * q
        weights = self._weights_time(batch, proj, c.attention_weight_bytes * 8)
        cache = max(kv_bytes / self.memory_bandwidth_Bps, kv_flops / self.flops)
        return self.overhead_s + weights + cache

    def shared_time(self, tokens: int) -> float:
        """Every shared expert of one layer on the host (0 if the model has none): one FFN
        of the shared intermediate size at the shared experts' bits, plus ``overhead_s``."""
        c = self.card
        if tokens <= 0 or c.shared_intermediate_size <= 0:
            return 0.0
        params = c.matrices_per_expert * c.hidden_size * c.shared_intermediate_size
        return self.overhead_s + self._weights_time(tokens, params, c.shared_weight_bytes * 8)

    def dense_layer_time(self, batch: int, context: int) -> float:
        """A whole dense (non-MoE) decoder layer on the host: its attention and its dense FFN
        (at the attention weights' bits, as ``compute.ComputeModel`` takes it)."""
        if batch <= 0:
            return 0.0
        c = self.card
        params = c.matrices_per_expert * c.hidden_size * c.dense_intermediate_size
        ffn = 0.0
        if params > 0:
            ffn = self.overhead_s + self._weights_time(batch, params,
                                                       c.attention_weight_bytes * 8)
        return self.attention_time(batch, context) + ffn

    def calibration(self) -> str:
        """Where the times come from (the one-line ``source``)."""
        return self.source


# --------------------------------------------------------------------------------------------
# Parsing


def _measured_or_spec(measured: Quantity, spec: Quantity, efficiency: Quantity) -> float:
    return float((measured if measured.known else spec).value) * float(efficiency.value)


def _table(ctx: Ctx, card: str, raw: Any) -> MeasuredTable:
    data = as_mapping(ctx, raw, required=True)
    assert data is not None
    reject_unknown(ctx, data, TABLE_KEYS)
    if data.get("expert_s") is None:
        raise ctx.sub("expert_s").error("is required ([[tokens, seconds], ...])")
    table = parse_measured_table(ctx, card, data)
    if not table.expert_s.known:
        raise ctx.sub("expert_s").error("needs a value ([[tokens, seconds], ...])")
    return table


def parse_host_cpu(ctx: Ctx, data: Mapping[str, Any], profile: str = "") -> HostCpuSpec:
    """Validate a ``host_cpu`` mapping; every error names the file and the dotted field."""
    reject_unknown(ctx, data, HOST_CPU_KEYS)
    q = {
        "cores": quantity(ctx.sub("cores"), data.get("cores"), "count", required=True),
        "parallel": quantity(ctx.sub("parallel"), data.get("parallel"), "count", required=True),
        "memory_bandwidth_Bps": quantity(ctx.sub("memory_bandwidth_Bps"),
                                         data.get("memory_bandwidth_Bps"), "Bps"),
        "memory_bandwidth_measured_Bps": quantity(ctx.sub("memory_bandwidth_measured_Bps"),
                                                  data.get("memory_bandwidth_measured_Bps"),
                                                  "Bps"),
        "memory_efficiency": quantity(ctx.sub("memory_efficiency"),
                                      data.get("memory_efficiency"), "ratio", required=True),
        "flops": quantity(ctx.sub("flops"), data.get("flops"), "flops"),
        "flops_measured": quantity(ctx.sub("flops_measured"), data.get("flops_measured"),
                                   "flops"),
        "flops_efficiency": quantity(ctx.sub("flops_efficiency"), data.get("flops_efficiency"),
                                     "ratio", required=True),
        "per_expert_overhead_s": quantity(ctx.sub("per_expert_overhead_s"),
                                          data.get("per_expert_overhead_s"), "s",
                                          required=True, positive=False),
    }
    if not (q["memory_bandwidth_Bps"].known or q["memory_bandwidth_measured_Bps"].known):
        raise ctx.sub("memory_bandwidth_Bps").error(
            "a spec or a measured host memory bandwidth is required (memory_bandwidth_Bps or "
            "memory_bandwidth_measured_Bps)")
    if not (q["flops"].known or q["flops_measured"].known):
        raise ctx.sub("flops").error(
            "a spec or a measured host FLOP/s is required (flops or flops_measured)")
    if q["parallel"].value > q["cores"].value:
        raise ctx.sub("parallel").sub("value").error(
            f"cannot exceed cores ({q['cores'].value})", q["parallel"].value)
    isa = parse_isa(ctx.sub("isa"), data.get("isa"))
    measured_raw = as_mapping(ctx.sub("measured"), data.get("measured")) or {}
    measured = {str(card): _table(ctx.sub("measured").sub(str(card)), str(card), table)
                for card, table in measured_raw.items()}
    return HostCpuSpec(cpu=as_str(ctx.sub("cpu"), data.get("cpu"), required=True),
                       measured=measured, notes=as_str(ctx.sub("notes"), data.get("notes")),
                       profile=profile, isa=isa, **q)


def parse_isa(ctx: Ctx, raw: Any) -> Isa:
    """``isa: {value: [avx2, ...], kind, source}`` (absent: unknown, no runtime kernels)."""
    if raw is None:
        return Isa()
    data = as_mapping(ctx, raw)
    assert data is not None
    reject_unknown(ctx, data, {"value", "kind", "source"})
    flags = data.get("value")
    if flags is None:  # not known (a measurement on an OS without CPU flags): no kernels
        return Isa()
    # a YAML list, or Hydra's ListConfig when the profile comes through the hw config group
    if (isinstance(flags, (str, bytes)) or not isinstance(flags, Sequence) or not flags
            or any(not isinstance(f, str) or f not in ISAS for f in flags)):
        raise ctx.sub("value").error(f"must be a non-empty list of {list(ISAS)}", flags)
    kind = as_str(ctx.sub("kind"), data.get("kind"), required=True)
    return Isa(tuple(flags), kind, as_str(ctx.sub("source"), data.get("source"), required=True))


CPU_KERNEL_DIMS = {"": "factor", "_dequant_Bps": "Bps"}


def parse_cpu_kernels(ctx: Ctx, data: Mapping[str, Any], runtime: str) -> CpuKernels:
    """A runtime's ``cpu_kernels`` mapping: ``needs`` (an ISA), and per dtype class
    ``<dtype>`` / ``<dtype>_on_<isa>`` (factor of the host's FLOP/s) and
    ``<dtype>_dequant_Bps``; anything else is an error naming the key."""
    needs = data.get("needs")
    if needs is not None and needs not in ISAS:
        raise ctx.sub("needs").error(f"must be one of {list(ISAS)}", needs)
    allowed: dict[str, str] = {}
    for cls, _ in DTYPE_CLASSES:
        allowed[cls] = "factor"
        allowed[f"{cls}_dequant_Bps"] = "Bps"
        allowed.update({f"{cls}_on_{i}": "factor" for i in ISAS})
    rates: dict[str, Quantity] = {}
    for key, raw in data.items():
        if key in ("needs", "notes"):
            continue
        if key not in allowed:
            raise ctx.sub(str(key)).error(
                "unknown CPU kernel key (expected needs, notes, <dtype>, <dtype>_on_<isa> or "
                f"<dtype>_dequant_Bps with dtype one of {[c for c, _ in DTYPE_CLASSES]})")
        rates[key] = quantity(ctx.sub(key), raw, allowed[key], required=True)
    return CpuKernels(runtime, rates, needs)


__all__ = ["CpuKernels", "HostCpuModel", "HostCpuSpec", "Isa", "dtype_class",
           "parse_cpu_kernels", "parse_host_cpu"]
