"""Writers of tiny sources in the exact formats of the shared traces (no shared file is copied).

Every writer returns what it wrote so tests can compare the imported trace against it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_ENV = "MOESIM_SHARED_TRACES"


def shared_traces_dir() -> Path:
    """``$MOESIM_SHARED_TRACES`` or ``<repo>/../shared/traces``."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def require_shared(sub: str = "") -> Path:
    path = shared_traces_dir() / sub
    if not path.exists():
        pytest.skip(f"shared traces not available at {path}")
    return path


def distinct_ids(rng: np.random.Generator, shape: tuple[int, ...], n_experts: int, k: int):
    """Random ``[..., k]`` ids, distinct along the last axis."""
    flat = int(np.prod(shape))
    out = np.empty((flat, k), dtype=np.int64)
    for i in range(flat):
        out[i] = rng.choice(n_experts, size=k, replace=False)
    return out.reshape(*shape, k)


# ---------------------------------------------------------------------------------------------
# MoE-Beyond CSV (DeepSeek-V2-Lite: layers 1..26, 64 experts, top-6)

DS_LAYERS = tuple(range(1, 27))
DS_HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
DS_PRED_HEADER = ["Layer ID", "Token", "Activated Expert IDs", "Predicted Expert IDs"]


def id_list(ids) -> str:
    return "[" + ", ".join(str(int(x)) for x in ids) + "]"


