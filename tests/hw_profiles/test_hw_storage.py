"""``moesim-profile storage``: logic with a fake bench, the real bench on tiny sizes, O_DIRECT
fallback, the shared CPU ops, and the range checks of the new profile fields."""

from __future__ import annotations

import copy
import errno
import math
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.hw_profiles import ProfileError, load_profile, profile_from_mapping
from moesim.hw_profiles.direct_io import (
    BLOCK,
    aligned_buffer,
    open_direct,
    round_up,
    write_random_file,
)
from moesim.hw_profiles.measure import main
from moesim.hw_profiles.measure_storage import isotonic, monotone, read_sizes, recommend_engines
from moesim.hw_profiles.schema import load_yaml
from moesim.traces.model_card import ModelCard, load_card

torch = pytest.importorskip("torch")

from moesim.hw_profiles import cpu_ops  # noqa: E402  (needs torch)

TINY = ModelCard(name="tiny_storage", hf_id="", hidden_size=64, moe_intermediate_size=48,
                 num_experts=8, top_k=2, num_layers=3, moe_layers=(1, 2), num_shared_experts=1,
                 shared_intermediate_size=48, dense_intermediate_size=96, num_attention_heads=4,
                 num_kv_heads=4, head_dim=16, dtype="float32")


class FakeStorageBench:
    """Analytic timers: reads t = 50 us + s / 2 GB/s; k readers give min(k, 2) x 1.5 GB/s;
    ops cost a + b x; contention factors 1.2 (compute) and 1.1 (reads) per reader."""

    def __init__(self, direct: bool = True) -> None:
        self._direct = direct

    def describe(self) -> dict[str, str]:
        return {"device": "Fake CPU, fake disk", "cpu": "Fake CPU", "disk_name": "fakedisk",
                "date": "2026-01-01T00:00:00+00:00", "torch": "fake"}

    def direct(self) -> tuple[bool, str]:
        return self._direct, "" if self._direct else "O_DIRECT unsupported (fake)"

    def memory_bytes(self) -> int:
        return 16 * 2**30

    def memory_bandwidth(self) -> tuple[float, str]:
        return 20e9, "fake copy"

    def matmul_flops(self) -> tuple[float, str]:
        return 1e11, "fake matmul"

    def read_time(self, nbytes: int) -> float:
        return 50e-6 + nbytes / 2e9

    def readers_bandwidth(self, readers: int) -> float:
        return min(readers, 2) * 1.5e9

    def op_samples(self, card: ModelCard, op: str, x: int) -> list[float]:
        base = {"expert": 1e-4, "shared": 2e-4, "dense": 5e-4, "router": 1e-5,
                "attention": 3e-4}[op]
        t = base + x * (1e-9 if op == "attention" else 1e-6)
        return [t * 0.95, t, t * 1.05]

    def contention_samples(self, readers: int) -> list[tuple[float, float]]:
        return [(1 + 0.2 * readers, 1 + 0.1 * readers)] * 3


def _storage(tmp_path: Path, *extra: str, bench: Any = None, name: str = "fake_vm") -> Path:
    out = tmp_path / f"{name}.yaml"
    args = ["storage", "--model", "deepseek_v2_lite", "--scale", "0.25", "--out", str(out),
            "--no-progress", "--max-bytes", str(2**20), "--file-bytes", str(2**21),
            "--batches", "1", "4", "16", "--contexts", "1", "512", *extra]
    assert main(args, storage_bench=bench or FakeStorageBench()) == 0
    return out


