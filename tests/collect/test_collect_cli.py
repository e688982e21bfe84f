"""moesim-collect: resume after interruption, prompt formats, one-line errors, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moesim.traces.collect import CollectError, CollectSettings, collect  # noqa: E402
from moesim.traces.collect.prompts import ByteTokenizer, load_prompts, load_tokenizer  # noqa: E402
from moesim.traces.store import load_features, load_trace  # noqa: E402
from tests.collect.archs import ARCHS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _olmoe():
    torch.manual_seed(0)
    return next(a for a in ARCHS if a.name == "olmoe").build().eval()


class _Interrupting(ByteTokenizer):
    """Raises KeyboardInterrupt when asked to encode the n-th prompt (simulated Ctrl-C)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().encode(text)


def test_resume_after_interruption(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"x = {i} * y\n"}) + "\n" for i in range(4)))
    model = _olmoe()
    out = tmp_path / "t.parquet"
    s = CollectSettings(
        model_path="olmoe", prompts=str(prompts), out=str(out), max_new_tokens=3, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        collect(s, model=model, tokenizer=_Interrupting(3))
    assert not out.exists()  # nothing half-written
    (work,) = tmp_path.glob(".t.parquet.parts-*")  # one folder, keyed by the fingerprint
    parts = sorted(work.glob("req_*.npz"))
    assert [p.name for p in parts] == ["req_000000.npz", "req_000001.npz"]
    res = collect(s, model=model, tokenizer=ByteTokenizer())
    assert res.resumed_requests == 2 and res.summary.requests == 4
    assert not list(tmp_path.glob(".t.parquet.parts-*"))
    fresh = collect(
        CollectSettings(
            model_path="olmoe",
            prompts=str(prompts),
            out=str(tmp_path / "f.parquet"),
            max_new_tokens=3,
            progress=False,
        ),
        model=model,
        tokenizer=ByteTokenizer(),
    )
    a, b = load_trace(res.trace), load_trace(fresh.trace)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.experts, rb.experts)
        assert ra.tokens == rb.tokens and ra.label == rb.label
    np.testing.assert_array_equal(
        load_features(res.trace, "router_in"), load_features(fresh.trace, "router_in")
    )


def test_other_run_gets_its_own_work_dir(tmp_path: Path) -> None:
    """Parts of a run with other settings (or another model or transformers release) never
    block a new run: each fingerprint has its own folder, and finishing sweeps the others."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a = 1\nb = 2\n")
    model = _olmoe()
    s = CollectSettings(
        model_path="olmoe",
        prompts=str(prompts),
        out=str(tmp_path / "t.parquet"),
        max_new_tokens=2,
        progress=False,
        keep_parts=True,
    )
    collect(s, model=model, tokenizer=ByteTokenizer())
    (first,) = tmp_path.glob(".t.parquet.parts-*")
    s.max_new_tokens = 3
    res = collect(s, model=model, tokenizer=ByteTokenizer())
    assert res.resumed_requests == 0 and res.summary.tokens > 0
    (second,) = tmp_path.glob(".t.parquet.parts-*")  # kept (keep_parts), the old one swept
    assert second != first
    s.keep_parts = False
    s.max_new_tokens = 4
    collect(s, model=model, tokenizer=ByteTokenizer())
    assert not list(tmp_path.glob(".t.parquet.parts-*"))


def test_prompt_formats(tmp_path: Path) -> None:
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert [p.text for p in load_prompts(lines)] == ["one", "two", "three"]
    blocks = tmp_path / "b.txt"
    blocks.write_text("def f():\n    pass\n\n\nclass A:\n    x = 1\n")
    assert [p.text for p in load_prompts(blocks)] == ["def f():\n    pass", "class A:\n    x = 1"]
    js = tmp_path / "j.jsonl"
    js.write_text('{"text": "hi", "id": "q1"}\n\n{"prompt": "yo"}\n')
    got = load_prompts(js)
    assert [(p.label, p.text) for p in got] == [("q1", "hi"), ("j/1", "yo")]
    assert len(load_prompts(lines, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no"}\n')
    with pytest.raises(CollectError, match="line 1: no string field prompt or text"):
        load_prompts(bad)
    with pytest.raises(CollectError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moesim.traces.collect.app", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(cwd),
        },
    )


def test_cli_end_to_end_and_errors(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny_olmoe"
    _olmoe().save_pretrained(model_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("import os\nprint(1)\n")
    out = tmp_path / "o" / "t.parquet"
    ok = _cli(
        f"model.path={model_dir}",
        "model.tokenizer=bytes",
        f"prompts.path={prompts}",
        f"out={out}",
        "max_new_tokens=2",
        "progress=false",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "2 requests" in ok.stdout
    trace = load_trace(out)
    assert trace.meta.model == "tiny_olmoe" and trace.meta.expert_bytes > 0
    assert (tmp_path / "o" / "t.routers.npz").is_file()

    missing = _cli(
        f"model.path={tmp_path / 'nope'}",
        f"prompts.path={prompts}",
        f"out={tmp_path / 'x.parquet'}",
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: cannot load a model config")
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
    with pytest.raises(CollectError, match="no usable tokenizer"):
        load_tokenizer("auto", str(model_dir))
    unset = _cli(f"prompts.path={prompts}", cwd=tmp_path)
    assert unset.returncode == 2 and unset.stderr.startswith("error: missing value for model.path")
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*.parts-*"))
