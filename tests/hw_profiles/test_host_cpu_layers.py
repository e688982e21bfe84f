"""A whole layer on the host CPU (placement ``cpu_layers``): ``HostCpuModel.attention_time``,
``shared_time`` and ``dense_layer_time`` against numbers worked out by hand from the model
cards' dimensions (Mixtral-8x7B: hidden 4096, 32 query heads, 8 KV heads of 128, 8 experts;
DeepSeek-V2-Lite: hidden 2048, 16 heads of 128, shared intermediate 2816, dense 10944)."""

from __future__ import annotations

import pytest

from moesim.hw_profiles.host_cpu import HostCpuModel
from moesim.hw_profiles.runtime import load_runtime
from moesim.traces.model_card import load_card

BW, FLOPS, OVER = 100e9, 1e12, 20e-6


def _host(card: str = "mixtral_8x7b", **kw) -> HostCpuModel:
    return HostCpuModel(card=load_card(card), memory_bandwidth_Bps=BW, flops=FLOPS,
                        overhead_s=OVER, **kw)


# Mixtral: q/o 4096 x 4096 each, k/v 4096 x 1024 each, router 4096 x 8 = 41,975,808 weights
PROJ = 41_975_808


def test_attention_one_token_is_memory_bound() -> None:
    """Batch 1, context 512, bf16: the weights (83,951,616 B) and the KV cache (512 tokens x
    K and V x 1024 x 2 B = 2,097,152 B) read once at 100 GB/s."""
    got = _host().attention_time(1, 512)
    assert got == pytest.approx(OVER + 83_951_616 / BW + 2_097_152 / BW, rel=1e-12)


def test_attention_many_tokens_is_compute_bound() -> None:
    """Batch 1000: the projections' 2 x 1000 x 41,975,808 FLOPs at 1 TFLOP/s; the KV cache
    (1000 x 512 x 4096 B) stays memory-bound (4 x 4096 FLOPs per 4096 B read)."""
    got = _host().attention_time(1000, 512)
    assert got == pytest.approx(OVER + 2 * 1000 * PROJ / FLOPS + 1000 * 512 * 4096 / BW,
                                rel=1e-12)


def test_attention_at_four_bits_reads_a_quarter() -> None:
    card = load_card("mixtral_8x7b").with_weights(4.5, 4.5, None)
    host = HostCpuModel(card=card, memory_bandwidth_Bps=BW, flops=FLOPS, overhead_s=OVER)
    assert host.attention_time(1, 0) == pytest.approx(OVER + PROJ * 4.5 / 8 / BW, rel=1e-12)
    assert host.attention_time(0, 512) == 0.0


def test_attention_under_runtime_kernels() -> None:
    """llama.cpp's bf16 kernel on an AVX2 host runs at half the host's FLOP/s (the runtime's
    ``cpu_kernels.bf16``): batch 64 is compute-bound there, memory-bound on the roofline."""
    rt = load_runtime("llama_cpp")
    factor = float(rt.cpu_kernels.rates["bf16"].value)
    host = _host(isa=("avx2",)).with_kernels(rt.cpu_kernels)
    kv = 64 * 512 * 2 * 1024 * 2
    want = OVER + max(83_951_616 / BW, 2 * 64 * PROJ / (FLOPS * factor)) + max(
        kv / BW, 4 * 64 * 512 * 4096 / FLOPS)
    assert host.attention_time(64, 512) == pytest.approx(want, rel=1e-12)
    assert host.attention_time(64, 512) > _host().attention_time(64, 512)


def test_shared_and_dense_layer() -> None:
    """DeepSeek-V2-Lite: shared experts 3 x 2048 x 2816 = 17,301,504 weights, a dense FFN 3 x
    2048 x 10944 = 67,239,936 weights, both bf16, one token: memory-bound, one overhead each;
    a dense layer is its attention plus its FFN."""
    host = _host("deepseek_v2_lite")
    assert host.shared_time(1) == pytest.approx(OVER + 17_301_504 * 2 / BW, rel=1e-12)
    assert host.shared_time(0) == 0.0
    assert host.dense_layer_time(1, 100) == pytest.approx(
        host.attention_time(1, 100) + OVER + 67_239_936 * 2 / BW, rel=1e-12)
    assert _host().shared_time(1) == 0.0  # Mixtral has no shared expert
