"""Train the small embedded MoE language model (``moesim_tiny_moe``) on this machine.

Why: the project needs one *real* routing trace with hidden states that every machine can
regenerate offline. No hub weights are reachable, so a small OLMoE-style model is trained from
scratch on byte-level Python standard-library source (present on every Python install) and its
fp16 weights are committed (~15 MB). Usage::

    python -m moesim.traces.collect.train_embedded --minutes 20 --seed 0

``--minutes`` is turned into a fixed step count after timing a few warm-up steps (the LR
schedule needs the total); the step count actually used is written to ``train_info.json``, and
``--steps N`` reproduces that run step for step (deterministic up to torch's CPU kernels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "moesim_tiny_moe"
PROMPTS_FILE = ASSETS / "prompts_stdlib.jsonl"
EXCLUDE_PARTS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the embedded model (OLMoE-style: softmax router, top-k, no shared)."""

    vocab_size: int = 256  # raw bytes
    hidden_size: int = 128
    intermediate_size: int = 192  # per expert
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_experts: int = 16
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    router_aux_loss_coef: float = 0.02


def stdlib_files() -> list[Path]:
    """Sorted stdlib ``.py`` files (no tests / site-packages) — real text on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDE_PARTS.intersection(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def is_heldout(rel: str) -> bool:
    """Deterministic ~4% file-level hold-out (validation loss and prompts come from it)."""
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 25 == 0


def load_corpus() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(train bytes, heldout bytes, heldout (relpath, text)) from the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[bytes] = []
    held: list[bytes] = []
    held_texts: list[tuple[str, str]] = []
    for p in stdlib_files():
        rel = str(p.relative_to(root))
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if is_heldout(rel):
            held.append(data)
            held_texts.append((rel, data.decode("utf-8", errors="replace")))
        else:
            train.append(data)
    to_np = lambda parts: np.frombuffer(b"\n\n".join(parts), dtype=np.uint8).copy()  # noqa: E731
    return to_np(train), to_np(held), held_texts


def pick_prompts(held_texts: list[tuple[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` real snippets (a ``def``/``class`` line plus following lines, <= 96 bytes)."""
    rng = np.random.default_rng(seed)
    cands: list[tuple[str, str]] = []
    for rel, text in held_texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith(("def ", "class ")):
                snippet = line
                for nxt in lines[i + 1 : i + 6]:
                    if len(snippet) + 1 + len(nxt) > 96:
                        break
                    snippet += "\n" + nxt
                if 32 <= len(snippet.encode()) <= 96 and snippet.isascii():
                    cands.append((f"{rel}:{i + 1}", snippet))
    order = rng.permutation(len(cands))[:n]
    return [{"source": cands[i][0], "prompt": cands[i][1]} for i in sorted(order)]


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=0, help="exact step count (overrides minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    train, held, held_texts = load_corpus()
    print(f"corpus: {len(train):,} train bytes, {len(held):,} held-out bytes", flush=True)

    shape = ModelShape()
    cfg = OlmoeConfig(
        **asdict(shape),
        num_key_value_heads=shape.num_attention_heads,
        output_router_logits=True,
        norm_topk_prob=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = OlmoeForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    data = torch.from_numpy(train.astype(np.int64))
    hi = len(train) - args.seq - 1

    def batch() -> torch.Tensor:
        starts = torch.from_numpy(rng.integers(0, hi, size=args.batch))
        return torch.stack([data[s : s + args.seq] for s in starts.tolist()])

    warmup = 50
    total = args.steps or 10**9  # fixed after timing when --minutes is used
    losses: list[float] = []
    model.train()
    t0 = time.time()
    step = 0
    while step < total:
        if not args.steps and step == 20:
            per_step = (time.time() - t0) / 20
            total = max(100, int(args.minutes * 60 / per_step))
            print(f"{per_step:.2f} s/step -> {total} steps", flush=True)
        lr_total = total if total < 10**9 else 10**4
        if step < warmup:
            lr = args.lr * (step + 1) / warmup
        else:
            frac = min(1.0, (step - warmup) / max(1, lr_total - warmup))
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch()
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = float((out.loss - cfg.router_aux_loss_coef * out.aux_loss).detach())
        losses.append(lm)
        step += 1
        if step % 50 == 0 or step == total:
            el = (time.time() - t0) / 60
            print(
                f"step {step}/{total} lm {np.mean(losses[-50:]):.3f} "
                f"aux {float(out.aux_loss):.3f} lr {lr:.2e} {el:.1f} min",
                flush=True,
            )
    train_min = (time.time() - t0) / 60

    model.eval()
    erng = np.random.default_rng(12345)
    hdata = torch.from_numpy(held.astype(np.int64))
    vl = []
    with torch.no_grad():
        for _ in range(8):
            s = erng.integers(0, len(held) - args.seq - 1, size=args.batch).tolist()
            xb = torch.stack([hdata[i : i + args.seq] for i in s])
            o = model(input_ids=xb, labels=xb)
            vl.append(float(o.loss - cfg.router_aux_loss_coef * o.aux_loss))
    val = float(np.mean(vl))
    print(f"held-out loss {val:.3f} nats/byte ({val / math.log(2):.3f} bits/byte)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.half().save_pretrained(args.out)
    info = {
        "seed": args.seed,
        "steps": step,
        "batch": args.batch,
        "seq": args.seq,
        "tokens": step * args.batch * args.seq,
        "train_minutes": round(train_min, 2),
        "wall_minutes": round((time.time() - t_start) / 60, 2),
        "lr": args.lr,
        "params": n_params,
        "first_loss_50": round(float(np.mean(losses[:50])), 4),
        "final_train_loss_50": round(float(np.mean(losses[-50:])), 4),
        "heldout_loss": round(val, 4),
        "corpus_train_bytes": len(train),
        "corpus_heldout_bytes": len(held),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": args.threads,
        "reproduce": (
            f"python -m moesim.traces.collect.train_embedded --steps {step} --seed {args.seed} "
            f"--threads {args.threads} --batch {args.batch} --seq {args.seq} --lr {args.lr}"
        ),
        "shape": asdict(shape),
    }
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    prompts = pick_prompts(held_texts, args.prompts, args.seed)
    # the committed prompt set only belongs beside the committed model
    prompts_file = (
        PROMPTS_FILE if args.out.resolve() == MODEL_DIR.resolve() else args.out / PROMPTS_FILE.name
    )
    with prompts_file.open("w") as fh:
        for p in prompts:
            fh.write(json.dumps(p) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
