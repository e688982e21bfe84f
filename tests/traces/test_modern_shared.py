"""The 2025-26 real traces in ../shared/traces (skipped when that folder is absent): each set
imports in under 5 s with the counts its PROVENANCE.md states, the cards agree with the bytes the
traces state, moesim's LRU agrees with the engine's own residency, and every shipped policy runs
on a new trace with both engines giving the same result."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from moesim.policies.base import Knowledge
from moesim.policies.registry import policy_names, resolve
from moesim.sim import FixedCompute, FixedLink, SimulationError, simulate
from moesim.traces import import_trace, load_trace
from moesim.traces.model_card import load_card
from moesim.traces.residency import ENGINE_CACHE_MIB, check, engine_rule_lru, moesim_lru
from moesim.traces.store import read_meta, validate_trace
from tests.helpers import noisy_predictions
from tests.sim.test_compiled_engine import _assert_same
from tests.traces.fixtures import require_shared

pytestmark = pytest.mark.shared

BMOE = "qwen3_gemma4_gptoss_bigmoeonedge"
OCS = "qwen36_qwen15_moe-ocs-learning"
# (source, format, card, requests, tokens, recorded (token, layer) rows), from PROVENANCE.md
SETS = {
    "qwen3": (f"{BMOE}/qwen.route.csv", "bmoe-route-csv", "qwen3_30b_a3b_q4km", 1, 156,
              44_766 // 6),
    "gemma4": (f"{BMOE}/gemma.route.csv", "bmoe-route-csv", "gemma4_26b_a4b", 1, 157,
               28_260 // 6),
    "gptoss": (f"{BMOE}/gptoss.route.csv", "bmoe-route-csv", "gpt_oss_120b", 1, 149,
               10_560 // 2),
    "qwen36_mlx": (f"{OCS}/qwen3.6-35b-a3b-4bit/routing_pretrained.mlx.83eeb5f.json",
                   "ocs-routing-json", "qwen36_35b_a3b", 1, 164, 6_560),
    "qwen36_vllm": (f"{OCS}/qwen3.6-35b-a3b-4bit/routing_pretrained.vllm-metal.HEAD-49da265.json",
                    "ocs-routing-json", "qwen36_35b_a3b", 1, 163, 6_520),
    "qwen15": (f"{OCS}/qwen1.5-moe-a2.7b-chat-4bit", "ocs-routing-json", "qwen15_moe_a27b", 6,
               1_096, 26_304),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_new_set_imports_in_under_5_s(tmp_path: Path, name: str) -> None:
    sub, fmt, card, requests, tokens, rows = SETS[name]
    src = require_shared(sub)
    t0 = time.perf_counter()
    res = import_trace(fmt, src, tmp_path / "t.parquet")
    took = time.perf_counter() - t0
    assert took < 5.0, f"{name}: import took {took:.2f} s"
    assert (res.meta.model, res.requests, res.tokens, res.rows) == (card, requests, tokens, rows)
    validate_trace(res.out)


def test_bmoe_prefill_holes_are_the_documented_ones(tmp_path: Path) -> None:
    """PROVENANCE.md: qwen misses layer 47 for prefill steps 0-26, gpt-oss layer 35 for 0-83."""
    for fname, layer, last in (("qwen.route.csv", 47, 27), ("gptoss.route.csv", 35, 84),
                               ("gemma.route.csv", None, None)):
        res = import_trace("bmoe-route-csv", require_shared(f"{BMOE}/{fname}"),
                           tmp_path / f"{fname}.parquet")
        ex = load_trace(res.out).requests[0].experts
        holes = np.argwhere(ex[:, :, 0] < 0)
        if layer is None:
            assert len(holes) == 0 and not res.meta.partial
        else:
            assert set(holes[:, 1].tolist()) == {layer}
            assert holes[:, 0].tolist() == list(range(last))


@pytest.mark.parametrize(("fname", "card"), [("qwen.route.csv", "qwen3_30b_a3b_q4km"),
                                             ("gemma.route.csv", "gemma4_26b_a4b"),
                                             ("gptoss.route.csv", "gpt_oss_120b")])
def test_card_bytes_are_the_traces_per_layer_bytes(tmp_path: Path, fname: str, card: str) -> None:
    res = import_trace("bmoe-route-csv", require_shared(f"{BMOE}/{fname}"), tmp_path / "t.parquet")
    per_layer = [int(x) for x in read_meta(res.out).notes["expert_bytes_per_layer"].split(",")]
    c = load_card(card)
    assert c.expert_bytes == int(np.mean(per_layer))  # experts_bits is their mean
    assert list(c.extra.get("expert_bytes_per_layer", per_layer)) == per_layer


def test_q4km_card_has_the_shapes_of_the_bf16_card() -> None:
    base, q = load_card("qwen3_30b_a3b"), load_card("qwen3_30b_a3b_q4km")
    for f in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "num_layers",
              "moe_layers", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size"):
        assert getattr(base, f) == getattr(q, f), f


@pytest.mark.parametrize(("card", "mib"), [("qwen3_30b_a3b_q4km", 16_740),
                                           ("gemma4_26b_a4b", 14_429),
                                           ("gpt_oss_120b", 58_092)])
def test_whole_expert_bank_matches_the_engines_own_figure(card: str, mib: int) -> None:
    """Independent reference: BigMoeOnEdge's findings.md table 'whole bank' (MiB)."""
    assert load_card(card).routed_bytes_total / 2**20 == pytest.approx(mib, abs=1)