def write_moe_beyond(
    folder: Path,
    prompts: dict[int, int],
    *,
    variant: str = "training",
    seed: int = 0,
) -> dict[int, dict[str, object]]:
    """One file per prompt N with ``prompts[N]`` tokens; returns experts/tokens per N."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = {"training": "", "formatted": "_formatted", "predicted": "_predicted"}[variant]
    truth: dict[int, dict[str, object]] = {}
    for n, n_tok in prompts.items():
        ex = distinct_ids(rng, (n_tok, len(DS_LAYERS)), 64, 6)
        pred = distinct_ids(rng, (n_tok, len(DS_LAYERS)), 64, 6)
        if variant == "predicted":
            ex, pred = np.sort(ex, axis=2), np.sort(pred, axis=2)
        tokens = ["<｜begin▁of▁sentence｜>"] + [f"Ġw{n}_{t}" for t in range(1, n_tok)]
        if n_tok > 2:
            tokens[2] = 'say, "hi"'  # needs CSV quoting
        path = folder / f"prompt_{n}_data{suffix}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(DS_PRED_HEADER if variant == "predicted" else DS_HEADER)
            for j, layer in enumerate(DS_LAYERS):
                for t in range(n_tok):
                    if variant == "predicted":
                        w.writerow([layer, t, id_list(ex[t, j]), id_list(pred[t, j])])
                    else:
                        w.writerow([layer, 0, tokens[t], id_list(ex[t, j])])
        truth[n] = {"experts": ex, "tokens": tokens, "predicted": pred, "path": path}
    return truth


# ---------------------------------------------------------------------------------------------
# vLLM route logs (Qwen1.5-MoE: 60 experts, top-4; OLMoE: 64 experts, top-8)

QWEN_ID = "Qwen/Qwen1.5-MoE-A2.7B-Chat"
OLMOE_ID = "allenai/OLMoE-1B-7B-0924"


def write_vllm_log(
    path: Path,
    *,
    model_id: str,
    layer: int,
    token_idx: list[int],
    ids: np.ndarray,
    weights: np.ndarray,
    top_k: int,
    extra_meta: dict[str, object] | None = None,
) -> Path:
    meta = {
        "type": "meta",
        "model_id": model_id,
        "vllm_version": "0.0.test",
        "device": "cpu",
        "seed": 1234,
        "layers_logged": [layer],
        "top_k": top_k,
        **(extra_meta or {}),
    }
    with path.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(meta) + "\n")
        for t, row_ids, row_w in zip(token_idx, ids, weights, strict=True):
            fh.write(
                json.dumps(
                    {
                        "type": "route",
                        "req_id": "r1",
                        "token_idx": int(t),
                        "layer": layer,
                        "topk_ids": [int(x) for x in row_ids],
                        "topk_weights": [float(x) for x in row_w],
                    }
                )
                + "\n"
            )
    return path


QWEN_DUMMY_PASSES = (32, 16)  # warm-up passes (token_idx restarts), constant expert set
QWEN_REAL_PASSES = (12, 20, 3, 3, 3, 2)  # 2 prefill passes (> 3 prompts), then decode passes


def write_qwen_folder(folder: Path, layers=(0, 8), *, seed: int = 0) -> dict[str, object]:
    """A multi-layer Qwen1.5 logger folder like the weiran0129 one (3 prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_real = sum(QWEN_REAL_PASSES)
    tok_real = [t for size in QWEN_REAL_PASSES for t in range(size)]
    tok_dummy = [t for size in QWEN_DUMMY_PASSES for t in range(size)]
    real = {}
    for layer in layers:
        dummy_ids = np.tile(rng.choice(60, 4, replace=False), (len(tok_dummy), 1))
        dummy_ids[len(tok_dummy) - 1] = dummy_ids[0][::-1]  # same set, other order
        ids = distinct_ids(rng, (n_real,), 60, 4)
        w = np.sort(rng.random((n_real, 4)).astype(np.float32) / 4, axis=1)[:, ::-1]
        all_ids = np.concatenate([dummy_ids, ids])
        all_w = np.concatenate([np.full((len(tok_dummy), 4), 0.05, np.float32), w])
        write_vllm_log(
            folder / f"moe_layer{layer}.jsonl",
            model_id=QWEN_ID,
            layer=layer,
            token_idx=tok_dummy + tok_real,
            ids=all_ids,
            weights=all_w,
            top_k=4,
        )
        real[layer] = (ids, w)
    (folder / "GSM8K_test.txt").write_text("Q one?\n\n---\n\nQ two?\n\n---\n\nQ three?\n")
    return {"real": real, "n_real": n_real, "dummy": sum(QWEN_DUMMY_PASSES)}


def write_olmoe_folder(folder: Path, *, n_dummy: int = 32, n_real: int = 40, generated: int = 30):
    """An OLMoE-style log: one global token counter, uniform-weight dummy rows first."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    ids = distinct_ids(rng, (n_real,), 64, 8)
    w = rng.random((n_real, 8)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    dummy = np.tile(np.array([7, 6, 4, 5, 1, 0, 2, 3]), (n_dummy, 1))
    write_vllm_log(
        folder / "moe_routes.jsonl",
        model_id=OLMOE_ID,
        layer=0,
        token_idx=list(range(n_dummy + n_real)),
        ids=np.concatenate([dummy, ids]),
        weights=np.concatenate([np.full((n_dummy, 8), 0.125, np.float32), w]),
        top_k=8,
        extra_meta={"num_experts": 64},
    )
    (folder / "prompts.txt").write_text("a?\n\n---\n\nb?\n\n---\n\nc?\n")
    (folder / "timing.json").write_text(json.dumps({"log": {"tokens_generated": generated}}))
    return {"ids": ids, "weights": w, "n_real": n_real, "n_dummy": n_dummy}


# ---------------------------------------------------------------------------------------------
# speculative-moe (Mixtral: 32 layers, 8 experts, top-2)

MIX_LAYERS = 32


def write_spec_decode(
    path: Path,
    dataset: str,
    problems: dict[int, int],
    *,
    tail_missing: dict[int, list[int]] | None = None,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Decode log sorted by (problem, layer, token); ``tail_missing[p]`` = layers absent from
    the last token of problem p."""
    rng = np.random.default_rng(seed)
    truth = {}
    rows = []
    for p, n_tok in problems.items():
        ex = distinct_ids(rng, (n_tok, MIX_LAYERS), 8, 2)
        truth[p] = ex
        for layer in range(MIX_LAYERS):
            for t in range(n_tok):
                if t == n_tok - 1 and layer in (tail_missing or {}).get(p, []):
                    continue
                rows.append(
                    {
                        "dataset": dataset,
                        "problem_id": p,
                        "layer": layer,
                        "experts": [int(x) for x in ex[t, layer]],
                        "gating_probs": [0.75, 0.25],
                        "token_idx": t,
                    }
                )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return truth


def write_spec_raw(
    path: Path, *, prompt: int = 5, steps: int = 4, gaps: tuple[tuple[int, int], ...] = ()
) -> np.ndarray:
    """Raw execution-order log: a prefill pass (layer-major) then one pass per decode step.

    ``gaps`` lists (token, layer) rows to omit (token >= prompt means decode step token-prompt).
    Returns the full ``[prompt + steps, 32, 2]`` experts.
    """
    rng = np.random.default_rng(7)
    ex = distinct_ids(rng, (prompt + steps, MIX_LAYERS), 8, 2)
    skip = set(gaps)
    rows = []
    for layer in range(MIX_LAYERS):
        for t in range(prompt):
            if (t, layer) not in skip:
                rows.append((layer, t, ex[t, layer]))
    for s in range(steps):
        for layer in range(MIX_LAYERS):
            if (prompt + s, layer) not in skip:
                rows.append((layer, 0, ex[prompt + s, layer]))
    path.write_text(
        "".join(
            json.dumps(
                {
                    "dataset": "humaneval",
                    "problem_id": 0,
                    "layer": layer,
                    "token_pos": pos,
                    "experts": [int(x) for x in e],
                    "gating_probs": [0.6, 0.4],
                }
            )
            + "\n"
            for layer, pos, e in rows
        ),
        encoding="utf-8",
    )
    return ex