def test_fake_measurement_validates_and_reproduces_the_timers(tmp_path: Path) -> None:
    prof = load_profile(_storage(tmp_path))  # strict: every number has kind and source
    assert prof.unified_memory and prof.host_link is None
    assert prof.machine["o_direct"] == "yes" and "moesim-profile storage" in prof.machine["command"]
    link = prof.expert_link()
    assert "fakedisk->dram" in link.name
    # 1 -> 2 readers doubles the aggregate, 4 adds nothing: 2 engines, each at 1.5 GB/s share
    assert link.copy_engines == 2
    assert link.latency_s == 0.0
    # the curve is anchored at the expert size: one expert per engine at the 2-reader share
    card = cpu_ops.scaled_card(load_card("deepseek_v2_lite"), 0.25, "float32")
    assert link.transfer_time(card.expert_bytes) == pytest.approx(card.expert_bytes / 1.5e9,
                                                                  rel=1e-3)
    curve_at_expert = 2**20 / (50e-6 + 2**20 / 2e9)  # the fake curve ends at 1 MiB
    assert link.peak_bandwidth_Bps == pytest.approx(1.5e9, rel=1e-3)
    assert link.transfer_time(65536) == pytest.approx(
        (50e-6 + 65536 / 2e9) * curve_at_expert / 1.5e9, rel=0.01)
    assert prof.storage is not None
    assert prof.storage.per_copy_overhead_s.value == pytest.approx(50e-6, rel=0.05)
    # overriding copy_engines re-derives each engine's share of the measured aggregate
    data = load_yaml(prof.path.read_text(encoding="utf-8"), "x") if prof.path else {}
    for engines, per_engine in ((1, 1.5e9), (2, 1.5e9), (3, 1.0e9), (4, 0.75e9), (8, 0.375e9)):
        data["storage"]["copy_engines"] = engines  # a bare Hydra-style override
        over = profile_from_mapping(data, "fake_vm").expert_link()
        assert over.copy_engines == engines
        assert over.transfer_time(card.expert_bytes) == pytest.approx(
            card.expert_bytes / per_engine, rel=1e-3)
    assert dict(prof.storage.readers_bandwidth_Bps.value) == {1: 1.5e9, 2: 3e9, 4: 3e9}
    assert prof.contention is not None
    assert prof.contention.compute_slowdown(1) == pytest.approx(1.2)
    assert prof.contention.compute_slowdown(2) == pytest.approx(1.4)
    assert prof.contention.read_slowdown(1.5) == pytest.approx(1.15)
    assert prof.contention.compute_slowdown(0) == 1.0
    cm = prof.compute_model(card)
    assert cm.expert_time(4) == pytest.approx(1e-4 + 4e-6, rel=1e-3)
    assert cm.shared_time(16) == pytest.approx(2e-4 + 16e-6, rel=1e-3)
    assert cm.router_time(4) == pytest.approx(1e-5 + 4e-6, rel=1e-3)
    assert cm.attention_time(1, 512) == pytest.approx(3e-4 + 512e-9, rel=1e-3)
    # a dense layer is the stand-in attention plus the measured dense FFN
    assert cm.dense_layer_time(4, 512) == pytest.approx(cm.attention_time(4, 512) + 5e-4 + 4e-6,
                                                        rel=1e-3)
    assert "measured" in cm.calibration()["expert"]


def test_table_does_not_apply_to_another_shape(tmp_path: Path) -> None:
    prof = load_profile(_storage(tmp_path))
    full = load_card("deepseek_v2_lite")
    cm = prof.compute_model(full)
    calib = cm.calibration()
    assert calib["expert"].startswith("roofline (measured at another shape")
    assert "hidden_size 512 vs the card's 2048" in calib["expert"]
    assert cm.expert_time(1) == pytest.approx(cm.roofline_expert(1))
    bf16 = cpu_ops.scaled_card(full, 0.25, "bfloat16")
    assert "dtype float32" in prof.compute_model(bf16).calibration()["router"]


def test_buffered_fallback_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    prof = load_profile(_storage(tmp_path, bench=FakeStorageBench(direct=False)))
    assert prof.machine["o_direct"].startswith("no: O_DIRECT unsupported")
    assert prof.storage is not None
    assert "buffered" in prof.storage.link.curve.source
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "O_DIRECT unsupported" in err


def test_several_cards_get_one_table_each(tmp_path: Path) -> None:
    out = tmp_path / "two.yaml"
    assert main(["storage", "--model", "deepseek_v2_lite", "moesim_tiny_moe", "--scale", "0.25",
                 "1", "--out", str(out), "--no-progress", "--max-bytes", str(2**20),
                 "--batches", "1", "2", "--contexts", "8"],
                storage_bench=FakeStorageBench()) == 0
    prof = load_profile(out)
    assert set(prof.compute.measured) == {"deepseek_v2_lite", "moesim_tiny_moe"}
    tiny = cpu_ops.scaled_card(load_card("moesim_tiny_moe"), 1.0, "float32")
    assert prof.compute_model(tiny).calibration()["expert"].startswith("measured")
    assert prof.compute.measured["moesim_tiny_moe"].dense_ffn_s.value is None  # no dense layer