@pytest.mark.parametrize("name", sorted(ENGINE_CACHE_MIB))
def test_lru_agrees_with_the_engines_residency(tmp_path: Path, name: str) -> None:
    fname = {"qwen3_30b_a3b_bmoe": "qwen.route.csv", "gemma4_26b_a4b_bmoe": "gemma.route.csv",
             "gpt_oss_120b_bmoe": "gptoss.route.csv"}[name]
    res = import_trace("bmoe-route-csv", require_shared(f"{BMOE}/{fname}"), tmp_path / "t.parquet")
    row = check(name, res.out, ENGINE_CACHE_MIB[name])
    assert row.engine_rules_agreement == 1.0  # the stand-alone model of the engine's rules
    assert row.agreement >= 0.99
    assert row.disagree_prefill == 0
    # the residency column is 0 in prefill (looked up before the batch) and, in decode,
    # 1 exactly when the engine read nothing
    assert row.residency_col_prefill_zero == row.prefill_accesses
    assert row.residency_col_matches_decode == 1.0


def test_engine_rule_model_with_moesims_rules_is_moesim(tmp_path: Path) -> None:
    """With slots and first-use order the stand-alone model is moesim's LRU (gpt-oss: one
    expert size, so bytes and slots agree)."""
    res = import_trace("bmoe-route-csv", require_shared(f"{BMOE}/gptoss.route.csv"),
                       tmp_path / "t.parquet")
    hit, _, acc = moesim_lru(res.out, 3000)
    per_layer = [int(x) for x in read_meta(res.out).notes["expert_bytes_per_layer"].split(",")]
    model = engine_rule_lru(acc, per_layer, 3000 * 2**20, unit="slots", order="first_use")
    assert (model == hit).all()


def _predictions(trace, seed: int):
    """Noisy predictions for every (token, layer), recorded or not (a partial trace's missing
    cells get random ids, so the table covers every replayed token)."""
    rng = np.random.default_rng(seed)
    width = trace.meta.top_k
    table = noisy_predictions(trace, rng, 0.3, width)
    for rid, pred in table.items():
        holes = (pred < 0).any(axis=2)
        for t, j in np.argwhere(holes):
            pred[t, j] = rng.permutation(trace.meta.num_experts)[:width]
        table[rid] = pred
    return table


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_policy_runs_on_both_engines_with_equal_results(tmp_path: Path, name: str) -> None:
    """Every shipped policy on the prompt and 3 decode tokens of the first two requests (prompt
    as one prefill step), timed, with a cache of half the experts (enough for the widest
    prefill layer in every per-layer partition); where the compiled engine covers the policy
    its result equals the SimPy engine's."""
    sub, fmt, *_ = SETS[name]
    res = import_trace(fmt, require_shared(sub), tmp_path / "t.parquet")
    trace = load_trace(res.out).subset(max_requests=2)
    n_pre = max(int((r.phase == 0).sum()) for r in trace.requests)
    trace = trace.subset(max_tokens=n_pre + 3)
    meta = trace.meta
    widest = max(len(np.unique(r.experts[r.phase == 0][:, j])) for r in trace.requests
                 for j in range(meta.num_moe_layers))
    cap = meta.num_moe_layers * max(meta.num_experts // 2, min(widest + 2, meta.num_experts))
    preds = _predictions(trace, 0)
    kw = dict(capacity=cap, mode="timed", replay="prefill", link=FixedLink(1e-3, 1),
              compute=FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4,
                                   shared_s=1e-4, dense_s=5e-4))
    compiled = 0
    for policy in policy_names():
        spec = resolve({"name": policy})
        extra = {"predictions": preds} if spec.needs(Knowledge.PREDICTIONS) else {}
        run_kw = dict(kw)
        if spec.eviction.partition_required:
            run_kw["partition"] = spec.eviction.partition_required
        ref = simulate(trace, {"name": policy}, engine="python", **run_kw, **extra)
        assert ref.summary["accesses"] > 0, policy
        try:
            fast = simulate(trace, {"name": policy}, engine="compiled", **run_kw, **extra)
        except SimulationError as err:
            assert "compiled" in str(err), (policy, str(err))
            continue
        _assert_same(ref, fast)
        compiled += 1
    assert compiled >= 5
