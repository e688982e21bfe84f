"""Backend storage: the weights file, O_DIRECT reads into page-aligned slots, the fallback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moesim.sim.executor.model import PAGE, ExpertLayout, scaled_card
from moesim.sim.executor.storage import StorageBackend, ensure_weights, expert_array
from moesim.traces.model_card import load_card
from tests.executor.conftest import small_card


def _layout(dtype: str = "float32") -> ExpertLayout:
    return ExpertLayout.of(scaled_card(small_card(), 1.0, dtype))


def test_scaled_card_shrinks_widths_and_sets_expert_bytes() -> None:
    full = load_card("deepseek_v2_lite")
    card = scaled_card(full, 0.125, "float32")
    assert (card.hidden_size, card.moe_intermediate_size) == (256, 176)
    assert card.expert_bytes == 3 * 256 * 176 * 4
    assert card.num_experts == full.num_experts and card.moe_layers == full.moe_layers
    assert ExpertLayout.of(card).stride % PAGE == 0
    with pytest.raises(ValueError, match="scale"):
        scaled_card(full, 1.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_file_is_written_once_with_the_seeded_experts(work_dir: Path, dtype: str) -> None:
    layout = _layout(dtype)
    path = ensure_weights(work_dir, "t", layout, seed=3)
    assert path.stat().st_size == layout.file_bytes
    mtime = path.stat().st_mtime_ns
    assert ensure_weights(work_dir, "t", layout, seed=3) == path
    assert path.stat().st_mtime_ns == mtime
    raw = path.read_bytes()
    want = expert_array(layout, 5, seed=3).tobytes()
    off = layout.offset(5)
    assert raw[off:off + layout.expert_bytes] == want
    assert expert_array(layout, 5, seed=4).tobytes() != want


def _check_slot(backend: StorageBackend, layout: ExpertLayout, key: int, slot: int) -> None:
    backend.load(key, slot)
    gate, up, down = backend.weights(slot)
    flat = torch.cat([gate.reshape(-1), up.reshape(-1), down.reshape(-1)])
    want = expert_array(layout, key, seed=0)
    if layout.dtype == "float32":
        np.testing.assert_array_equal(flat.numpy(), want)
    else:
        np.testing.assert_array_equal(flat.view(torch.int16).numpy().view(np.uint16), want)
    assert gate.shape == (layout.intermediate, layout.hidden)
    assert down.shape == (layout.hidden, layout.intermediate)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reads_land_in_their_slots(work_dir: Path, dtype: str) -> None:
    layout = _layout(dtype)
    backend = StorageBackend(ensure_weights(work_dir, "t", layout, 0), layout, capacity=3)
    try:
        for key, slot in ((7, 0), (30, 2), (0, 1), (7, 1)):
            _check_slot(backend, layout, key, slot)
        info = backend.info()
        assert info["read_bytes_per_expert"] % PAGE == 0
        assert info["direct_io"] == backend.direct_io
    finally:
        backend.close()


def test_o_direct_is_used_where_the_file_system_supports_it(work_dir: Path) -> None:
    layout = _layout()
    path = ensure_weights(work_dir, "t", layout, 0)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
    except (OSError, AttributeError):
        pytest.skip("the test folder's file system refuses O_DIRECT")
    backend = StorageBackend(path, layout, capacity=2)
    try:
        assert backend.direct_io and backend.fallback_reason == ""
        _check_slot(backend, layout, 3, 1)
    finally:
        backend.close()


def test_forced_fallback_reads_buffered_and_says_so(work_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    layout = _layout()
    path = ensure_weights(work_dir, "t", layout, 0)
    with caplog.at_level(logging.WARNING, logger="moesim.executor"):
        backend = StorageBackend(path, layout, capacity=2, direct_io=False)
    try:
        assert not backend.direct_io and "disabled" in backend.fallback_reason
        assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1
        _check_slot(backend, layout, 9, 0)
    finally:
        backend.close()


def test_tmpfs_falls_back_with_one_message(caplog: pytest.LogCaptureFixture) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    layout = _layout()
    work = shm / f"moesim-test-{os.getpid()}"
    try:
        path = ensure_weights(work, "t", layout, 0)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            pytest.skip("this tmpfs accepts O_DIRECT")
        except OSError:
            pass
        with caplog.at_level(logging.WARNING, logger="moesim.executor"):
            backend = StorageBackend(path, layout, capacity=2)
        try:
            assert not backend.direct_io and "O_DIRECT" in backend.fallback_reason
            assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1
            _check_slot(backend, layout, 2, 1)
        finally:
            backend.close()
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()


def test_a_file_system_refusing_o_direct_falls_back(work_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """What tmpfs on older kernels and some network file systems do: EINVAL on open."""
    layout = _layout()
    path = ensure_weights(work_dir, "t", layout, 0)
    real_open = os.open

    def refusing_open(p: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    with caplog.at_level(logging.WARNING, logger="moesim.executor"):
        backend = StorageBackend(path, layout, capacity=2)
    try:
        assert not backend.direct_io
        assert backend.fallback_reason == "open with O_DIRECT failed: Invalid argument"
        assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1
        _check_slot(backend, layout, 4, 0)
    finally:
        backend.close()


@pytest.mark.parametrize("scale", [0.125, 0.3, 1.0])
def test_scaled_card_is_the_profilers(scale: float) -> None:
    """The profiler times ``hw_profiles.cpu_ops`` at its scaled shapes; the executor runs the
    same shapes, so a measured table applies to it."""
    cpu_ops = pytest.importorskip("moesim.hw_profiles.cpu_ops")
    full = load_card("deepseek_v2_lite")
    ours, theirs = scaled_card(full, scale, "float32"), cpu_ops.scaled_card(full, scale, "float32")
    for k in ("name", "hidden_size", "moe_intermediate_size", "shared_intermediate_size",
              "dense_intermediate_size", "head_dim", "dtype", "expert_bytes"):
        assert getattr(ours, k) == getattr(theirs, k), k


def test_paced_reads_take_bytes_over_rate_and_record_the_achieved_rate(work_dir: Path) -> None:
    """Each paced read returns expert bytes / pace after it started (within the spin's
    precision), keeps the bytes right, and the achieved rate is what the reads took."""
    import time

    layout = _layout()
    path = ensure_weights(work_dir, "t", layout, seed=0)
    pace = layout.expert_bytes / 2e-3  # 2 ms per read: far slower than any disk read here
    backend = StorageBackend(path, layout, 2, pace_Bps=pace)
    try:
        took = []
        for key in range(6):
            t0 = time.perf_counter()
            backend.load(key, key % 2)
            took.append(time.perf_counter() - t0)
            _check_slot_bytes = expert_array(layout, key, 0).tobytes()
            assert bytes(backend.slot_bytes(key % 2)[:layout.expert_bytes]) == _check_slot_bytes
        info = backend.info()
    finally:
        backend.close()
    assert min(took) >= 2e-3
    # the median read ends on time; a preempted spinner can end late (load 8 on 2 cores: p90
    # 1 ms late), which the achieved rate records
    assert float(np.median(took)) < 2.5e-3
    assert info["pace_reads"] == 6 and info["pace_Bps"] == pace
    n_ok = 6 - info["pace_overruns"]
    assert n_ok >= 5  # a read the disk made slower than 2 ms is counted, not stretched
    mean_read = layout.expert_bytes / info["pace_achieved_Bps"]
    assert mean_read == pytest.approx(float(np.mean(took)), rel=0.05)
    assert info["pace_achieved_Bps"] <= pace * 1.0001
    assert info["pace_native_read_s"] < 2e-3
    with pytest.raises(ValueError, match="pace_Bps"):
        StorageBackend(path, layout, 1, pace_Bps=0.0)


def test_unpaced_backend_reports_no_pace(work_dir: Path) -> None:
    layout = _layout()
    backend = StorageBackend(ensure_weights(work_dir, "t", layout, seed=0), layout, 1)
    try:
        backend.load(0, 0)
        info = backend.info()
    finally:
        backend.close()
    assert info["pace_reads"] == 0 and np.isnan(info["pace_Bps"])