def test_bad_storage_arguments_give_a_message(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = ["storage", "--out", str(tmp_path / "x.yaml"), "--no-progress"]
    fake = FakeStorageBench()
    assert main([*base, "--scale", "0"], storage_bench=fake) == 2
    assert "scale must be in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--min-bytes", "1000"], storage_bench=fake) == 2
    assert "multiples of 4096" in capsys.readouterr().err
    assert main([*base, "--model", "deepseek_v2_lite", "moesim_tiny_moe", "--scale", "1", "1",
                 "1"], storage_bench=fake) == 2
    assert "one per --model" in capsys.readouterr().err
    assert main([*base, "--dtype", "int4"], storage_bench=fake) == 2
    assert "not runnable on CPU" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_real_bench_on_tiny_sizes(tmp_path: Path) -> None:
    """The real disk and CPU code, small enough for seconds; the result drives the simulator."""
    card_path = tmp_path / "tiny_storage.yaml"
    card_path.write_text(
        "name: tiny_storage\nhidden_size: 64\nmoe_intermediate_size: 48\nnum_experts: 8\n"
        "top_k: 2\nnum_layers: 3\nmoe_layers: [1, 2]\nnum_shared_experts: 1\n"
        "shared_intermediate_size: 48\ndense_intermediate_size: 96\nnum_attention_heads: 4\n"
        "num_kv_heads: 4\nhead_dim: 16\ndtype: float32\n")
    out = tmp_path / "real_tiny.yaml"
    args = ["storage", "--model", str(card_path), "--scale", "1", "--out", str(out),
            "--file-dir", str(tmp_path / "scratch"), "--file-bytes", str(2**20),
            "--max-bytes", str(64 * 2**10), "--readers", "1", "2", "--batches", "1", "2",
            "--contexts", "1", "16", "--rounds", "2", "--window", "0.02", "--no-progress"]
    assert main(args) == 0
    assert list((tmp_path / "scratch").iterdir()) == []  # the scratch file is removed
    prof = load_profile(out)
    card = cpu_ops.scaled_card(TINY, 1.0)
    link = prof.expert_link()
    cm = prof.compute_model(card)
    times = [link.transfer_time(card.expert_bytes), cm.expert_time(1), cm.expert_time(3),
             cm.shared_time(1), cm.router_time(2), cm.attention_time(1, 8),
             cm.dense_layer_time(1, 8)]
    assert all(math.isfinite(t) and t > 0 for t in times), times
    assert cm.calibration()["attention"].startswith("measured")
    assert prof.machine["cpu"] and prof.machine["kernel"]
    assert 1 <= link.copy_engines <= 2


def test_real_bench_with_o_direct_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    out = tmp_path / "no_direct.yaml"
    args = ["storage", "--model", "moesim_tiny_moe", "--scale", "0.5", "--out", str(out),
            "--file-dir", str(tmp_path), "--file-bytes", str(2**20), "--max-bytes", "16384",
            "--readers", "1", "--batches", "1", "--contexts", "4", "--rounds", "2",
            "--window", "0.02", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "O_DIRECT is not available" in err and err.count("\n") == 1
    assert load_profile(out).machine["o_direct"].startswith("no: O_DIRECT is not available")


# --------------------------------------------------------------------------------------------
# direct_io


def test_open_direct_falls_back_on_einval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    path = write_random_file(tmp_path / "f.bin", 3 * BLOCK + 5, seed=1)
    assert path.stat().st_size == 4 * BLOCK
    real_open = os.open
    direct_flag = getattr(os, "O_DIRECT", 0x4000)
    monkeypatch.setattr(os, "O_DIRECT", direct_flag, raising=False)

    def fake_open(p: Any, flags: int, *a: Any) -> int:
        if flags & direct_flag:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", fake_open)
    with open_direct(path) as f:
        assert not f.direct and "not supported" in f.why
        buf = aligned_buffer(BLOCK)
        with memoryview(buf) as view:
            assert f.read_into(view, BLOCK) == BLOCK
            assert bytes(view) == path.read_bytes()[BLOCK:2 * BLOCK]


def test_direct_reads_return_the_file_bytes(tmp_path: Path) -> None:
    path = write_random_file(tmp_path / "g.bin", 8 * BLOCK, seed=2)
    data = path.read_bytes()
    assert len(set(data)) > 200  # random bytes, not zeros
    with open_direct(path) as f:
        buf = aligned_buffer(3 * BLOCK)
        with memoryview(buf) as view:
            assert f.read_into(view, 2 * BLOCK) == 3 * BLOCK
            assert bytes(view) == data[2 * BLOCK:5 * BLOCK]
            assert f.read_into(view, 6 * BLOCK) == 2 * BLOCK  # short read at end of file
    assert round_up(1) == BLOCK and round_up(BLOCK) == BLOCK and round_up(BLOCK + 1) == 2 * BLOCK
    with pytest.raises(ValueError, match="positive size"):
        round_up(0)


# --------------------------------------------------------------------------------------------
# pure helpers


def test_isotonic_pools_an_outlier_instead_of_lifting_every_later_point() -> None:
    assert isotonic([1.0, 3.0, 2.0]) == [1.0, 2.5, 2.5]
    assert isotonic([1.0, 9.0, 2.0, 2.0, 5.0]) == [1.0, 13 / 3, 13 / 3, 13 / 3, 5.0]
    assert monotone([(1, 2e-3), (2, 1e-3), (4, 3e-3)]) == [[1, 1.5], [2, 1.5], [4, 3.0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.001, 1000.0), min_size=1, max_size=30))
