"""Run a transformers MoE model over a prompt set and write a routing trace with hidden states.

Per prompt: one prefill forward pass (phase 0 rows for every prompt token), then greedy decoding
with the KV cache, one forward pass per generated token (phase 1 rows: decode token t is the
t-th generated token, routed when it is fed back). Encoder-decoder models (SwitchTransformers):
the encoder pass gives the phase-0 rows of the encoder layers, each decoder step one phase-1 row
per decoder layer (the first processes the decoder start token); the trace is ``partial``
because an encoder token has no decoder-layer rows and vice versa.

Each finished request is saved as a part file in a work directory (atomic rename), so an
interrupted run resumes where it stopped; the parts are merged into the trace at the end.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from moesim.traces.collect.errors import CollectError
from moesim.traces.collect.prompts import Prompt, Tokenizer, load_prompts, load_tokenizer
from moesim.traces.errors import TraceError
from moesim.traces.store import FeatureSpec, TraceSummary, TraceWriter, atomic_path
from moesim.traces.trace import DECODE, PREFILL, RequestRouting, TraceMeta

PART_VERSION = 1
TOP_K_KEYS = ("num_experts_per_tok", "num_selected_experts", "moe_topk", "experts_per_token")
SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "shared_expert_count")


@dataclass
class CollectSettings:
    """Everything that decides what a collection run records (hashed for resume checks)."""

    model_path: str
    prompts: str
    out: str
    model_name: str | None = None
    tokenizer: str = "auto"  # auto | bytes | <path or hub id>
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    device_map: str | None = None  # e.g. "auto": shard a model too big for one GPU (accelerate)
    prompt_field: str | None = None
    prompt_split: str = "train"
    limit: int | None = None
    max_prompt_tokens: int = 512
    max_new_tokens: int = 32
    stop_at_eos: bool = True
    hidden_states: bool = True
    router_probs: bool = False
    work_dir: str | None = None
    keep_parts: bool = False
    progress: bool = True
    expert_dtype_bytes: int = 2
    seed: int = 0
    threads: int | None = None  # torch CPU threads; 1 is fastest for tiny models on busy cores

    def fingerprint_fields(self) -> dict[str, Any]:
        skip = {"out", "work_dir", "keep_parts", "progress", "device", "device_map", "threads"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class CollectResult:
    """What a run produced."""

    trace: Path
    routers: Path
    summary: TraceSummary
    resumed_requests: int
    features: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# model loading


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CollectError(f"device {device} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise CollectError(f"model.dtype must be auto or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def load_model(
    path: str, dtype: Any, device: str, trust_remote_code: bool, device_map: str | None = None
) -> Any:
    """AutoModelForCausalLM, or AutoModelForSeq2SeqLM for encoder-decoder configs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    def first_line(exc: BaseException) -> str:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__

    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError/ValueError/...: report one line
        raise CollectError(f"cannot load a model config from {path}: {first_line(exc)}") from None
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        kw = {"device_map": device_map} if device_map else {}
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except Exception as exc:
        raise CollectError(f"cannot load model weights from {path}: {first_line(exc)}") from None
    return (model if device_map else model.to(device)).eval()


def check_model_path(path: str) -> None:
    """Fail fast (before importing transformers) on a local path that does not exist."""
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise CollectError(f"cannot load a model config from {path}: no such directory")


def config_top_k(config: Any) -> int | None:
    for key in TOP_K_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------------------------
# one request


