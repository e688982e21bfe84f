"""What the simulator needs from a hardware profile, as protocols.

``hw_profiles`` implements these from sourced YAML files; tests and closed-form checks use the
small fixed models below, so the engine never depends on a particular profile format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TransferModel(Protocol):
    """One transfer path for expert weights (host->GPU over PCIe, or NVMe->DRAM)."""

    copy_engines: int

    def transfer_time(self, nbytes: int) -> float:
        """Seconds to move ``nbytes`` once a copy engine has started the copy."""
        ...


class ComputeTimes(Protocol):
    """Layer compute durations in seconds for one (model, device) pair."""

    def attention_time(self, batch: int, context: int) -> float: ...

    def router_time(self, batch: int) -> float: ...

    def expert_time(self, tokens: int) -> float: ...

    def shared_time(self, tokens: int) -> float: ...

    def dense_layer_time(self, batch: int, context: int) -> float: ...


@dataclass(frozen=True)
class FixedLink:
    """``latency + bytes / bandwidth`` with constant bandwidth; ``inf`` bandwidth = free copies."""

    latency_s: float = 0.0
    bandwidth_Bps: float = float("inf")
    copy_engines: int = 1

    def transfer_time(self, nbytes: int) -> float:
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class FixedCompute:
    """Constant per-call durations (closed-form tests, and zero-latency mode with all zeros)."""

    attention_s: float = 0.0
    router_s: float = 0.0
    expert_s: float = 0.0
    shared_s: float = 0.0
    dense_s: float = 0.0

    def attention_time(self, batch: int, context: int) -> float:
        return self.attention_s

    def router_time(self, batch: int) -> float:
        return self.router_s

    def expert_time(self, tokens: int) -> float:
        return self.expert_s if tokens > 0 else 0.0

    def shared_time(self, tokens: int) -> float:
        return self.shared_s if tokens > 0 else 0.0

    def dense_layer_time(self, batch: int, context: int) -> float:
        return self.dense_s


class HostCpuTimes(Protocol):
    """Routed-expert FFN times on the host CPU (``hw_profiles.host_cpu.HostCpuModel``)."""

    parallel: int  # expert executions that can run at once
    source: str

    def expert_time(self, tokens: int, bits: int | None = None) -> float:
        """Seconds for one routed expert on ``tokens`` tokens (``bits`` None: the card's)."""
        ...

    # A layer run whole on the host (placement ``cpu_layers``), with the whole CPU:
    def attention_time(self, batch: int, context: int) -> float:
        """One layer's attention and router on the host."""
        ...

    def shared_time(self, tokens: int) -> float:
        """All shared experts of one layer on the host (0 without any)."""
        ...

    def dense_layer_time(self, batch: int, context: int) -> float:
        """A whole dense decoder layer (attention + dense FFN) on the host."""
        ...


@dataclass(frozen=True)
class FixedHostCpu:
    """``call_s + tokens * per_token_s`` per expert, constant whole-layer parts (closed-form
    tests)."""

    call_s: float = 0.0
    per_token_s: float = 0.0
    parallel: int = 1
    source: str = "fixed"
    attention_s: float = 0.0
    shared_s: float = 0.0
    dense_s: float = 0.0

    def expert_time(self, tokens: int, bits: int | None = None) -> float:
        return self.call_s + tokens * self.per_token_s if tokens > 0 else 0.0

    def attention_time(self, batch: int, context: int) -> float:
        return self.attention_s if batch > 0 else 0.0

    def shared_time(self, tokens: int) -> float:
        return self.shared_s if tokens > 0 else 0.0

    def dense_layer_time(self, batch: int, context: int) -> float:
        return self.dense_s if batch > 0 else 0.0


@dataclass(frozen=True)
class HostSide:
    """What placements other than plain fetching need to know of the model and the host.

    ``cpu`` is None where the profile has no host CPU section (CPU placements then refuse a
    timed run); ``activation_bytes`` is one token's hidden state (hidden_size x dtype bytes),
    copied host-ward before a CPU expert and its output back after; ``dtype_bits`` is the
    weights' width, against which a low-precision copy is scaled. The weights of one layer's
    parts (``attention_bytes``: attention projections and router; ``shared_bytes``: its
    shared experts; ``dense_bytes``: one dense decoder layer) are what placement
    ``layer_offload`` copies in at every call."""

    cpu: HostCpuTimes | None = None
    activation_bytes: int = 0
    dtype_bits: float = 16  # the routed experts' bits per weight (fractional when quantised)
    why_no_cpu: str = "no host CPU model was given"  # the error when ``cpu`` is None
    attention_bytes: int = 0
    shared_bytes: int = 0
    dense_bytes: int = 0


def host_side(profile: object | None, card: object) -> HostSide:
    """The host side of a run from a hardware profile and a model card (duck-typed: the
    profile's ``host_cpu`` section is optional; unified-memory devices have no host CPU path
    that saves a copy, so they get none; ``profile=None`` for a zero-latency run)."""
    spec = getattr(profile, "host_cpu", None)
    name = str(getattr(profile, "name", "?"))
    cpu, why = None, f"hw profile {name!r} has no host_cpu section"
    if profile is None:  # zero-latency: activations and weight width only, no times
        why = "zero-latency runs take no CPU times"
    elif getattr(profile, "unified_memory", False):
        why = (f"hw profile {name!r} is a unified-memory device: a missed expert is on "
               "storage, not in host memory, so CPU execution saves no copy")
    elif spec is not None:
        cpu, why = spec.model(card), ""
    dtype_bytes = float(card.dtype_bytes)  # type: ignore[attr-defined]
    weight_bits = float(getattr(card, "expert_weight_bytes", dtype_bytes)) * 8
    h = int(card.hidden_size)  # type: ignore[attr-defined]
    heads, head_dim = getattr(card, "num_attention_heads", 0), getattr(card, "head_dim", 0)
    q = heads * head_dim or h
    kv = (getattr(card, "num_kv_heads", 0) or heads) * head_dim or h
    wb = float(getattr(card, "attention_weight_bytes", dtype_bytes))
    proj = 2 * h * q + 2 * h * kv
    ffn = getattr(card, "matrices_per_expert", 3) * h * getattr(card, "dense_intermediate_size",
                                                                0)
    return HostSide(cpu, int(h * dtype_bytes), weight_bits, why,
                    attention_bytes=int((proj + h * getattr(card, "num_experts", 0)) * wb),
                    shared_bytes=int(getattr(card, "shared_bytes_per_layer", 0)),
                    dense_bytes=int((proj + ffn) * wb))


def cpu_crossover_tokens(link: TransferModel, compute: ComputeTimes, cpu: HostCpuTimes,
                         expert_bytes: int, activation_bytes: int, limit: int = 4096) -> int | None:
    """Fiddler's decision boundary with idle queues: the fewest tokens routed to one missed
    expert for which computing it on the host CPU (activations host-ward and back, plus its CPU
    time) is no faster than copying its weights and computing it on the GPU. None when the CPU
    stays faster up to ``limit`` tokens (``fetch_or_cpu`` adds the queues to both sides)."""
    copy = link.transfer_time(expert_bytes)
    for n in range(1, limit + 1):
        on_cpu = 2 * link.transfer_time(n * activation_bytes) + cpu.expert_time(n)
        if on_cpu >= copy + compute.expert_time(n):
            return n
    return None
