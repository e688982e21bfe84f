"""Prompt sets and tokenizers for trace collection.

Prompt files: ``.jsonl`` (one JSON object per line, text under ``prompt`` or ``text`` or a
chosen field), or plain text (one prompt per line; if the file has blank lines, blocks separated
by blank lines are prompts, so multi-line code snippets work). ``hf:<name>[:<config>]`` loads a
``datasets`` dataset when that package is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from moesim.traces.collect.errors import CollectError


@dataclass(frozen=True)
class Prompt:
    """One request to collect: its label (kept in the trace) and text."""

    label: str
    text: str


def load_prompts(
    spec: str | Path, *, field: str | None = None, split: str = "train", limit: int | None = None
) -> list[Prompt]:
    """Read a prompt set; one clear :class:`CollectError` for anything unusable."""
    spec_s = str(spec)
    if spec_s.startswith("hf:"):
        prompts = _from_datasets(spec_s[3:], field, split)
    else:
        path = Path(spec_s).expanduser()
        if not path.is_file():
            raise CollectError(f"prompt file not found: {path}")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CollectError(f"cannot read prompt file {path}: {exc}") from None
        if path.suffix in (".jsonl", ".json"):
            prompts = _from_jsonl(raw, path, field)
        else:
            prompts = _from_text(raw, path)
    if limit is not None:
        prompts = prompts[: max(0, int(limit))]
    if not prompts:
        raise CollectError(f"prompt set {spec_s} has no prompts")
    return prompts


def _from_text(raw: str, path: Path) -> list[Prompt]:
    lines = raw.splitlines()
    if any(not ln.strip() for ln in lines):
        blocks, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln)
            elif cur:
                blocks.append("\n".join(cur))
                cur = []
        if cur:
            blocks.append("\n".join(cur))
        texts = blocks
    else:
        texts = lines
    return [Prompt(f"{path.stem}/{i}", t) for i, t in enumerate(texts)]


def _from_jsonl(raw: str, path: Path, field: str | None) -> list[Prompt]:
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CollectError(f"{path} line {n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise CollectError(f"{path} line {n}: expected a JSON object")
        keys = [field] if field else ["prompt", "text"]
        text = next((obj[k] for k in keys if isinstance(obj.get(k), str)), None)
        if text is None:
            raise CollectError(f"{path} line {n}: no string field {' or '.join(keys)}")
        label = str(obj.get("id") or obj.get("source") or f"{path.stem}/{len(out)}")
        out.append(Prompt(label, text))
    return out


def _from_datasets(spec: str, field: str | None, split: str) -> list[Prompt]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise CollectError("hf: prompt sets need the 'datasets' package") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the message only
        raise CollectError(f"cannot load dataset {spec}: {exc}") from None
    key = field or next((k for k in ("prompt", "text", "question") if k in ds.column_names), None)
    if key is None:
        raise CollectError(f"dataset {spec} has no prompt/text/question column; set prompts.field")
    return [Prompt(f"{name}/{i}", str(row[key])) for i, row in enumerate(ds)]


class Tokenizer(Protocol):
    """What the collector needs from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def piece(self, token_id: int) -> str: ...

    @property
    def eos_id(self) -> int | None: ...


class ByteTokenizer:
    """Raw UTF-8 bytes as token ids 0..255 (the embedded model's vocabulary)."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def piece(self, token_id: int) -> str:
        return bytes([int(token_id) & 0xFF]).decode("utf-8", errors="backslashreplace")


class HFTokenizer:
    """Adapter over a transformers tokenizer (no special tokens added: prompts are raw)."""

    def __init__(self, tok: object) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))  # type: ignore[attr-defined]

    def piece(self, token_id: int) -> str:
        return str(self._tok.decode([int(token_id)]))  # type: ignore[attr-defined]

    @property
    def eos_id(self) -> int | None:
        eid = getattr(self._tok, "eos_token_id", None)
        return None if eid is None else int(eid)


def load_tokenizer(spec: str, model_path: str, trust_remote_code: bool = False) -> Tokenizer:
    """``bytes`` -> :class:`ByteTokenizer`; ``auto`` -> the tokenizer beside the model."""
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    src = model_path if spec == "auto" else spec
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError/...; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectError(
            f"cannot load a tokenizer from {src} ({first}); set model.tokenizer=bytes or a path"
        ) from None
    if not tok.encode("def f(x): return x", add_special_tokens=False):
        # transformers 5 builds an empty tokenizer from the model type when no files exist
        raise CollectError(
            f"{src} has no usable tokenizer (no tokenizer files?); set model.tokenizer=bytes "
            "or a tokenizer path"
        )
    return HFTokenizer(tok)
