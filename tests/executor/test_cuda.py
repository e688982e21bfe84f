"""Backend cuda: a clear error without a GPU; on a GPU, the demand-only equivalence holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moesim.sim import FixedCompute, FixedLink, SimulationError, simulate
from moesim.sim.executor import ExecutorOptions, execute
from tests.executor.conftest import card_trace, small_card


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_backend_without_a_gpu_is_one_clear_error(work_dir: Path) -> None:
    card = small_card()
    with pytest.raises(SimulationError, match="needs a CUDA GPU"):
        execute(card_trace(card), "lru", card, capacity=8,
                options=ExecutorOptions(backend="cuda", work_dir=str(work_dir)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("engines", [1, 2])
def test_cuda_demand_only_counts_equal_the_simulator(engines: int, work_dir: Path) -> None:
    card = small_card()
    trace = card_trace(card, seed=4)
    real = execute(trace, "lru", card, capacity=10, warmup_tokens=2,
                   options=ExecutorOptions(backend="cuda", copy_engines=engines,
                                           work_dir=str(work_dir)))
    sim = simulate(trace, "lru", capacity=10, warmup_tokens=2,
                   link=FixedLink(1e-5, 1e10, engines), compute=FixedCompute(1e-5, 0, 1e-5))
    for k in ("accesses", "hits", "late_hits", "promoted", "misses"):
        assert real.summary[k] == sim.summary[k], k
    assert real.summary["executor.backend"] == "cuda"
    assert real.summary["executor.copy_event_p50_s"] > 0
