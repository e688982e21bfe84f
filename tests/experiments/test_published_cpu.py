"""Published entries that compute experts on the host CPU (llama.cpp, kTransformers): how an
entry's placement becomes a moesim placement, the runtime's CPU kernels reaching the run, the
calibration discipline of the llama_cpp fit, and the CPU/fetch crossover rows of the page."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from moesim.experiments.published.docs import (
    CROSSOVER_EFFECT,
    CROSSOVER_SETUPS,
    FIDDLER_LATENCY_CPU,
    FIDDLER_LATENCY_GPU,
    crossover_effects,
)
from moesim.experiments.published.entries import Entry, load_entries
from moesim.experiments.published.fit import CALIBRATION, fit_runtime
from moesim.experiments.published.predict import NotPredictable, placement_of, prepare
from moesim.experiments.published.report import FIT_JSON
from moesim.hw_profiles.runtime import list_runtimes, load_runtime, with_values
from moesim.traces.model_card import load_card

CARD = load_card("mixtral_8x7b")


def _entries() -> dict:
    return {e.id: e for e in load_entries(runtimes=list_runtimes())}


def _static_cpu_entry() -> Entry:
    """MoE-Gen's llama.cpp Mixtral cell set to static_cpu beside its 24 GiB budget (the shipped
    cell is cpu_layers since the session-7 audit; a setup to exercise the mapping)."""
    return replace(_entries()["mg_t9_llamacpp_mixtral_b1"], placement="static_cpu")


def test_placement_of_follows_the_cache() -> None:
    e = _static_cpu_entry()  # static_cpu beside a GPU memory budget
    assert placement_of(e, CARD) == {"name": "static_cpu", "layers": None}  # --n-cpu-moe
    every = replace(e, cache={"none": True})  # kTransformers / -ot exps=CPU
    assert placement_of(every, CARD) == {"name": "static_cpu", "layers": CARD.num_moe_layers}
    gpu_experts = replace(e, cache={"per_layer": 2})  # kTransformers' GPU experts
    assert placement_of(gpu_experts, CARD) == {"name": "cpu_on_miss"}
    assert placement_of(replace(e, placement="fetch_or_cpu"), CARD) == {"name": "fetch_or_cpu"}
    assert placement_of(replace(e, placement="fetch"), CARD) is None


def test_placements_without_a_mapping_are_reported() -> None:
    e = _entries()["mg_t9_llamacpp_mixtral_b1"]
    with pytest.raises(NotPredictable, match="placement low_precision_fetch"):
        prepare(replace(e, placement="low_precision_fetch"))


def test_every_named_placement_is_predicted_or_refused_with_its_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A placement an entry names is predicted, or refused by ``prepare`` with its reason
    before any trace is read (no placement has such a reason at present: the refusal is
    checked on a stand-in); the audited whole-layer entries carry the placement assumption
    that records the evidence."""
    from moesim.experiments.published import predict
    from moesim.experiments.published.entries import PLACEMENTS

    assert set(predict.PREDICTED_PLACEMENTS) | set(predict.UNMODELLED_PLACEMENTS) <= set(
        PLACEMENTS)
    assert not set(predict.PREDICTED_PLACEMENTS) & set(predict.UNMODELLED_PLACEMENTS)
    entries = _entries()
    base = entries["mg_t9_llamacpp_mixtral_b1"]
    monkeypatch.setattr(predict, "UNMODELLED_PLACEMENTS", {"cpu_layers": "a stated reason"})
    with pytest.raises(NotPredictable) as err:
        prepare(base)  # refused before its trace is read
    assert str(err.value) == "placement cpu_layers: a stated reason"
    monkeypatch.undo()
    # the session-7 audit: llama.cpp / Ollama with whole layers on the CPU, accelerate offload
    layers = {"mg_t9_llamacpp_dsv2l_b1", "mg_t9_llamacpp_dsv2l_b32",
              "mg_t9_llamacpp_mixtral_b1", "mg_t9_llamacpp_mixtral_b32",
              "mi_lat_ollama_mixtral", "mi_tput_ollama_mixtral"}
    assert {e.id for e in entries.values() if e.placement == "cpu_layers"} == layers
    assert entries["mi_lat_accel_dsv2l"].placement == "layer_offload"
    for e in entries.values():
        if e.placement in ("cpu_layers", "layer_offload"):
            assert any(a.field == "placement" and a.entries and e.id in a.entries
                       and e.placement in str(a.value) for a in e.assumptions), e.id


