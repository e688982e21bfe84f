"""Backend ``cuda``: every expert in pinned host memory, copied into GPU slot tensors on
``copy_engines`` CUDA streams; compute on the default stream.

Untested here (no GPU on the CI machines); importable without CUDA. A copy worker enqueues its
copy on its own stream, records CUDA events around it and waits for that stream only, so the
main thread sees a completion exactly when the bytes are on the GPU. The main thread waits for
its own (default) stream after each layer (``sync``), so stall and time are measured on the
host clock as on the storage backend.
"""

from __future__ import annotations

from typing import Any

from moesim.sim.cache import SimulationError
from moesim.sim.executor.model import ExpertLayout
from moesim.sim.executor.storage import expert_array


class CudaBackend:
    name = "cuda"
    device = "cuda"

    def __init__(self, layout: ExpertLayout, capacity: int, engines: int, seed: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise SimulationError("executor backend 'cuda' needs a CUDA GPU")
        self.torch = torch
        self.layout = layout
        dt = torch.float32 if layout.dtype == "float32" else torch.bfloat16
        n = 3 * layout.matrix_elems
        self.host = torch.empty(layout.num_keys, n, dtype=dt, pin_memory=True)
        for key in range(layout.num_keys):
            arr = torch.from_numpy(expert_array(layout, key, seed).copy())
            self.host[key] = arr if dt == torch.float32 else arr.view(torch.bfloat16)
        self.slots = torch.empty(capacity, n, dtype=dt, device="cuda")
        self.streams = [torch.cuda.Stream() for _ in range(engines)]
        self.copy_ms: list[float] = []  # CUDA-event time of each copy
        m, h, i = layout.matrix_elems, layout.hidden, layout.intermediate
        self._weights = [(s[:m].view(i, h), s[m:2 * m].view(i, h), s[2 * m:].view(h, i))
                         for s in self.slots]

    def load(self, key: int, slot: int, engine: int = 0) -> None:
        torch = self.torch
        stream = self.streams[engine]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            self.slots[slot].copy_(self.host[key], non_blocking=True)
            end.record(stream)
        end.synchronize()
        self.copy_ms.append(start.elapsed_time(end))

    def weights(self, slot: int) -> tuple[Any, Any, Any]:
        return self._weights[slot]

    def sync(self) -> None:
        """Wait for the compute stream only (copies run on their own streams)."""
        self.torch.cuda.current_stream().synchronize()

    def info(self) -> dict[str, Any]:
        ms = sorted(self.copy_ms)
        return {"backend": self.name, "direct_io": False, "io_fallback_reason": "pinned host",
                "read_bytes_per_expert": self.layout.expert_bytes,
                "copy_event_p50_s": ms[len(ms) // 2] / 1e3 if ms else float("nan"),
                "device_name": self.torch.cuda.get_device_name()}

    def close(self) -> None:
        self.torch.cuda.synchronize()
