"""Importer fuzzing (issue 12): a mutated source file is either a clear ``TraceError`` or a trace
that passes validation, never a traceback of another type.

Each example writes a small valid source with the fixtures the importer tests use, applies one
hypothesis-chosen mutation to one of its files (drop, duplicate or swap a line, overwrite or
insert a character, truncate) and imports it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moesim.traces import TraceError, import_trace
from moesim.traces.store import validate_trace
from tests.traces.fixtures import write_moe_beyond, write_qwen_folder, write_spec_decode

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TRICKY = [*"0123456789-,[]\"\n x.{}:e", "\u00e9", "\x00"]


def _moe_beyond(src: Path) -> None:
    write_moe_beyond(src, {1: 3, 2: 2})


def _moe_beyond_predicted(src: Path) -> None:
    write_moe_beyond(src, {1: 3, 2: 2}, variant="predicted")


def _vllm(src: Path) -> None:
    write_qwen_folder(src, layers=(0, 8))


def _speculative(src: Path) -> None:
    write_spec_decode(src / "gsm8k_2_routing.jsonl", "gsm8k", {0: 3, 1: 2})


SOURCES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "moe-beyond": ("moe-beyond-csv", _moe_beyond),
    "moe-beyond-predicted": ("moe-beyond-csv", _moe_beyond_predicted),
    "vllm": ("vllm-routes-jsonl", _vllm),
    "speculative": ("speculative-moe-jsonl", _speculative),
}

mutations = st.one_of(
    st.tuples(st.just("drop_line"), st.integers(0, 10_000)),
    st.tuples(st.just("dup_line"), st.integers(0, 10_000)),
    st.tuples(st.just("swap_lines"), st.integers(0, 10_000), st.integers(0, 10_000)),
    st.tuples(st.just("set_char"), st.integers(0, 100_000), st.sampled_from(TRICKY)),
    st.tuples(st.just("insert"), st.integers(0, 100_000), st.sampled_from(TRICKY)),
    st.tuples(st.just("truncate"), st.integers(0, 100_000)),
)


def _mutate(text: str, mutation: tuple) -> str:
    kind = mutation[0]
    if kind in ("drop_line", "dup_line", "swap_lines"):
        lines = text.splitlines(keepends=True)
        i = mutation[1] % len(lines)
        if kind == "drop_line":
            del lines[i]
        elif kind == "dup_line":
            lines.insert(i, lines[i])
        else:
            j = mutation[2] % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        return "".join(lines)
    pos = mutation[1] % (len(text) + 1)
    if kind == "set_char":
        return text[:pos] + mutation[2] + text[pos + 1:]
    if kind == "insert":
        return text[:pos] + mutation[2] + text[pos:]
    return text[:pos]


@SETTINGS
@given(source=st.sampled_from(sorted(SOURCES)), which=st.integers(0, 100), mutation=mutations)
def test_a_mutated_source_is_a_trace_error_or_a_valid_trace(source, which, mutation):
    fmt, write = SOURCES[source]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        write(src)
        files = sorted(p for p in src.iterdir() if p.suffix in (".csv", ".jsonl"))
        target = files[which % len(files)]
        target.write_text(_mutate(target.read_text(encoding="utf-8"), mutation),
                          encoding="utf-8")
        out = Path(tmp) / "out.parquet"
        try:
            import_trace(fmt, src, out)
        except TraceError:
            event(f"{source}: TraceError")
            assert not out.exists()  # a failed import leaves no half-written trace
            return
        event(f"{source}: imported")
        summary = validate_trace(out)  # raises TraceError if the written trace is invalid
        assert summary.rows > 0
