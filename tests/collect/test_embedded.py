"""Embedded model: its trace regenerates into a cache dir, is cached, routes non-trivially."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from moesim.traces.collect import load_routers, routers_path
from moesim.traces.collect.embedded import MODEL_DIR, PROMPTS_FILE, ensure_embedded_trace
from moesim.traces.collect.prompts import load_prompts
from moesim.traces.model_card import load_card
from moesim.traces.store import load_features, load_trace

if not (MODEL_DIR / "model.safetensors").is_file():
    pytest.skip("embedded model not trained yet", allow_module_level=True)


def test_assets_are_small_and_consistent() -> None:
    total = sum(f.stat().st_size for f in MODEL_DIR.parent.rglob("*") if f.is_file())
    assert total <= 30 * 2**20
    assert len(load_prompts(PROMPTS_FILE)) == 64
    card = load_card("moesim_tiny_moe")
    assert (card.num_experts, card.top_k, card.num_moe_layers) == (16, 2, 6)


def test_ensure_embedded_trace_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESIM_CACHE", str(tmp_path / "env_cache"))
    path = ensure_embedded_trace(limit=4)
    assert path.parent == tmp_path / "env_cache" / "traces" and path.is_file()
    t0 = time.perf_counter()
    assert ensure_embedded_trace(limit=4) == path
    assert time.perf_counter() - t0 < 1.0
    trace = load_trace(path)
    meta = trace.meta
    assert meta.model == "moesim_tiny_moe" and meta.moe_layers == tuple(range(6))
    card = load_card("moesim_tiny_moe")
    assert meta.expert_bytes == card.expert_bytes
    assert len(trace) == 4
    prompts = load_prompts(PROMPTS_FILE)[:4]
    for req, prompt in zip(trace, prompts, strict=True):
        assert (req.phase == 1).sum() == 32
        assert "".join(req.tokens[: int((req.phase == 0).sum())]) == prompt.text
        assert req.label == prompt.label
    rows = trace.num_rows
    for name in ("pre_attn", "router_in"):
        assert load_features(path, name).shape == (rows, 128)
    routers = load_routers(routers_path(path))
    assert sorted(routers) == list(range(6)) and routers[0].shape == (16, 128)
    # routing is neither collapsed nor uniform in any layer
    ex = np.concatenate([r.experts for r in trace])  # [T, 6, 2]
    for j in range(6):
        p = np.bincount(ex[:, j].ravel(), minlength=16) / ex[:, j].size
        h = -(p[p > 0] * np.log2(p[p > 0])).sum()
        assert 1.5 < h < 3.99, (j, h)


def test_every_caller_finds_the_embedded_trace_in_one_place() -> None:
    """moesim-sim (experiments.inputs), moesim-train and the benchmarks all call
    ensure_embedded_trace without a folder: they must share one copy in the cache's traces/
    folder (two copies from different code versions made a trained table look foreign)."""
    from moesim.experiments.inputs import cache_dir
    from moesim.traces.collect.embedded import cache_root

    assert cache_root() == cache_dir() / "traces"
