"""``moesim-profile host-cpu``: the fit with a fake bench, the real bench on a tiny card, and
bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moesim.hw_profiles import KINDS, load_profile, profile_path
from moesim.hw_profiles.measure import main
from moesim.hw_profiles.measure_host_cpu import fit_expert
from moesim.hw_profiles.schema import load_yaml
from moesim.traces.model_card import ModelCard, load_card

pytest.importorskip("torch")

OVERHEAD, BW, FLOPS, READ = 30e-6, 5e9, 20e9, 10e9


class FakeHostCpuBench:
    """Analytic timers: an expert takes 30 us + bytes / 5 GB/s + 2 x tokens x params / 20 GFLOP/s
    (additive, so the 1-token line has slope 1/5e9 + 1/40e9 for float32); reads at 10 GB/s."""

    def describe_cpu(self) -> dict[str, str]:
        return {"device": "Fake CPU (8 CPUs)", "cpu": "Fake CPU", "cores": "8",
                "date": "2026-01-01T00:00:00+00:00"}

    def read_bandwidth(self) -> tuple[float, str]:
        return READ, "fake read"

    def matmul_flops(self) -> tuple[float, str]:
        return 40e9, "fake matmul"

    def op_samples(self, card: ModelCard, op: str, x: int) -> list[float]:
        assert op == "expert"
        t = OVERHEAD + card.expert_bytes / BW + 2 * x * card.expert_params / FLOPS
        return [t * 0.98, t, t * 1.02]


def _profile(tmp_path: Path, name: str = "ci_vm_virtio_measured") -> Path:
    path = tmp_path / f"{name}.yaml"
    shutil.copy(profile_path(name), path)
    return path


def _run(path: Path, *extra: str, bench: Any = None) -> int:
    return main(["host-cpu", "--profile", str(path), "--no-progress", "--tokens", "1", "4",
                 "16", "64", *extra], host_cpu_bench=bench or FakeHostCpuBench())


def test_fit_recovers_the_fake_machine(tmp_path: Path) -> None:
    path = _profile(tmp_path)
    before = load_yaml(path.read_text(encoding="utf-8"), "before")
    assert _run(path, "--scale", "0.125", "--dtype", "float32") == 0
    after = load_yaml(path.read_text(encoding="utf-8"), "after")
    # every other section is kept as it was
    assert {k: v for k, v in after.items() if k != "host_cpu"} == {
        k: v for k, v in before.items() if k != "host_cpu"}
    prof = load_profile(path)  # strict: every number has kind and source
    hc = prof.host_cpu
    assert hc is not None and hc.cpu == "Fake CPU" and hc.cores.value == 8
    assert hc.parallel.value == 1
    assert hc.per_expert_overhead_s.value == pytest.approx(OVERHEAD, rel=0.01)
    one_token_bw = 1 / (1 / BW + 2 / (4 * FLOPS))  # float32: 4 bytes per weight
    assert hc.memory_bandwidth_measured_Bps.value == pytest.approx(READ)
    assert hc.memory_efficiency.value == pytest.approx(one_token_bw / READ, rel=0.01)
    assert hc.flops_measured.value == pytest.approx(40e9)
    for q in (hc.cores, hc.memory_bandwidth_measured_Bps, hc.memory_efficiency,
              hc.flops_measured, hc.flops_efficiency, hc.per_expert_overhead_s):
        assert q.kind in KINDS and "moesim-profile host-cpu --profile" in q.source
    card = load_card("deepseek_v2_lite").scaled(0.125, "float32")
    model = prof.host_cpu_model(card)
    assert model.measured is not None  # the table describes exactly this card
    fake = FakeHostCpuBench()
    for tokens in (1, 4, 16, 64):
        measured = fake.op_samples(card, "expert", tokens)[1]
        assert model.expert_time(tokens) == pytest.approx(measured, rel=1e-3)
        # the fitted roofline is a floor under every measured point (up to 4-digit rounding)
        assert model.overhead_s + model.roofline(tokens) <= measured * (1 + 1e-3)
    # another card gets the fitted roofline, which is the fake's own law at 1 token
    other = load_card("qwen3_30b_a3b").scaled(0.125, "float32")
    om = prof.host_cpu_model(other)
    assert om.measured is None
    assert om.expert_time(1) == pytest.approx(fake.op_samples(other, "expert", 1)[1], rel=0.02)


def test_defaults_come_from_the_profile(tmp_path: Path) -> None:
    path = _profile(tmp_path)
    assert _run(path) == 0  # scale, dtype and threads as the profile's compute table
    table = load_profile(path).host_cpu.measured["deepseek_v2_lite"]  # type: ignore[union-attr]
    assert table.measured_at["scale"] == 0.125 and table.measured_at["dtype"] == "float32"
    assert table.measured_at["torch_threads"] == 1


def test_fit_expert_closed_form() -> None:
    sizes = [(n, 10e-6 + n / 2e9) for n in (1000, 4000, 16000)]
    table = [(x, 10e-6 + 16000 / 2e9 + x * 1e-6) for x in (1, 8)]
    a, bw, flops = fit_expert(sizes, table, params=4000, nbytes=16000)
    assert a == pytest.approx(10e-6)
    assert bw == pytest.approx(16000 / (16000 / 2e9 + 1e-6))  # the 1-token time, overhead off
    assert flops == pytest.approx(max(2 * x * 4000 / (t - a) for x, t in table))
    # an intercept above a measured point (noise on a tiny expert) is capped below it
    a, _, flops = fit_expert(sizes, [(1, 5e-6)], params=4000, nbytes=16000)
    assert a == pytest.approx(0.99 * 5e-6)
    assert flops == pytest.approx(2 * 4000 / (0.01 * 5e-6))
    noisy = [(1000, 30e-6), (4000, 12e-6), (16000, 18e-6)]  # the smallest expert ran slow
    assert fit_expert(noisy, [(1, 40e-6)], params=4000, nbytes=16000)[0] < 12e-6


@settings(max_examples=50, deadline=None)
@given(a=st.floats(0, 1e-4), bw=st.floats(1e8, 1e11), flops=st.floats(1e9, 1e13),
       params=st.integers(1000, 10**7), tokens=st.lists(st.integers(1, 512), min_size=1,
                                                        max_size=5, unique=True))
def test_fit_recovers_the_overhead_and_keeps_the_roofline_under_the_points(
        a: float, bw: float, flops: float, params: int, tokens: list[int]) -> None:
    sizes = [(n, a + n / bw) for n in (params, params // 2, params // 4)]
    table = [(x, a + params / bw + 2 * x * params / flops) for x in sorted(tokens)]
    assume(a < 0.99 * table[0][1])  # past that the overhead is capped (the case above)
    fa, fbw, fflops = fit_expert(sizes, table, params, nbytes=params)
    assert fa == pytest.approx(a, abs=1e-9 + 1e-6 * a)
    roof = [fa + max(params / fbw, 2 * x * params / fflops) for x, _ in table]
    assert roof[0] == pytest.approx(table[0][1], rel=1e-9)
    assert all(r <= t * (1 + 1e-9) for r, (_, t) in zip(roof, table, strict=True))
    assert fflops <= flops * (1 + 1e-9) and fbw <= bw * (1 + 1e-9)


def test_real_bench_on_a_tiny_card(tmp_path: Path) -> None:
    """The real CPU code on a tiny card, few rounds: seconds, and the result loads."""
    path = _profile(tmp_path)
    card = tmp_path / "tiny_host.yaml"
    card.write_text("name: tiny_host\nhidden_size: 64\nmoe_intermediate_size: 48\n"
                    "num_experts: 8\ntop_k: 2\nnum_layers: 2\nmoe_layers: [0, 1]\n"
                    "dtype: float32\n")
    assert main(["host-cpu", "--profile", str(path), "--model", str(card), "--scale", "1",
                 "--tokens", "1", "8", "--rounds", "2", "--pool-mib", "1", "--read-mib", "4",
                 "--torch-threads", "1", "--no-progress"]) == 0
    prof = load_profile(path)
    assert prof.host_cpu is not None
    model = prof.host_cpu_model(load_card(str(card)))
    assert model.measured is not None
    assert 0 < model.expert_time(1) <= model.expert_time(8)
    assert prof.host_cpu.memory_bandwidth_measured_Bps.value > 0


BAD = [
    (["--tokens", "0"], "--tokens >= 1"),
    (["--dtype", "int4"], "not runnable on CPU"),
    (["--scale", "0"], "scale must be in (0, 1]"),
    (["--model", "no_such_card"], "no_such_card"),
    (["--rounds", "1"], "--rounds >= 2"),
    (["--torch-threads", "0"], "--torch-threads >= 1"),  # was taken as "unset"
]


@pytest.mark.parametrize(("extra", "needle"), BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          extra: list[str], needle: str) -> None:
    path = _profile(tmp_path)
    before = path.read_bytes()
    assert _run(path, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert path.read_bytes() == before


def test_bad_profile_and_out_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path / "missing.yaml") == 2
    assert "not a profile .yaml file" in capsys.readouterr().err
    path = _profile(tmp_path)
    assert _run(path, "--out", str(tmp_path / "other_name.yaml")) == 2
    assert "must be the profile name 'ci_vm_virtio_measured'" in capsys.readouterr().err
    broken = tmp_path / "v100_pcie.yaml"
    broken.write_text(profile_path("v100_pcie").read_text(encoding="utf-8").replace(
        "value: 900, unit: GB/s", "value: -900, unit: GB/s"), encoding="utf-8")
    assert _run(broken) == 2
    err = capsys.readouterr().err
    assert "gpu.memory_bandwidth_Bps.value" in err and err.count("\n") == 1
    assert not (tmp_path / "other_name.yaml").exists()


class _NoBench:
    """A bench that must not be used: bad input is refused before measuring."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"measured ({name}) before refusing the input")


def test_unwritable_out_is_refused_before_measuring(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = _profile(tmp_path)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "ci_vm_virtio_measured.yaml"
    assert _run(path, "--out", str(out), bench=_NoBench()) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write into {tmp_path / 'file'}" in err and err.count("\n") == 1


def test_isa_read_from_cpuinfo_flags() -> None:
    """``host_cpu.isa`` comes from the CPU's flags: x86 (``flags``) and ARM (``Features``),
    mapped to the names runtime kernels need; no flags line gives nothing, never a guess."""
    from moesim.hw_profiles.host_cpu import ISAS
    from moesim.hw_profiles.measure_host_cpu import cpu_isa

    x86 = "processor: 0\nflags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni amx_tile\n"
    isa, how = cpu_isa(x86)
    assert isa == ["sse4", "avx2", "avx512f", "avx512_vnni", "amx"] and "/proc/cpuinfo" in how
    assert cpu_isa("Features\t: fp asimd sve\n")[0] == ["neon", "sve"]
    assert cpu_isa("model name: x\n") == ([], "")
    assert set(isa) <= set(ISAS)