def test_isotonic_is_non_decreasing_and_keeps_the_mean(values: list[float]) -> None:
    fit = isotonic(values)
    assert len(fit) == len(values)
    assert all(a <= b * (1 + 1e-12) for a, b in pairwise(fit))
    assert sum(fit) == pytest.approx(sum(values), rel=1e-9)


def test_recommend_engines_and_read_sizes() -> None:
    assert recommend_engines([(1, 1.0), (2, 1.05), (4, 1.08)], 0.10) == 1
    assert recommend_engines([(1, 1.0), (2, 1.9), (4, 2.0)], 0.10) == 2
    assert recommend_engines([(1, 1.0), (2, 0.8)], 0.10) == 1
    sizes = read_sizes(4096, 256 * 2**20)
    assert sizes[0] == 4096 and sizes[-1] == 256 * 2**20 and len(sizes) == 17
    with pytest.raises(ValueError, match="multiples"):
        read_sizes(4096, 10_000)


# --------------------------------------------------------------------------------------------
# cpu_ops: the functions the executor shares


def test_scaled_card_and_expert_layout() -> None:
    card = cpu_ops.scaled_card(load_card("deepseek_v2_lite"), 0.25, "float32")
    assert (card.name, card.hidden_size, card.moe_intermediate_size) == ("deepseek_v2_lite", 512,
                                                                         352)
    assert (card.shared_intermediate_size, card.dense_intermediate_size, card.head_dim) == (
        704, 2736, 32)
    assert card.expert_bytes == 3 * 512 * 352 * 4 == cpu_ops.expert_stride(card)
    assert (card.num_experts, card.top_k, card.num_attention_heads) == (64, 6, 16)
    flat = torch.arange(TINY.expert_params, dtype=torch.float32)
    g, u, d = cpu_ops.expert_views(flat, TINY)
    assert g is not None
    assert g.shape == u.shape == (48, 64) and d.shape == (64, 48)
    assert u[0, 0].item() == 48 * 64 and d[0, 0].item() == 2 * 48 * 64
    with pytest.raises(ValueError, match="needs"):
        cpu_ops.expert_views(flat[:10], TINY)


def test_expert_ffn_is_swiglu() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen)
    g, u, d = (torch.randn(48, 64, generator=gen), torch.randn(48, 64, generator=gen),
               torch.randn(64, 48, generator=gen))
    want = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    assert torch.allclose(cpu_ops.expert_ffn(x, g, u, d), want, atol=1e-4)
    relu = torch.relu(x @ u.T) @ d.T
    assert torch.allclose(cpu_ops.expert_ffn(x, None, u, d), relu, atol=1e-4)


def test_attention_standin_and_router() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = cpu_ops.make_standin_layer(TINY, 32, gen)
    x = torch.randn(3, 64, generator=gen)
    h = cpu_ops.attention_standin(x, layer, 10)
    assert h.shape == (3, 64) and torch.isfinite(h).all()
    # only the first ``context`` cached tokens matter
    other = copy.copy(layer)
    object.__setattr__(other, "k_cache", layer.k_cache.clone())
    other.k_cache[:, 10:] = 99.0
    assert torch.equal(cpu_ops.attention_standin(x, other, 10), h)
    assert not torch.equal(cpu_ops.attention_standin(x, other, 11), h)
    with pytest.raises(ValueError, match="outside"):
        cpu_ops.attention_standin(x, layer, 33)
    weights, ids = cpu_ops.router(h, layer.w_router, 2)
    assert ids.shape == (3, 2) and (weights[:, 0] >= weights[:, 1]).all()
    h2, ids2 = cpu_ops.attention_router_standin(x, layer, 10, 2)
    assert torch.equal(h2, h) and torch.equal(ids2, ids)


def test_torch_threads_restores_and_working_set() -> None:
    before = torch.get_num_threads()
    with cpu_ops.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    card = cpu_ops.scaled_card(load_card("deepseek_v2_lite"), 0.25, "float32")
    ws = cpu_ops.working_set_bytes(card)
    assert 26 * 6 * card.expert_bytes < ws < 26 * 64 * card.expert_bytes


