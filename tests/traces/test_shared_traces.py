"""Import the real traces in ../shared/traces (skipped when that folder is absent).

The full 95 MB DeepSeek training set is too slow for CI, so only three of its files are imported
here (``experiments/bench/bench_traces.py`` measures the whole set).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from moesim.traces import import_trace, load_predictions, load_trace, validate_trace
from tests.traces.fixtures import require_shared

pytestmark = pytest.mark.shared

DS = "deepseek_v2_lite_moe-beyond"


def test_deepseek_training_subset(tmp_path: Path) -> None:
    src = require_shared(f"{DS}/training_data_eamc")
    sub = tmp_path / "three"
    sub.mkdir()
    for n in (1, 2, 1000):
        shutil.copy(src / f"prompt_{n}_data.csv", sub)
    res = import_trace("moe-beyond-csv", sub, tmp_path / "t.parquet")
    trace = load_trace(res.out)
    assert [r.request_id for r in trace] == [1, 2, 1000]
    assert res.rows == res.tokens * 26
    assert trace.requests[0].tokens[0] == "<｜begin▁of▁sentence｜>"
    assert trace.meta.expert_bytes == 17_301_504
    assert "training" in trace.meta.source


def test_deepseek_test_set_and_predictions(tmp_path: Path) -> None:
    base = require_shared(DS)
    fmt = import_trace("moe-beyond-csv", base / "formatted_csvs", tmp_path / "f.parquet")
    assert (fmt.requests, fmt.tokens, fmt.rows) == (100, 1_543, 40_118)
    pred = import_trace("moe-beyond-csv", base / "predicted_csvs", tmp_path / "p.parquet")
    assert (pred.requests, pred.tokens, pred.rows) == (100, 1_543, 40_118)
    side = pred.side_files["predictions"]
    a, b = load_trace(fmt.out), load_trace(pred.out)
    preds = load_predictions(side, b.meta.moe_layers)
    assert sum(int((p[..., 0] >= 0).sum()) for p in preds.values()) == 40_118
    assert "ngavhane/moe-beyond" in a.meta.source
    # Same 100 prompts, but prompt_N is numbered differently in the two folders: match each
    # predicted request to exactly one formatted request by content (ids sorted ascending).
    by_len: dict[int, list] = {}
    for x in a:
        by_len.setdefault(x.num_tokens, []).append(np.sort(x.experts, axis=2))
    same_n = 0
    for y in b:
        hits = [x for x in by_len.get(y.num_tokens, []) if np.array_equal(x, y.experts)]
        assert len(hits) == 1
        assert preds[y.request_id].shape == y.experts.shape
        same_n += a.requests[y.request_id - 1].num_tokens == y.num_tokens
    assert same_n < 50  # numbering really differs (documented in the notes)
    assert "NOT" in b.meta.notes["request_ids"]


def test_mixtral(tmp_path: Path) -> None:
    src = require_shared("mixtral8x7b_speculative-moe")
    res = import_trace("speculative-moe-jsonl", src, tmp_path / "m.parquet")
    trace = load_trace(res.out)
    assert [r.label for r in trace] == [
        "gsm8k/0",
        "gsm8k/1",
        "humaneval/0",
        "humaneval/1",
        "humaneval/0@routing_raw",
    ]
    # 166+78 and 81+252 complete decode tokens; raw run 135 prefill + 83 decode steps
    assert [r.num_tokens for r in trace] == [166, 78, 81, 252, 218]
    assert res.tokens == 795 and trace.meta.partial
    raw = trace.requests[4]
    assert int((raw.phase == 0).sum()) == 135
    assert int((raw.experts[:, :, 0] >= 0).sum()) == 4_198 + 2_579
    assert res.rows == (166 + 78 + 81 + 252) * 32 + 6_777
    validate_trace(res.out)


@pytest.mark.parametrize(
    ("folder", "layers", "tokens", "dropped", "prefill"),
    [
        ("qwen15moe_vllm-moe-logger_weiran0129", (0, 8, 12, 18, 23), 4_357, 5 * 8_448, 1_471),
        ("qwen15moe-gptq_vllm-expert-profiler_KennethWang1221", (0,), 4_384, 16_640, 1_471),
        ("olmoe_cerebras-assesment2_KaxitPandya", (0,), 4_471, 2_048, None),
    ],
)
def test_vllm_logs(tmp_path: Path, folder: str, layers, tokens, dropped, prefill) -> None:
    src = require_shared(folder)
    res = import_trace("vllm-routes-jsonl", src, tmp_path / "v.parquet")
    trace = load_trace(res.out)
    assert trace.meta.moe_layers == layers and trace.meta.partial
    assert res.tokens == tokens and res.rows == tokens * len(layers)
    assert trace.meta.notes["dropped_warmup_rows_total"] == str(dropped)
    phase = np.concatenate([r.phase for r in trace])
    if prefill is not None:
        assert len(trace) == 129  # forward passes: 65, 1406, then decode passes
        assert [r.num_tokens for r in trace][:3] == [65, 1_406, 25]
        assert int((phase == 0).sum()) == prefill
    else:
        assert len(trace) == 1  # global counter: no pass boundaries
