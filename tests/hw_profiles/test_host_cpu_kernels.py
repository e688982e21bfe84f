"""Runtime CPU expert kernels (``cpu_kernels`` of a runtime, ``host_cpu.isa`` of a profile):
memory-bound at one token at the dtype's bytes, compute-bound with tokens at the kernel's rate,
per-dtype and per-ISA selection, provenance labels, and the one wrapper both engines read."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.hw_profiles import HostCpuModel, ProfileError, load_profile
from moesim.hw_profiles.host_cpu import CpuKernels, Isa, dtype_class, parse_isa
from moesim.hw_profiles.runtime import (
    FITTABLE,
    apply_runtime,
    apply_runtime_cpu,
    list_runtimes,
    load_runtime,
    runtime_from_mapping,
    with_values,
)
from moesim.hw_profiles.schema import Ctx
from moesim.sim import SimulationError, simulate
from moesim.sim.hardware import FixedCompute, FixedLink, HostSide, cpu_crossover_tokens
from moesim.traces.model_card import load_card
from tests.helpers import random_trace

CARD = load_card("mixtral_8x7b")  # bfloat16, 3 x 4096 x 14336 weights per expert
BW, FLOPS, OVER = 50e9, 1e12, 20e-6


def _q(v: float, unit: str | None = None, kind: str = "estimate") -> dict:
    out = {"value": v, "kind": kind, "source": "test figure"}
    if unit:
        out["unit"] = unit
    return out


def _kernels(**rates: float) -> dict:
    return {"needs": "avx2", **{k: _q(v) for k, v in rates.items()}}


def _rt(**rates: float):
    return runtime_from_mapping({"name": "k", "cpu_kernels": _kernels(**rates)}, "k")


def _host(card=CARD, isa=("avx2",), parallel: int = 1) -> HostCpuModel:
    return HostCpuModel(card, BW, FLOPS, OVER, parallel=parallel, source="test host", isa=isa)


def test_one_token_is_memory_bound_at_the_dtypes_bytes() -> None:
    rt = _rt(int4=1.0, bf16=0.5, int8=1.5)
    for bits in (16.0, 8.0, 4.8):
        card = CARD.with_weights(bits)
        cpu = _host(card).with_kernels(rt.cpu_kernels)
        nbytes = card.expert_params * bits / 8
        assert cpu.expert_time(1) == pytest.approx(OVER + nbytes / BW, rel=1e-12)


def test_compute_bound_slope_is_the_kernels_rate() -> None:
    cpu = _host().with_kernels(_rt(bf16=0.25).cpu_kernels)
    per_token = 2 * CARD.expert_params / (FLOPS * 0.25)
    n = 4096
    assert cpu.expert_time(n) - cpu.expert_time(n - 1) == pytest.approx(per_token, rel=1e-9)
    # the plain roofline (no runtime kernels) turns compute-bound 4x later
    plain = _host()
    assert plain.expert_time(n) - plain.expert_time(n - 1) == pytest.approx(per_token / 4,
                                                                            rel=1e-9)


def test_conversion_is_paid_once_per_call() -> None:
    rt = runtime_from_mapping({"name": "k", "cpu_kernels": {
        "bf16": _q(1.0), "bf16_dequant_Bps": _q(10, "GB/s")}}, "k")
    cpu = _host().with_kernels(rt.cpu_kernels)
    conv = CARD.expert_bytes / 10e9
    assert cpu.expert_time(1) == pytest.approx(
        OVER + max(CARD.expert_bytes / BW, conv + 2 * CARD.expert_params / FLOPS), rel=1e-12)
    assert cpu.expert_time(3000) - cpu.expert_time(2999) == pytest.approx(
        2 * CARD.expert_params / FLOPS, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 4.0), st.integers(1, 600), st.integers(1, 4))
def test_time_grows_with_tokens_and_falls_with_the_rate(rate: float, n: int, par: int) -> None:
    slow = _host(parallel=par).with_kernels(_rt(bf16=rate).cpu_kernels)
    fast = _host(parallel=par).with_kernels(_rt(bf16=rate * 2).cpu_kernels)
    assert slow.expert_time(n + 1) >= slow.expert_time(n) > 0
    assert fast.expert_time(n) <= slow.expert_time(n)
    assert slow.expert_time(0) == 0.0


def test_dtype_ordering_and_isa_variants() -> None:
    """bf16 widened to fp32 on AVX2 < bf16 with AVX512-BF16 < AMX, at a compute-bound size;
    and the classes by bits per weight."""
    rt = runtime_from_mapping({"name": "k", "cpu_kernels": {
        "bf16": _q(0.5), "bf16_on_avx512_bf16": _q(2.0), "bf16_on_amx": _q(8.0)}}, "k")
    times = [_host(isa=isa).with_kernels(rt.cpu_kernels).expert_time(512)
             for isa in (("avx2",), ("avx2", "avx512f", "avx512_bf16"),
                         ("avx2", "avx512f", "avx512_bf16", "amx"))]
    assert times[0] > times[1] > times[2]
    assert [dtype_class(b) for b in (2.6, 4.8, 6.56, 8.5, 16, 32)] == [
        "int4", "int4", "int4", "int8", "bf16", "fp32"]


def test_every_shipped_cpu_runtime_orders_its_dtypes() -> None:
    """Per weight byte, int4 and int8 kernels run at least as fast as bf16 on the same host."""
    for name in ("llama_cpp", "ktransformers", "fiddler"):
        k = load_runtime(name).cpu_kernels
        assert k is not None
        f = {c: k.select(b, ("avx2",))[0] for c, b in (("int4", 4.5), ("bf16", 16.0))}
        assert f["int4"] >= f["bf16"], name


def test_labels_say_where_each_figure_comes_from() -> None:
    fitted = with_values(_rt(bf16=0.5), {"cpu_kernels.bf16": 0.01}, "fitted on x, y")
    q = fitted.quantity("cpu_kernels.bf16")
    assert q.kind == "fitted" and q.source == "fitted on x, y" and q.value == 0.01
    cpu = _host().with_kernels(fitted.cpu_kernels)
    assert "k CPU kernels: bf16 x0.01 FLOP/s (fitted)" in cpu.source
    assert "estimate" in _host().with_kernels(_rt(bf16=0.5).cpu_kernels).source
    # a dtype without a kernel runs at the host's roofline, and says so
    _, _, text = CpuKernels("k", {}).select(4.5, ("avx2",))
    assert "no k kernel" in text
    for key in ("cpu_kernels.int4", "cpu_kernels.bf16"):
        assert FITTABLE[key] == "factor"


def test_isa_is_checked_and_validated() -> None:
    rt = _rt(bf16=1.0)
    with pytest.raises(ValueError, match="lists no instruction sets"):
        _host(isa=()).with_kernels(rt.cpu_kernels)
    amx_only = replace(rt.cpu_kernels, needs="amx")
    with pytest.raises(ValueError, match="need amx"):
        _host().with_kernels(amx_only)
    with pytest.raises(ProfileError, match=r"isa\.value"):
        parse_isa(Ctx("p.yaml").sub("host_cpu").sub("isa"), {"value": ["avx3"], "kind": "x",
                                                               "source": "y"})
    assert parse_isa(Ctx("p"), {"value": ["avx2", "amx"], "kind": "estimate",
                                "source": "s"}) == Isa(("avx2", "amx"), "estimate", "s")


@pytest.mark.parametrize("kernels, field", [
    ({"bf17": _q(1.0)}, "cpu_kernels.bf17"),
    ({"bf16": _q(-1.0)}, "cpu_kernels.bf16"),
    ({"needs": "avx3"}, "cpu_kernels.needs"),
    ({"int4_dequant_Bps": _q(1e-30, "GB/s")}, "cpu_kernels.int4_dequant_Bps"),
])
def test_bad_cpu_kernels_name_the_field(kernels: dict, field: str) -> None:
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
        runtime_from_mapping({"name": "x", "cpu_kernels": kernels}, "x")


def test_every_shipped_profile_with_a_host_lists_its_isa() -> None:
    from moesim.hw_profiles import list_profiles

    for name in list_profiles():
        hc = load_profile(name).host_cpu
        if hc is not None:
            assert hc.isa.flags and hc.isa.source, name


def test_kernels_change_the_host_only() -> None:
    """A runtime with kernels and nothing else leaves link and GPU compute untouched (its
    runs without CPU placement are the roofline's), and a host without a CPU stays so."""
    rt = load_runtime("fiddler")
    assert rt.is_none
    link, comp = FixedLink(bandwidth_Bps=1e9), FixedCompute(expert_s=1e-3)
    assert apply_runtime(rt, link, comp, CARD) == (link, comp)
    none = HostSide()
    assert apply_runtime_cpu(rt, none) is none
    assert apply_runtime_cpu(load_runtime("none"), HostSide(_host())).cpu == _host()
    with pytest.raises(ProfileError, match="lists no instruction sets"):
        apply_runtime_cpu(rt, HostSide(_host(isa=())))


def test_crossover_moves_with_the_kernel() -> None:
    """Fiddler's decision boundary: a slower CPU kernel crosses over to fetching earlier."""
    link, comp = FixedLink(bandwidth_Bps=25e9), FixedCompute(expert_s=2e-4)
    act = CARD.hidden_size * 2
    plain = cpu_crossover_tokens(link, comp, _host(), CARD.expert_bytes, act)
    fast = cpu_crossover_tokens(link, comp, _host().with_kernels(_rt(bf16=0.5).cpu_kernels),
                                CARD.expert_bytes, act)
    slow = cpu_crossover_tokens(link, comp, _host().with_kernels(_rt(bf16=0.05).cpu_kernels),
                                CARD.expert_bytes, act)
    assert plain is not None and fast is not None and slow is not None
    assert slow < fast < plain
    # the closed form: max(mem, n * per-token) + overhead first reaches copy + GPU at n
    per = 2 * CARD.expert_params / (FLOPS * 0.05)
    copy = CARD.expert_bytes / 25e9
    n = math.ceil((copy + 2e-4 - OVER) / per)
    assert abs(slow - n) <= 1


def _trace():
    return random_trace(num_requests=2, tokens=10, layers=4, experts=8, top_k=2, seed=3,
                        expert_bytes=4_000_000)


def _cpu_run(engine: str, host: HostSide, placement: str) -> dict:
    return simulate(_trace(), "lru", capacity=12, link=FixedLink(bandwidth_Bps=12e9),
                    compute=FixedCompute(attention_s=2e-4, expert_s=1e-4), engine=engine,
                    placement=placement, host=host).summary


def test_engines_under_cpu_kernels() -> None:
    """CPU placements have no compiled twin: ``auto`` runs them on SimPy with the kernel's
    times (equal to ``python``), ``compiled`` refuses in one line; a fetch run under the same
    runtime is equal on both engines."""
    small = CARD.scaled(0.01, "bfloat16")
    # a bf16 kernel that converts its weights per call, so its times differ from the
    # roofline's whatever a shipped fit says
    rt = _rt(bf16=0.5, bf16_dequant_Bps=1e9)
    host = apply_runtime_cpu(rt, HostSide(_host(small), small.hidden_size * 2, 16.0))
    assert host.cpu.kernels is rt.cpu_kernels
    a = _cpu_run("auto", host, "cpu_on_miss")
    b = _cpu_run("python", host, "cpu_on_miss")
    assert a["sim_engine"] == "python" and a == b and a["cpu_expert_execs"] > 0
    plain = _cpu_run("python", HostSide(_host(small), small.hidden_size * 2, 16.0),
                     "cpu_on_miss")
    assert a["total_time_s"] != plain["total_time_s"]  # the kernel's times were used
    with pytest.raises(SimulationError, match="placement 'cpu_on_miss'"):
        _cpu_run("compiled", host, "cpu_on_miss")
    f_py, f_c = _cpu_run("python", host, "fetch"), _cpu_run("compiled", host, "fetch")
    assert f_c["sim_engine"] == "compiled"
    assert {k: v for k, v in f_py.items() if k != "sim_engine"} == {
        k: v for k, v in f_c.items() if k != "sim_engine"}


def test_shipped_cpu_runtimes_load() -> None:
    names = set(list_runtimes())
    assert {"llama_cpp", "ktransformers", "fiddler"} <= names