# --------------------------------------------------------------------------------------------
# range checks of the new fields


def _fake_mapping(tmp_path: Path) -> dict[str, Any]:
    path = _storage(tmp_path, name="base")
    return load_yaml(path.read_text(encoding="utf-8"), str(path))


@pytest.mark.parametrize(("where", "value", "match"), [
    (("storage", "readers_bandwidth_Bps", "value"), [[1, 0.0]], "must be > 0"),
    (("storage", "readers_bandwidth_Bps", "value"), [[1, -1.5]], "must be > 0"),
    (("storage", "readers_bandwidth_Bps", "value"), [[0, 1.5]], "must be > 0"),
    (("storage", "readers_bandwidth_Bps", "value"), [[1.5, 1.5]], "whole number"),
    (("storage", "readers_bandwidth_Bps", "value"), [[2, 1.5], [1, 1.5]], "ascending"),
    (("storage", "curve", "value"), [[4096, 0.0]], "must be > 0"),
    (("storage", "curve", "value"), [[0, 1.0]], "must be > 0"),
    (("storage", "peak_bandwidth_Bps", "value"), -2.0, "must be > 0"),
    (("storage", "peak_bandwidth_Bps", "value"), 0, "must be > 0"),
    (("storage", "latency_s", "value"), -1, "must be >= 0"),
    (("storage", "per_copy_overhead_s", "value"), -1, "must be >= 0"),
    (("storage", "copy_engines", "value"), 0, "whole number >= 1"),
    (("gpu", "memory_bytes", "value"), 0, "must be > 0"),
    (("contention", "compute_slowdown_under_io", "value"), [[1, 0]], "must be > 0"),
    (("contention", "read_slowdown_under_compute", "value"), [[1, -1.1]], "must be > 0"),
    (("contention", "typo_factor"), {"value": 1, "kind": "measured", "source": "x"},
     "unknown key"),
    (("compute", "measured", "deepseek_v2_lite", "expert_s", "value"), [[1, 0]], "must be > 0"),
    (("compute", "measured", "deepseek_v2_lite", "dense_ffn_s", "value"), [[1, -2]],
     "must be > 0"),
    (("compute", "measured", "deepseek_v2_lite", "measured_at", "scale"), 0, r"\(0, 1\]"),
    (("compute", "measured", "deepseek_v2_lite", "measured_at", "hidden_size"), 0,
     "whole number"),
    (("compute", "measured", "deepseek_v2_lite", "measured_at", "dtype"), "fp64", "one of"),
    (("compute", "measured", "deepseek_v2_lite", "measured_at", "heads"), 4, "unknown key"),
])
def test_range_checks_reject_bad_values(tmp_path: Path, where: tuple[str, ...], value: Any,
                                        match: str) -> None:
    data = _fake_mapping(tmp_path)
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(ProfileError, match=match):
        profile_from_mapping(data, "base", allow_bare=False)


def test_relative_fit_recovers_latency_despite_noisy_large_reads() -> None:
    from moesim.hw_profiles.measure_storage import fit_latency_relative

    sizes = read_sizes(4096, 256 * 2**20)
    clean = [(n, n / (80e-6 + n / 1.5e9)) for n in sizes]
    a, bw = fit_latency_relative(clean)
    assert a == pytest.approx(80e-6, rel=1e-6) and bw == pytest.approx(1.5e9, rel=1e-6)
    # the two largest reads 30 % slow (a noisy neighbour): the latency barely moves
    noisy = [(n, b / 1.3 if n >= 128 * 2**20 else b) for n, b in clean]
    assert fit_latency_relative(noisy)[0] == pytest.approx(80e-6, rel=0.1)


def test_table_cites_moesim_profile(tmp_path: Path) -> None:
    from moesim.hw_profiles.report import markdown_table

    row = markdown_table([_storage(tmp_path)]).splitlines()[-1]
    assert "`fake_vm`" in row and "(measured; moesim-profile)" in row and "fakedisk" in row


def test_table_cites_a_pages_site_not_notes() -> None:
    """A figure sourced straight from a web page names its site; only a figure with neither a
    source id, the profiler nor a URL is cited as the notes."""
    from moesim.hw_profiles.report import _cite
    from moesim.hw_profiles.schema import Quantity

    assert _cite(Quantity(1, "spec", "NVIDIA datasheet, https://www.nvidia.com/x.pdf")) == (
        "spec; nvidia.com")
    assert _cite(Quantity(1, "spec", "S12 and https://a.org/b")) == "spec; S12"
    assert _cite(Quantity(1, "estimate", "an educated guess")) == "estimate; notes"
