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