def test_llama_cpp_fit_never_sees_a_held_out_entry() -> None:
    entries = list(_entries().values())
    seen: set[str] = set()

    def fake(entry, runtime):  # time grows with the per-token cost
        seen.add(entry.id)
        return entry.value * (1 + runtime.value("overhead.step_s"))

    fit_runtime(load_runtime("llama_cpp"), entries, fake, rounds=1, points=3)
    assert seen == set(CALIBRATION["llama_cpp"])


def test_shipped_llama_cpp_fit_is_the_committed_fit() -> None:
    """The fitted per-token cost is the committed fit's; the CPU kernels, with no predictable
    calibration entry since the session-7 audit, are estimates and say so."""
    fits = {f["runtime"]: f for f in json.loads(FIT_JSON.read_text())}
    rt = load_runtime("llama_cpp")
    assert rt.fit == ("overhead.step_s",)
    q = rt.quantity("overhead.step_s")
    assert q.kind == "fitted"
    assert q.value == pytest.approx(fits["llama_cpp"]["values"]["overhead.step_s"], rel=1e-5)
    assert rt.cpu_kernels is not None
    assert {r.kind for r in rt.cpu_kernels.rates.values()} == {"estimate"}


def test_crossover_rows_against_fiddlers_constants() -> None:
    df = crossover_effects()
    assert set(df["effect"]) == {CROSSOVER_EFFECT}
    assert (df["measured"] == FIDDLER_LATENCY_GPU / FIDDLER_LATENCY_CPU).all()
    assert len(df) == 2 * len(CROSSOVER_SETUPS) and (df["role"] == "not_fitted").all()
    for hw in CROSSOVER_SETUPS:
        plain = df[df["setting"] == f"{hw}, roofline host"]["predicted"].iloc[0]
        kern = df[df["setting"] == f"{hw}, fiddler CPU kernels"]["predicted"].iloc[0]
        # bf16 kernels can only bring the crossover earlier than the host's fp32 roofline
        assert 1 <= kern <= plain
    ok = df.dropna()
    assert (ok["error"] == ok["predicted"] / ok["measured"] - 1).all()


@pytest.mark.shared
def test_a_cpu_placement_entry_runs_the_runtimes_kernels() -> None:
    from tests.traces.fixtures import require_shared

    require_shared("mixtral8x7b_speculative-moe")
    from moesim.experiments.published.predict import predict_s_per_token

    p = prepare(_static_cpu_entry())
    # the budget's layer split, every GPU layer's expert resident from the start
    assert p.placement["name"] == "static_cpu" and 0 < p.placement["layers"] < 32
    assert p.capacity == 32 * 8 and p.warmup > 0
    rt = load_runtime("llama_cpp")
    slow = predict_s_per_token(p, with_values(rt, {"cpu_kernels.bf16": 1e-3}, "t"))
    fast = predict_s_per_token(p, with_values(rt, {"cpu_kernels.bf16": 1.0}, "t"))
    assert slow > 2 * fast  # the CPU layers' experts are compute-bound at the slow kernel
    # the GPU-only llama.cpp cell does not depend on the CPU kernels at all
    g = prepare(_entries()["lcpp1017_h100_decode"])
    assert g.placement is None
    assert math.isclose(predict_s_per_token(g, with_values(rt, {"cpu_kernels.bf16": 1e-3}, "t")),
                        predict_s_per_token(g, rt))


@pytest.mark.shared
def test_llama_cpp_calibrates_on_at_most_a_third_of_its_predictable_entries() -> None:
    from tests.traces.fixtures import require_shared

    require_shared("mixtral8x7b_speculative-moe")
    require_shared("deepseek_v2_lite_moe-beyond")
    predictable = []
    for e in _entries().values():
        if e.runtime != "llama_cpp":
            continue
        try:
            prepare(e)
        except NotPredictable:
            continue
        predictable.append(e.id)
    cal = CALIBRATION["llama_cpp"]
    assert set(cal) <= set(predictable) and 3 * len(cal) <= len(predictable)


@pytest.mark.shared
def test_llama_cpp_refit_reproduces_the_shipped_values() -> None:
    from tests.traces.fixtures import require_shared

    require_shared("mixtral8x7b_speculative-moe")
    from moesim.experiments.published.report import Predictions, fit_all

    entries = load_entries(runtimes=list_runtimes())
    fits = {f["runtime"]: f for f in json.loads(FIT_JSON.read_text())}
    res, = fit_all(entries, Predictions(entries), only=["llama_cpp"])
    for key, value in res.values.items():
        assert math.isclose(value, fits["llama_cpp"]["values"][key], rel_tol=1e-6), key