@dataclass
class RequestRecord:
    """One collected request, as saved in a part file."""

    request_id: int
    label: str
    experts: np.ndarray  # int16 [T, L, k]
    scores: np.ndarray  # float32 [T, L, k]
    phase: np.ndarray  # uint8 [T]
    token_ids: np.ndarray  # int32 [T]
    tokens: list[str]
    features: dict[str, np.ndarray]  # name -> [T, L, D]

    def save(self, path: Path) -> None:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        arrays = {
            "version": np.array(PART_VERSION),
            "request_id": np.array(self.request_id),
            "label": np.array(self.label),
            "experts": self.experts,
            "scores": self.scores,
            "phase": self.phase,
            "token_ids": self.token_ids,
            "tokens": np.array(self.tokens, dtype=np.str_),
            **{f"feat.{k}": v for k, v in self.features.items()},
        }
        try:
            with tmp.open("wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> RequestRecord:
        with np.load(path, allow_pickle=False) as z:
            feats = {k[5:]: z[k] for k in z.files if k.startswith("feat.")}
            return cls(
                request_id=int(z["request_id"]),
                label=str(z["label"]),
                experts=z["experts"],
                scores=z["scores"],
                phase=z["phase"],
                token_ids=z["token_ids"],
                tokens=[str(t) for t in z["tokens"]],
                features=feats,
            )


# (token ids fed, phase, router calls per layer id, pre-attention states per layer id)
Step = tuple[list[int], int, dict[int, Any], dict[int, Any]]


class _Runner:
    """Owns the model, its hooks and the greedy loop."""

    def __init__(self, model: Any, tokenizer: Tokenizer, settings: CollectSettings) -> None:
        from moesim.traces.collect.hooks import HookSet, find_layout

        self.model = model
        self.tok = tokenizer
        self.s = settings
        self.layout = find_layout(model)
        self.top_k_hint = config_top_k(model.config) or 1
        self.hooks = HookSet(self.layout, self.top_k_hint, want_pre_attn=settings.hidden_states)
        self.index = {m.layer_id: j for j, m in enumerate(self.layout.moe)}
        self.device = next(model.parameters()).device
        self.enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        params = inspect.signature(model.forward).parameters
        self.logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers >= 5.24 names the KV cache ``cache`` and deprecates ``past_key_values``;
        # older releases know only ``past_key_values``. Use whichever this forward takes.
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.hidden = int(self.layout.moe[0].weight.shape[1])

    def close(self) -> None:
        self.hooks.remove()

    def _step(self, kv: Any = None, **kw: Any) -> tuple[Any, dict[int, Any], dict[int, Any]]:
        """One forward pass with the KV cache ``kv`` (None on the first pass)."""
        if kv is not None:
            kw[self.cache_kw] = kv
        out = self.model(**kw)
        calls, pre = self.hooks.take()
        return out, calls, pre

    def _kv(self, out: Any) -> Any:
        """The KV cache a forward pass returned, under the name this transformers uses."""
        return getattr(out, self.cache_kw)

    def run(self, rid: int, prompt: Prompt) -> RequestRecord:
        import torch

        ids = self.tok.encode(prompt.text)[: max(1, self.s.max_prompt_tokens)]
        if not ids:
            raise CollectError(f"prompt {prompt.label} is empty after tokenisation")
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if vocab and max(ids) >= vocab:
            raise CollectError(
                f"prompt {prompt.label}: token id {max(ids)} >= model vocab_size {vocab} "
                "(wrong tokenizer?)"
            )
        steps: list[Step] = []
        x = torch.tensor([ids], device=self.device)
        eos = self.tok.eos_id if self.s.stop_at_eos else None
        with torch.inference_mode():
            if self.enc_dec:
                enc = self.model.get_encoder()(input_ids=x, return_dict=True)
                calls, pre = self.hooks.take()
                steps.append((ids, PREFILL, calls, pre))
                start = self.model.config.decoder_start_token_id
                nxt = torch.tensor([[0 if start is None else int(start)]], device=self.device)
                pkv = None
                for _ in range(self.s.max_new_tokens):
                    out, calls, pre = self._step(
                        encoder_outputs=enc,
                        decoder_input_ids=nxt,
                        kv=pkv,
                        use_cache=True,
                    )
                    steps.append(([int(nxt.item())], DECODE, calls, pre))
                    pkv = self._kv(out)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    if eos is not None and int(nxt.item()) == eos:
                        break
            else:
                out, calls, pre = self._step(input_ids=x, use_cache=True, **self.logits_kw)
                steps.append((ids, PREFILL, calls, pre))
                pkv = self._kv(out)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(self.s.max_new_tokens):
                    if eos is not None and int(nxt.item()) == eos:
                        break
                    out, calls, pre = self._step(
                        input_ids=nxt, kv=pkv, use_cache=True, **self.logits_kw
                    )
                    steps.append(([int(nxt.item())], DECODE, calls, pre))
                    pkv = self._kv(out)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return self._assemble(rid, prompt.label, steps)

    def _assemble(self, rid: int, label: str, steps: list[Step]) -> RequestRecord:
        n_tok = sum(len(s[0]) for s in steps)
        n_layers = len(self.layout.moe)
        k = next(c.ids.shape[1] for s in steps for c in s[2].values())
        e = self.layout.num_experts
        experts = np.full((n_tok, n_layers, k), -1, dtype=np.int16)
        scores = np.full((n_tok, n_layers, k), np.nan, dtype=np.float32)
        phase = np.zeros(n_tok, dtype=np.uint8)
        feats: dict[str, np.ndarray] = {}
        if self.s.hidden_states:
            feats["pre_attn"] = np.zeros((n_tok, n_layers, self.hidden), dtype=np.float16)
            feats["router_in"] = np.zeros((n_tok, n_layers, self.hidden), dtype=np.float16)
        if self.s.router_probs:
            feats["router_probs"] = np.zeros((n_tok, n_layers, e), dtype=np.float16)
        token_ids: list[int] = []
        t0 = 0
        for tok_ids, ph, calls, pre in steps:
            n = len(tok_ids)
            sl = slice(t0, t0 + n)
            phase[sl] = ph
            token_ids.extend(tok_ids)
            for lid, call in calls.items():
                j = self.index[lid]
                if call.ids.shape[0] != n or call.ids.shape[1] != k:
                    raise CollectError(
                        f"layer {lid}: router gave {tuple(call.ids.shape)} for {n} tokens, top-{k}"
                    )
                experts[sl, j] = call.ids.cpu().numpy().astype(np.int16)
                if call.weights is not None:
                    scores[sl, j] = call.weights.float().cpu().numpy()
                if "router_in" in feats:
                    feats["router_in"][sl, j] = call.router_in.float().cpu().numpy()
                if "router_probs" in feats:
                    feats["router_probs"][sl, j] = call.logits.softmax(-1).cpu().numpy()
                if "pre_attn" in feats and lid in pre:
                    feats["pre_attn"][sl, j] = pre[lid].float().cpu().numpy()
            t0 += n
        return RequestRecord(
            request_id=rid,
            label=label,
            experts=experts,
            scores=scores,
            phase=phase,
            token_ids=np.asarray(token_ids, dtype=np.int32),
            tokens=[self.tok.piece(t) for t in token_ids],
            features=feats,
        )

    # ------------------------------------------------------------------------------------------

    def expert_params(self) -> int:
        """Parameters of one routed expert (experts module of the first MoE block / E)."""
        m = self.layout.moe[0]
        parent = self.model.get_submodule(m.router_name.rpartition(".")[0])
        experts = getattr(parent, "experts", None)
        if experts is None:
            return 0
        return int(sum(p.numel() for p in experts.parameters()) // self.layout.num_experts)

    def num_shared(self) -> int:
        for key in SHARED_KEYS:
            v = getattr(self.model.config, key, None)
            if isinstance(v, int):
                return v
        m = self.layout.moe[0]
        parent = self.model.get_submodule(m.router_name.rpartition(".")[0])
        return 1 if any(hasattr(parent, n) for n in ("shared_expert", "shared_experts")) else 0

    def router_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for m in self.layout.moe:
            out[f"layer_{m.layer_id}"] = m.weight.detach().float().cpu().numpy()
            for name, t in [*m.router.named_parameters(), *m.router.named_buffers()]:
                if t is not m.weight:
                    out[f"layer_{m.layer_id}.{name}"] = t.detach().float().cpu().numpy()
        return out


# ----------------------------------------------------------------------------------------------
# the run


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_fingerprint(model: Any) -> str:
    """Cheap identity of the weights: config plus a checksum of every router matrix."""
    import torch

    from moesim.traces.collect.hooks import find_layout

    sums = []
    with torch.no_grad():
        for m in find_layout(model).moe:
            w = m.weight.detach().float()
            sums.append(round(float(w.abs().sum()), 3))
    return _digest({"config": model.config.to_dict(), "routers": sums})


PARTS_INFIX = ".parts-"
STALE_PARTS_S = 24 * 3600.0  # other fingerprints' parts untouched this long are swept at start


def _work_dir(s: CollectSettings, key: str) -> Path:
    """Per-request parts of one run, keyed by the run's full fingerprint ``key``: another model,
    prompt set, setting or library version gets its own folder (never a refusal), and an
    interrupted run with the same fingerprint resumes from its folder."""
    out = Path(s.out)
    base = Path(s.work_dir) if s.work_dir else out.parent
    return base / f".{out.name}{PARTS_INFIX}{key}"


def _sweep_stale_parts(s: CollectSettings, keep: Path, older_than_s: float) -> None:
    """Remove other fingerprints' part folders of the same output that nobody touched for
    ``older_than_s`` (a run in progress writes a part per request, so its folder stays fresh)."""
    out = Path(s.out)
    base = Path(s.work_dir) if s.work_dir else out.parent
    now = time.time()
    for old in base.glob(f".{out.name}{PARTS_INFIX}*"):
        if old == keep or not old.is_dir():
            continue
        try:
            fresh = max([old.stat().st_mtime] + [p.stat().st_mtime for p in old.iterdir()])
        except OSError:
            continue  # vanished under us: another process swept it
        if now - fresh > older_than_s:
            shutil.rmtree(old, ignore_errors=True)


def routers_path(trace: str | Path) -> Path:
    trace = Path(trace)
    return trace.with_name(trace.name.removesuffix(".parquet") + ".routers.npz")


def load_routers(path: str | Path) -> dict[int, np.ndarray]:
    """Router weight matrices ``{layer id: [E, d]}`` from a ``.routers.npz`` side file."""
    with np.load(path, allow_pickle=False) as z:
        return {int(k[6:]): z[k] for k in z.files if k.startswith("layer_") and "." not in k}


def collect(
    settings: CollectSettings, *, model: Any = None, tokenizer: Tokenizer | None = None
) -> CollectResult:
    """Collect a trace; ``model``/``tokenizer`` may be given directly (tests, embedded model)."""
    s = settings
    out = Path(s.out)
    if out.suffix != ".parquet":
        raise CollectError(f"out must end in .parquet, got {out}")
    if s.max_new_tokens < 0:
        raise CollectError("max_new_tokens must be >= 0")
    prompts = load_prompts(s.prompts, field=s.prompt_field, split=s.prompt_split, limit=s.limit)
    if model is None:
        check_model_path(s.model_path)
    import torch
    import transformers

    torch.manual_seed(s.seed)
    if model is None:
        device = resolve_device(s.device)
        model = load_model(
            s.model_path, resolve_dtype(s.dtype, device), device, s.trust_remote_code, s.device_map
        )
    else:
        model = model.eval()
    tok = tokenizer or load_tokenizer(s.tokenizer, s.model_path, s.trust_remote_code)
    runner = _Runner(model, tok, s)
    old_threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    try:
        # One collector per output at a time: a second one waits instead of racing the first
        # (then collects again: the first's parts are gone; ensure_embedded_trace re-checks
        # for the finished output under a lock of its own).
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(out.parent / f".{out.name}.lock"):
            return _collect_with(runner, prompts, s, out, transformers.__version__)
    finally:
        runner.close()
        torch.set_num_threads(old_threads)


def _collect_with(
    runner: _Runner, prompts: list[Prompt], s: CollectSettings, out: Path, tf_version: str
) -> CollectResult:
    from tqdm.auto import tqdm

    fp = {
        "settings": s.fingerprint_fields(),
        "prompts": _digest([(p.label, p.text) for p in prompts]),
        "model": _model_fingerprint(runner.model),
        "transformers": tf_version,
    }
    work = _work_dir(s, _digest(fp))
    _sweep_stale_parts(s, work, STALE_PARTS_S)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(fp, indent=1, sort_keys=True))

    parts = [work / f"req_{i:06d}.npz" for i in range(len(prompts))]
    done = sum(p.exists() for p in parts)
    bar = tqdm(total=len(prompts), initial=done, desc="collect", unit="req", disable=not s.progress)
    try:
        for i, (prompt, part) in enumerate(zip(prompts, parts, strict=True)):
            if part.exists():
                continue
            runner.run(i, prompt).save(part)
            bar.update(1)
    finally:
        bar.close()

    result = _merge(runner, prompts, parts, s, out, tf_version)
    result.resumed_requests = done
    if not s.keep_parts:
        shutil.rmtree(work, ignore_errors=True)
    # The output now holds this run: other fingerprints' parts for it are obsolete.
    _sweep_stale_parts(s, work, 0.0)
    return result


def _merge(
    runner: _Runner,
    prompts: list[Prompt],
    parts: list[Path],
    s: CollectSettings,
    out: Path,
    tf_version: str,
) -> CollectResult:
    first = RequestRecord.load(parts[0])
    top_k = int(first.experts.shape[2])
    layout = runner.layout
    features = {
        name: FeatureSpec(dim=int(arr.shape[2]), dtype="float16", description=desc)
        for name, arr in first.features.items()
        for desc in [FEATURE_DOCS.get(name, "")]
    }
    features["token_id"] = FeatureSpec(dim=1, dtype="int32", description=FEATURE_DOCS["token_id"])
    cfg = runner.model.config
    name = s.model_name or Path(s.model_path.rstrip("/")).name or str(cfg.model_type)
    notes = {
        "collector": "traces.collect",
        "transformers": tf_version,
        "model_path": s.model_path,
        "model_type": str(getattr(cfg, "model_type", "")),
        "router_class": layout.router_class,
        "router_found_by": layout.how_found,
        "stacks": json.dumps(layout.stacks),
        "prompts": f"{s.prompts} ({len(prompts)} prompts)",
        "max_new_tokens": str(s.max_new_tokens),
        "max_prompt_tokens": str(s.max_prompt_tokens),
        "phases": (
            "prefill = prompt tokens from the prefill pass; decode token t = t-th greedy token, "
            "routed when fed back with the KV cache"
            if not runner.enc_dec
            else "prefill = encoder rows of the prompt; decode = decoder steps from the start "
            "token (encoder tokens have no decoder-layer rows and vice versa)"
        ),
        "scores": "routing weights as the router returned them (after the model's own top-k "
        "normalisation and scaling), in descending order",
        "experts_order": "descending routing weight (router rank order)",
        "dtype": str(next(runner.model.parameters()).dtype).removeprefix("torch."),
        "expert_bytes": f"params per expert x {s.expert_dtype_bytes} bytes",
        "routers_file": routers_path(out).name,
    }
    meta = TraceMeta(
        model=name,
        moe_layers=tuple(m.layer_id for m in layout.moe),
        num_experts=layout.num_experts,
        top_k=top_k,
        num_shared_experts=runner.num_shared(),
        dense_layers=layout.dense_layers,
        expert_bytes=runner.expert_params() * int(s.expert_dtype_bytes),
        source=f"traces.collect from {s.model_path}",
        license="",
        partial=runner.enc_dec,
        notes=notes,
    )
    rpath = routers_path(out)
    try:
        with atomic_path(out) as tmp:
            # ~64 MB row groups: hidden states of a 2048-wide model are 8 KB per row
            row_bytes = 64 + sum(f.dim * np.dtype(f.dtype).itemsize for f in features.values())
            rg_rows = int(np.clip(2**26 // row_bytes, 1024, 2**18))
            writer = TraceWriter(
                tmp, meta, features=features, display_path=out, row_group_rows=rg_rows
            )
            try:
                for rec in _records(parts):
                    feats = dict(rec.features)
                    feats["token_id"] = np.broadcast_to(
                        rec.token_ids[:, None, None], (*rec.experts.shape[:2], 1)
                    )
                    writer.add(
                        RequestRouting(
                            request_id=rec.request_id,
                            experts=rec.experts,
                            phase=rec.phase,
                            scores=rec.scores,
                            tokens=rec.tokens,
                            label=rec.label,
                        ),
                        features=feats,
                    )
                summary = writer.close(meta)
            except BaseException:
                writer.abort()
                raise
            with atomic_path(rpath) as rtmp, rtmp.open("wb") as fh:
                np.savez(fh, **runner.router_arrays())
    except TraceError as exc:
        raise CollectError(f"trace not written: {exc}") from None
    return CollectResult(
        trace=out,
        routers=rpath,
        summary=summary,
        resumed_requests=0,
        features={k: v.dim for k, v in features.items()},
    )


FEATURE_DOCS = {
    "pre_attn": "output of the layer's pre-attention norm (input_layernorm) for this token",
    "router_in": "input of the router (MoE block input, post-attention norm output)",
    "router_probs": "softmax of the router logits over all experts",
    "token_id": "id of the token this row belongs to (repeated on each layer row)",
}


def _records(parts: list[Path]) -> Iterator[RequestRecord]:
    for p in parts:
        try:
            yield RequestRecord.load(p)
        except (OSError, ValueError, KeyError) as exc:
            raise CollectError(f"part file {p} is unreadable ({exc}); delete it, rerun") from None
