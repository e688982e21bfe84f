"""moesim-profile on CPU: fake timers drive the measurement; the YAML it writes must validate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from moesim.hw_profiles import load_profile
from moesim.hw_profiles.measure import (
    EXIT_NO_CUDA,
    default_sizes,
    fit_latency,
    main,
    measure_copy_engines,
    measure_curve,
)
from moesim.traces.model_card import ModelCard, load_card


class FakeBench:
    """Analytic timers standing in for CUDA: t = a + s/B copies, linear op costs."""

    def __init__(self, engines: int = 1, dip: bool = False) -> None:
        self.engines = engines
        self.dip = dip

    def describe(self) -> dict[str, str]:
        return {"gpu_name": "Fake GPU 9000", "driver": "0.0", "cuda": "none", "torch": "fake",
                "date": "2026-01-01T00:00:00+00:00", "pcie": "PCIe 4.0 x16 (fake)"}

    def memory_bytes(self) -> int:
        return 80 * 2**30

    def memory_bandwidth(self) -> tuple[float, str]:
        return 1.7e12, "fake device copy"

    def matmul_flops(self) -> tuple[float, str]:
        return 2.0e14, "fake matmul"

    def h2d_timer(self, pinned: bool) -> Callable[[int], float]:
        bw = 25e9 if pinned else 10e9

        def copy_time(n: int) -> float:
            t = 2.6e-6 + n / bw
            if self.dip and n == 64 * 2**10:  # a noisy point: the copy looks too fast
                t *= 0.3
            return t

        return copy_time

    def streams_timer(self) -> Callable[[int, int], float]:
        return lambda n, k: (1 if self.engines >= k else k) * n / 25e9

    def mlp_timer(self, card: ModelCard, intermediate: int) -> Callable[[int], float]:
        return lambda tokens: 1e-4 + tokens * intermediate * 1e-10

    def router_timer(self, card: ModelCard) -> Callable[[int], float]:
        return lambda batch: 2e-5 + batch * 1e-8

    def attention_timer(self, card: ModelCard) -> Callable[[int], float]:
        return lambda context: 5e-5 + context * 1e-9


def _measure(tmp_path: Path, bench: FakeBench, *extra: str) -> Path:
    out = tmp_path / "fake_gpu.yaml"
    args = ["measure", "--out", str(out), "--no-progress", "--max-bytes", str(16 * 2**20),
            "--batches", "1", "4", "16", "--contexts", "512", "4096", *extra]
    assert main(args, bench=bench) == 0
    return out


def test_measured_profile_validates_and_reflects_the_timers(tmp_path: Path) -> None:
    path = _measure(tmp_path, FakeBench())
    prof = load_profile(path)  # strict: every number has kind and source
    assert prof.name == "fake_gpu" and prof.device == "Fake GPU 9000"
    assert prof.machine["driver"] == "0.0" and prof.machine["torch"] == "fake"
    link = prof.expert_link()
    assert link.latency_s == 0.0  # the curve already contains the per-copy cost
    assert link.curve[0][0] == 4 * 2**10 and link.curve[-1][0] == 16 * 2**20
    # the written curve reproduces the fake copy times (t = 2.6 us + s / 25 GB/s)
    for n in (4096, 300_000, 16 * 2**20):
        assert link.transfer_time(n) == pytest.approx(2.6e-6 + n / 25e9, rel=0.02)
    assert prof.host_link_model("pageable").bandwidth(16 * 2**20) == pytest.approx(
        16 * 2**20 / (2.6e-6 + 16 * 2**20 / 10e9), rel=1e-3)
    assert link.copy_engines == 1
    assert prof.host_link is not None
    assert prof.host_link.per_copy_overhead_s.value == pytest.approx(2.6e-6, rel=0.05)
    assert prof.gpu_memory_bytes == 80 * 2**30
    assert prof.effective_memory_bandwidth_Bps == pytest.approx(1.7e12)
    assert prof.effective_flops == pytest.approx(2e14)
    card = load_card("deepseek_v2_lite")
    cm = prof.compute_model(card)
    assert cm.expert_time(4) == pytest.approx(1e-4 + 4 * card.moe_intermediate_size * 1e-10,
                                              rel=1e-3)
    assert cm.shared_time(1) == pytest.approx(1e-4 + card.shared_intermediate_size * 1e-10,
                                              rel=1e-3)
    assert cm.attention_time(1, 4096) == pytest.approx(5e-5 + 4096e-9, rel=1e-3)
    assert cm.router_time(16) == pytest.approx(2e-5 + 16e-8, rel=1e-3)
    kinds = {q.kind for q in prof.quantities() if q.known}
    assert "measured" in kinds and kinds <= {"measured", "spec", "estimate"}


def test_two_copy_engines_are_detected(tmp_path: Path) -> None:
    prof = load_profile(_measure(tmp_path, FakeBench(engines=2)))
    assert prof.expert_link().copy_engines == 2


def test_noisy_curve_is_flattened_so_it_validates(tmp_path: Path) -> None:
    prof = load_profile(_measure(tmp_path, FakeBench(dip=True)))
    times = [s / b for s, b in prof.expert_link().curve]
    assert times == sorted(times)


def test_curve_and_fit_helpers() -> None:
    sizes = default_sizes(4096, 512 * 2**20)
    assert sizes[0] == 4096 and sizes[-1] == 512 * 2**20 and len(sizes) == 18
    points = measure_curve(lambda n: 2.6e-6 + n / 12.4e9, sizes, lambda: None)
    a, bw = fit_latency(points)
    assert a == pytest.approx(2.6e-6, rel=0.02)
    assert bw == pytest.approx(12.4e9, rel=1e-3)
    assert measure_copy_engines(lambda n, k: k * n / 1e9, 1000)[0] == 1
    assert measure_copy_engines(lambda n, k: n / 1e9, 1000) == (2, 1.0)
    with pytest.raises(ValueError, match="copy timer"):
        measure_curve(lambda n: 0.0, [1000], lambda: None)


def test_without_cuda_exits_2_with_one_message(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")

    if torch.cuda.is_available():  # pragma: no cover - only on GPU machines
        pytest.skip("a CUDA device is present")
    out = tmp_path / "x.yaml"
    assert main(["measure", "--out", str(out)]) == EXIT_NO_CUDA
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_default_command_is_measure(tmp_path: Path) -> None:
    out = tmp_path / "gpu_b.yaml"
    assert main(["--out", str(out), "--no-progress", "--max-bytes", "65536", "--batches", "1",
                 "--contexts", "64"], bench=FakeBench()) == 0
    assert load_profile(out).name == "gpu_b"


def test_bad_arguments_give_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["measure", "--out", str(tmp_path / "x.txt")], bench=FakeBench()) == 2
    assert "must be a .yaml file" in capsys.readouterr().err
    assert main(["measure", "--model", "no_such_card"], bench=FakeBench()) == 2
    assert "no_such_card" in capsys.readouterr().err
    assert main(["plot", "no_such_gpu", "--out", str(tmp_path / "x.png")]) == 2
    assert "known profiles" in capsys.readouterr().err


def test_plot_writes_png_and_pdf(tmp_path: Path) -> None:
    png, pdf = tmp_path / "c.png", tmp_path / "c.pdf"
    assert main(["plot", "v100_pcie", "jetson_agx_orin", "--out", str(png), "--out", str(pdf),
                 "--mark-card", "deepseek_v2_lite"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_table_lists_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["table"]) == 0
    out = capsys.readouterr().out
    for name in ("v100_pcie", "a100_sxm4", "jetson_agx_orin", "h100_pcie"):
        assert f"`{name}`" in out
    assert "12.4 GB/s (measured; S21)" in out


def test_torch_op_timers_run_on_cpu() -> None:
    """The op code of CudaBench (MLP, router, attention with GQA, copies) runs on CPU."""
    import time

    torch = pytest.importorskip("torch")

    from moesim.hw_profiles.measure import CudaBench

    def cpu_timer(fn: Callable[[], object], repeats: int) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return max((time.perf_counter() - start) / repeats, 1e-9)

    bench = CudaBench(torch, "cpu", max_bytes=2**16, timer=cpu_timer, matmul_n=32,
                      copy_bytes=2**16)
    card = ModelCard(name="tiny", hf_id="", hidden_size=64, moe_intermediate_size=32,
                     num_experts=8, top_k=2, num_layers=2, moe_layers=(1,),
                     num_attention_heads=4, num_kv_heads=2, head_dim=16)
    relu_card = ModelCard(name="tiny_relu", hf_id="", hidden_size=64, moe_intermediate_size=32,
                          num_experts=8, top_k=1, num_layers=2, moe_layers=(1,), gated=False)
    assert bench.mlp_timer(card, 32)(4) > 0
    assert bench.mlp_timer(relu_card, 32)(4) > 0
    assert bench.router_timer(card)(4) > 0
    assert bench.attention_timer(card)(16) > 0
    assert bench.attention_timer(relu_card)(16) > 0  # no head counts: falls back to MHA
    assert bench.h2d_timer(False)(4096) > 0
    assert bench.matmul_flops()[0] > 0 and bench.memory_bandwidth()[0] > 0
