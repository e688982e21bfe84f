"""Every supported architecture: recorded ids == the model's own router top-k; feature shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moesim.traces.collect import CollectSettings, collect, load_routers  # noqa: E402
from moesim.traces.collect.prompts import ByteTokenizer  # noqa: E402
from moesim.traces.store import load_features, load_trace, read_header, validate_trace  # noqa: E402
from tests.collect.archs import ARCHS, Arch, reference_topk  # noqa: E402

PROMPTS = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n"
NEW = 4


def _reference_logits(arch: Arch, model, req) -> list[torch.Tensor]:
    """Router logits per MoE layer for the request's recorded tokens, from one full forward."""
    ids = torch.tensor([[int(t) for t in req.token_ids]])
    with torch.inference_mode():
        if arch.enc_dec:
            n_enc = int((req.phase == 0).sum())
            out = model(
                input_ids=ids[:, :n_enc],
                decoder_input_ids=ids[:, n_enc:],
                output_router_logits=True,
            )
            enc = [t for t in out.encoder_router_logits if t is not None]
            dec = [t for t in out.decoder_router_logits if t is not None]
            return [t.reshape(-1, t.shape[-1]) for t in (*enc, *dec)]
        out = model(input_ids=ids, output_router_logits=True)
        return [t.reshape(-1, t.shape[-1]) for t in out.router_logits if t is not None]


class _Req:
    def __init__(self, req, token_ids):
        self.phase = req.phase
        self.token_ids = token_ids


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_recorded_ids_match_model_router(arch: Arch, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = arch.build().eval()
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "t.parquet"
    res = collect(
        CollectSettings(
            model_path=arch.name,
            prompts=str(prompts),
            out=str(out),
            max_new_tokens=NEW,
            progress=False,
            router_probs=True,
        ),
        model=model,
        tokenizer=ByteTokenizer(),
    )
    validate_trace(out)
    trace = load_trace(out)
    meta = trace.meta
    assert meta.moe_layers == arch.moe_layers
    assert meta.top_k == arch.top_k
    assert meta.partial == arch.enc_dec
    assert meta.num_shared_experts == arch.shared and meta.expert_bytes > 0
    assert meta.dense_layers == tuple(
        i for i in range(max(arch.moe_layers) + 1) if i not in arch.moe_layers
    )
    assert len(trace) == 2
    tok_feat = load_features(out, "token_id")[:, 0]
    row = 0
    for req in trace:
        recorded = req.experts[:, :, 0] >= 0  # [T, L]
        n_rows = int(recorded.sum())
        tids = tok_feat[row : row + n_rows]
        # one token id per token, repeated on each of its rows
        per_tok = np.repeat(np.arange(req.num_tokens), recorded.sum(1))
        token_ids = np.zeros(req.num_tokens, dtype=np.int64)
        token_ids[per_tok] = tids
        row += n_rows
        assert (req.phase == 1).sum() == NEW
        ref = _reference_logits(arch, model, _Req(req, token_ids))
        assert len(ref) == len(arch.moe_layers)
        for j in range(len(arch.moe_layers)):
            toks = np.flatnonzero(recorded[:, j])
            want = reference_topk(arch, model, ref[j], j).numpy()
            assert want.shape[0] == len(toks)
            got = np.sort(req.experts[toks, j].astype(np.int64), axis=1)
            agree = (got == np.sort(want, axis=1)).all(axis=1)
            assert agree.mean() >= 0.98, (arch.name, j, agree.mean())
            sc = req.scores[toks, j]
            assert np.isfinite(sc).all()
            assert (np.diff(sc, axis=1) <= 1e-6).all()  # rank order: descending weight
    # hidden-state features: one row per trace row, model width
    rows = trace.num_rows
    hidden = int(model.config.d_model if arch.enc_dec else model.config.hidden_size)
    for name in ("pre_attn", "router_in"):
        f = load_features(out, name)
        assert f.shape == (rows, hidden) and f.dtype == np.float16
        assert np.isfinite(f).all() and np.abs(f).sum(1).min() > 0
    probs = load_features(out, "router_probs")
    assert probs.shape == (rows, 8 if not arch.enc_dec else 4)
    decl = read_header(out)["features"]
    assert decl["pre_attn"] == {**decl["pre_attn"], "dtype": "float16", "shape": [hidden]}
    routers = load_routers(res.routers)
    assert sorted(routers) == list(arch.moe_layers)
    assert all(w.shape == (probs.shape[1], hidden) for w in routers.values())
    # the router input really is what the router saw: its logits reproduce the recorded top-1
    r_in = load_features(out, "router_in").astype(np.float32)
    layer_col = np.concatenate([np.nonzero(r.experts[:, :, 0] >= 0)[1] for r in trace])
    lw = np.stack([routers[arch.moe_layers[j]] for j in layer_col])
    with np.load(res.routers) as z:
        bias = {
            j: z[f"layer_{lid}.bias"]
            for j, lid in enumerate(arch.moe_layers)
            if f"layer_{lid}.bias" in z.files
        }
    lb = np.stack([bias.get(j, np.zeros(lw.shape[1], np.float32)) for j in layer_col])
    top1 = np.argmax(np.einsum("nd,ned->ne", r_in, lw) + lb, axis=1)
    rec_top1 = np.concatenate([r.experts[r.experts[:, :, 0] >= 0][:, 0] for r in trace])
    if arch.rule in ("softmax_topk", "logits_topk", "top1"):
        assert (top1 == rec_top1).mean() >= 0.95, arch.name


def test_hidden_states_are_the_norm_outputs(tmp_path: Path) -> None:
    """feat.pre_attn == input_layernorm output, feat.router_in == post_attention_layernorm
    output, checked with independent hooks on one full forward pass (OLMoE)."""
    arch = next(a for a in ARCHS if a.name == "olmoe")
    torch.manual_seed(0)
    model = arch.build().eval()
    prompts = tmp_path / "p.txt"
    prompts.write_text("for i in range(10):\n")
    out = tmp_path / "t.parquet"
    collect(
        CollectSettings(
            model_path="olmoe", prompts=str(prompts), out=str(out), max_new_tokens=3, progress=False
        ),
        model=model,
        tokenizer=ByteTokenizer(),
    )
    (req,) = load_trace(out).requests
    ids = torch.from_numpy(load_features(out, "token_id")[::2, 0].astype(np.int64))[None]
    seen: dict[str, list[torch.Tensor]] = {"pre": [], "post": []}
    hooks = []
    for layer in model.model.layers:
        hooks.append(
            layer.input_layernorm.register_forward_hook(lambda _m, _a, o: seen["pre"].append(o[0]))
        )
        hooks.append(
            layer.post_attention_layernorm.register_forward_hook(
                lambda _m, _a, o: seen["post"].append(o[0])
            )
        )
    with torch.inference_mode():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    n_layers = len(model.model.layers)
    for name, key in (("pre_attn", "pre"), ("router_in", "post")):
        got = load_features(out, name).astype(np.float32).reshape(req.num_tokens, n_layers, -1)
        want = torch.stack(seen[key], dim=1).numpy()  # [T, L, d]
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
