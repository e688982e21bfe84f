"""Published measurements: the data's rules, the calibration protocol, the committed report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moesim.experiments.published.entries import PublishedError, load_entries
from moesim.experiments.published.fit import (
    CALIBRATION,
    RANGES,
    STRUCTURES,
    fit_runtime,
    shipped_structure,
)
from moesim.experiments.published.predict import (
    MAX_TOKENS,
    WARMUP,
    batch_segments,
    bus_generation,
    full_batch,
)
from moesim.experiments.published.report import FIT_JSON, PREDICTIONS_CSV, effects_table
from moesim.hw_profiles.runtime import list_runtimes, load_runtime

GOOD = {
    "source": {"id": "src", "title": "T", "cite": "C", "where": "Table 1", "url": ""},
    "defaults": {"model": "mixtral_8x7b", "hw": "t4", "runtime": "hqq_offload",
                 "cache": {"per_layer": 4}, "weights": {"experts_bits": 2.6}},
    "entries": [
        {"id": "a", "quote": "Table 1 | A | 2.0", "metric": "tokens_per_s", "value": 2.0},
        {"id": "b", "quote": "Table 1 | B | 1.5x", "metric": "speedup", "value": 1.5,
         "baseline": "a"},
    ],
    "assumptions": [{"field": "input_tokens", "value": 64, "why": "not stated"}],
}


def _write(tmp_path: Path, data: dict, name: str = "src") -> Path:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def test_shipped_entries_meet_the_bar() -> None:
    entries = load_entries(runtimes=list_runtimes())
    sources = {e.source.id for e in entries}
    assert len(entries) >= 40 and len(sources) >= 5
    for e in entries:
        assert e.quote and e.source.where and e.source.cite


def test_a_good_file_loads_with_defaults_and_assumptions(tmp_path: Path) -> None:
    a, b = load_entries(_write(tmp_path, GOOD), runtimes=list_runtimes())
    assert a.hw == "t4" and a.bits("experts") == 2.6 and a.cache == {"per_layer": 4}
    assert b.baseline == "a" and a.assumptions[0].field == "input_tokens"


def _bad(**change) -> dict:
    data = json.loads(json.dumps(GOOD))
    for path, value in change.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        if value is None:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return data


@pytest.mark.parametrize("change, words", [
    ({"entries__0__quote": None}, "field 'quote': is required"),
    ({"source": None}, "field 'source'"),
    ({"entries__0__runtime": "turbo"}, "field 'runtime': unknown runtime"),
    ({"entries__0__weights": {"experts_bits": 40}}, "weights.experts_bits"),
    ({"entries__0__weights": {"experts_bits": 0}}, "weights.experts_bits"),
    ({"entries__0__cache": {"per_layer": 0}}, "smaller than one expert per layer"),
    ({"entries__0__metric": "latency"}, "field 'metric'"),
    ({"entries__1__baseline": None}, "field 'baseline'"),
    ({"entries__1__id": "a"}, "id also used"),
    ({"entries__0__colour": "red"}, "unknown key(s) ['colour']"),
    ({"entries__0__value": -2}, "field 'value': must be > 0"),
    ({"entries__0__placement": "gpu_magic"}, "field 'placement': must be one of"),
    ({"entries__0__runtime_options": {"copy.speed": "fast"}},
     "field 'runtime_options.copy.speed': unknown"),
    ({"entries__0__runtime_options": {"compute.expert_calls": "per_row"}},
     "field 'runtime_options.compute.expert_calls': must be one of"),
    ({"entries__0__runtime_options": ["per_token"]}, "field 'runtime_options': expected"),
    # a llama.cpp build outside its runtime's era (the build number read from the version)
    ({"entries__0__runtime": "llama_cpp", "entries__0__version": "llama.cpp b9603",
      "entries__0__hw": "rtx3090"},
     "field 'runtime': llama_cpp models llama.cpp builds b0-b5100; the version states build "
     "9603: use runtime llama_cpp_graphs"),
    ({"entries__0__runtime": "llama_cpp_graphs", "entries__0__version": "build 1629"},
     "use runtime llama_cpp;"),
    ({"entries__0__runtime": "llama_cpp_graphs", "entries__0__version": "b5160"},
     "too near an era boundary to tell"),
    ({"entries__0__runtime": "llama_cpp_graphs", "entries__0__version": "build: 9db77a0 (1629)"},
     "the version states build 1629: use runtime llama_cpp;"),
    ({"entries__0__runtime": "llama_cpp_graphs", "entries__0__version": "since b7821; b10809"},
     "field 'version': names more than one llama.cpp build [7821, 10809]"),
    # a graph-era build on a Turing GPU (GOOD's T4) before Turing's graphs
    ({"entries__0__runtime": "llama_cpp_graphs", "entries__0__version": "b9603"},
     "field 'runtime': t4 is a Turing/Volta GPU, which llama.cpp runs with CUDA graphs only "
     "from about b10100; build 9603 is neither llama.cpp profile"),
    ({"entries__0__runtime": "llama_cpp", "entries__0__version": "b9603"},  # T4: no wrong hint
     "build 9603 is neither llama.cpp profile"),
])
def test_bad_input_is_one_line_naming_file_entry_field(tmp_path: Path, change: dict,
                                                       words: str) -> None:
    with pytest.raises(PublishedError) as err:
        load_entries(_write(tmp_path, _bad(**change)), runtimes=list_runtimes())
    msg = str(err.value)
    assert msg.startswith("src.yaml") and words in msg and "\n" not in msg


@pytest.mark.parametrize("runtime, version", [
    ("llama_cpp", "llama.cpp of mid-December 2023; commit not stated"),  # no build: no check
    ("llama_cpp", "b1629"), ("llama_cpp_graphs", "llama.cpp 5266f24 (build 10809)"),
    ("hqq_offload", "b9603"),  # only llama.cpp runtimes have eras
    # not builds: a date, a driver version, a GPU name
    ("llama_cpp_graphs", "built 2025-04-22 (build 2025-04-22), driver 550.54, on b200 nodes"),
])
def test_a_build_inside_its_era_loads(tmp_path: Path, runtime: str, version: str) -> None:
    data = _bad(entries__0__runtime=runtime, entries__0__version=version)
    a = load_entries(_write(tmp_path, data), runtimes=list_runtimes())[0]
    assert a.runtime == runtime


def test_a_graph_era_build_before_turing_graphs_loads_on_an_ampere_gpu(tmp_path: Path) -> None:
    data = _bad(entries__0__runtime="llama_cpp_graphs", entries__0__version="b9603",
                entries__0__hw="rtx3090")
    assert load_entries(_write(tmp_path, data), runtimes=list_runtimes())[0].hw == "rtx3090"


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    folder = _write(tmp_path, _bad(entries__0__runtime="turbo"))
    out = subprocess.run([sys.executable, "-m", "moesim.experiments.published", "predict",
                          "--data", str(folder), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: src.yaml entry a: field 'runtime'")
    assert "Traceback" not in out.stderr and not (tmp_path / "o").exists()


def test_calibration_sets_are_declared_small_and_of_their_runtime() -> None:
    entries = load_entries(runtimes=list_runtimes())
    by_id = {e.id: e for e in entries}
    for runtime, ids in CALIBRATION.items():
        assert ids and all(by_id[i].runtime == runtime for i in ids)
        mine = [e for e in entries if e.runtime == runtime]
        assert len(ids) <= len(mine) / 3, runtime  # at most a third of its entries
        for key in load_runtime(runtime).fit:
            assert key in RANGES


def test_blind_and_near_calibration_declarations_name_held_out_entries() -> None:
    """``BLIND_SOURCES`` names shipped sources none of whose entries calibrates a runtime;
    ``NEAR_CALIBRATION`` names held-out entries of a runtime with a calibration set."""
    from moesim.experiments.published.fit import BLIND_SOURCES, NEAR_CALIBRATION

    entries = load_entries(runtimes=list_runtimes())
    calibration = {i for ids in CALIBRATION.values() for i in ids}
    sources = {e.source.id for e in entries}
    assert set(BLIND_SOURCES) <= sources
    assert all(re.fullmatch(r"session \d+, \S.*", when) for when in BLIND_SOURCES.values())
    assert not any(e.id in calibration for e in entries if e.source.id in BLIND_SOURCES)
    by_id = {e.id: e for e in entries}
    for eid, why in NEAR_CALIBRATION.items():
        assert eid not in calibration and by_id[eid].runtime in CALIBRATION and why


def test_a_fit_never_sees_a_held_out_entry() -> None:
    entries = load_entries(runtimes=list_runtimes())
    seen: set[str] = set()

    def fake(entry, runtime):  # pretends time grows with the layer overhead
        seen.add(entry.id)
        return entry.value * (1 + runtime.value("overhead.layer_s"))

    res = fit_runtime(load_runtime("hqq_offload"), entries, fake)
    assert seen == set(CALIBRATION["hqq_offload"])
    assert res.values["overhead.layer_s"] == pytest.approx(RANGES["overhead.layer_s"][0],
                                                           rel=1e-6)


def test_a_structural_choice_is_fitted_on_the_calibration_set_only() -> None:
    """Declared alternatives (copy.swap for hqq_offload) are each fitted on the same
    calibration entries; the lowest loss is kept and every alternative is recorded."""
    entries = load_entries(runtimes=list_runtimes())
    seen: set[str] = set()

    def fake(entry, runtime):  # the copy-back makes every prediction 30 % slow
        seen.add(entry.id)
        slow = 1.3 if runtime.swap_always else 1.0
        return entry.value * slow * (1 + runtime.value("overhead.layer_s"))

    res = fit_runtime(load_runtime("hqq_offload"), entries, fake)
    assert seen == set(CALIBRATION["hqq_offload"])
    assert res.structure == {"copy.swap": "false"}
    assert [c for c, _, _ in res.alternatives] == [{"copy.swap": "false"},
                                                   {"copy.swap": "always"}]
    assert res.alternatives[0][2] == res.loss < res.alternatives[1][2]
    none = fit_runtime(load_runtime("hqq_offload"), entries, fake, structures={})
    assert none.structure == {} and none.alternatives == ()


def test_with_structure_refuses_an_undeclared_choice() -> None:
    from moesim.hw_profiles.runtime import structure_value, with_structure

    rt = load_runtime("hqq_offload")
    assert structure_value(with_structure(rt, {"copy.swap": "always"}), "copy.swap") == "always"
    off = with_structure(rt, {"copy.swap": "false"})
    assert not off.swap and not off.swap_always
    with pytest.raises(ValueError, match=r"copy\.swap must be one of false, true, always"):
        with_structure(rt, {"copy.swap": "sometimes"})
    with pytest.raises(KeyError):
        with_structure(rt, {"copy.stream": "own"})


def test_write_fitted_sets_the_structural_line(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from moesim.experiments.published import report
    from moesim.experiments.published.fit import FitResult
    from moesim.hw_profiles.runtime import runtime_path

    yaml = tmp_path / "hqq_offload.yaml"
    yaml.write_text(runtime_path("hqq_offload").read_text())
    monkeypatch.setattr(report, "runtime_path", lambda name: yaml)
    for choice in ("always", "false"):
        report.write_fitted(FitResult("hqq_offload", {"overhead.layer_s": 1e-3},
                                      CALIBRATION["hqq_offload"], 0.1, 1,
                                      {"copy.swap": choice}))
        rt = load_runtime(yaml)
        assert shipped_structure(rt) == {"copy.swap": choice}
        assert rt.value("overhead.layer_s") == pytest.approx(1e-3)


def test_committed_fit_is_what_the_runtime_profiles_ship() -> None:
    fits = json.loads(FIT_JSON.read_text())
    assert {f["runtime"] for f in fits} == set(CALIBRATION)
    for f in fits:
        rt = load_runtime(f["runtime"])
        assert tuple(f["calibration"]) == CALIBRATION[f["runtime"]]
        # the structure the YAML ships is the fitted one: the lowest loss of its alternatives
        assert shipped_structure(rt) == f.get("structure", {})
        if f["runtime"] in STRUCTURES:
            losses = [a["loss"] for a in f["alternatives"]]
            assert f["loss"] == min(losses) and len(losses) > 1
        for key, value in f["values"].items():
            q = rt.quantity(key)
            assert q.kind == "fitted" and q.value == pytest.approx(value, rel=1e-5), key
            assert all(i in q.source for i in f["calibration"])


def test_committed_predictions_are_consistent() -> None:
    pred = pd.read_csv(PREDICTIONS_CSV)
    entries = load_entries(runtimes=list_runtimes())
    assert list(pred["id"]) == [e.id for e in entries]
    ok = pred[pred["role"] != "not_predictable"]
    assert ((ok["ratio"] - ok["predicted"] / ok["measured"]).abs() < 1e-4 * ok["ratio"]).all()
    cal = {i for ids in CALIBRATION.values() for i in ids}
    assert set(pred.loc[pred["role"] == "calibration", "id"]) == cal
    assert pred.loc[pred["role"] == "not_predictable", "not_predictable"].str.len().min() > 0
    effects = effects_table(pred)
    assert set(effects["effect"]) == {"cache gain", "pre-load gain", "RTX 3060 / 3080 Mobile"}


@pytest.mark.parametrize("text, gen", [("PCIe Gen.3 (lane width not stated)", 3),
                                       ("PCIe 4.0 x16", 4), ("not stated", None),
                                       ("PCIe Gen.4", 4)])
def test_bus_generation(text: str, gen: int | None) -> None:
    assert bus_generation(text) == gen


@pytest.mark.shared
def test_refit_reproduces_the_shipped_values() -> None:
    from tests.traces.fixtures import require_shared

    require_shared("mixtral8x7b_speculative-moe")
    from moesim.experiments.published.report import Predictions, fit_all

    entries = load_entries(runtimes=list_runtimes())
    fits = {f["runtime"]: f for f in json.loads(FIT_JSON.read_text())}
    for res in fit_all(entries, Predictions(entries), only=["accelerate"]):
        for key, value in res.values.items():
            assert math.isclose(value, fits[res.runtime]["values"][key], rel_tol=1e-6)


def test_findings_depend_on_the_runtime_as_the_page_says() -> None:
    """The page: with the roofline the cache about doubles the speed and a perfect prediction
    saves under 10 % wherever it is issued; under hqq_offload the cache is worth far less, a
    perfect prediction before attention is worth about as much as the cache (at least 1.15x),
    and issued behind the demand fetches it saves (almost) nothing: the prediction point
    decides the gain."""
    from moesim.experiments.published.findings import CSV, gains

    df = pd.read_csv(CSV)
    g = gains(df)
    none, hqq = g.xs("none", level="runtime"), g.xs("hqq_offload", level="runtime")
    assert (none["cache_gain"] >= 2.0).all() and (none["perfect_gain"] < 1.10).all()
    assert (hqq["cache_gain"] < none["cache_gain"] - 0.4).all()
    assert (hqq["perfect_gain"] >= 1.15).all()
    assert ((hqq["perfect_gain"] / hqq["cache_gain"] - 1).abs() < 0.1).all()
    t = df[df["runtime"] == "hqq_offload"].pivot_table(
        index="hw", columns="variant", values="time_per_output_token_s")
    point = t["perfect, behind demand, d=0"] / t["perfect, pre-attention, d=1"]
    assert (point >= 1.15).all()
    behind = t["lru"] / t["perfect, behind demand, d=0"]
    assert (behind < 1.05).all()


@pytest.mark.shared
def test_prefill_entries_replay_recorded_prompts_only() -> None:
    """A prefill entry replays the trace's recorded prompts cut to its input length, as one
    step each, and is predicted from the prompt's time alone (prefill_tokens_per_s). A decode
    batch larger than the trace's requests is made of segments of its recorded decode tokens
    (batch_segments), and refused when even one-token segments are too few: never padded with
    invented routing."""
    from tests.traces.fixtures import require_shared

    require_shared("mixtral8x7b_speculative-moe")
    from dataclasses import replace

    from moesim.experiments.published.predict import (
        NotPredictable,
        predict_s_per_token,
        prepare,
        run_prepared,
    )
    from moesim.traces.trace import PREFILL

    entries = {e.id: e for e in load_entries(runtimes=list_runtimes())}
    e = entries["lcpp1017_a100_prefill"]
    p = prepare(e)
    assert p.replay == "prefill"
    assert all(len(r.phase) == e.input_tokens and (r.phase == PREFILL).all()
               for r in p.trace.requests)
    s = run_prepared(p, load_runtime("none"))
    assert s["prefill_tokens"] == e.input_tokens * len(p.trace.requests)
    assert s["steps"] == len(p.trace.requests) and s["output_tokens"] == 0
    assert s["hit_rate"] == 1.0  # cache: all -- every expert resident from the start
    assert predict_s_per_token(p, load_runtime("none")) == pytest.approx(
        s["prefill_time_s"] / s["prefill_tokens"])
    # the entry's llama.cpp build ran a prompt's experts one token at a time (runtime_options):
    # its prompt costs more than the same prompt with one kernel per expert
    assert e.runtime_options == {"compute.expert_calls": "per_token"}
    batched = prepare(replace(e, runtime_options={}))
    assert predict_s_per_token(p, load_runtime("none")) > predict_s_per_token(
        batched, load_runtime("none"))
    with pytest.raises(NotPredictable, match="recorded prompt of 100000 tokens"):
        prepare(replace(e, input_tokens=100000))
    wide = prepare(replace(entries["mo_t2_a100_2bit_full"], batch=64))
    assert len(wide.trace.requests) == 64
    assert len({r.num_tokens for r in wide.trace.requests}) == 1
    with pytest.raises(NotPredictable, match=r"batch 5000: trace mixtral_8x7b: \d+ decode tokens "
                                             r"cannot make 5000 sequences"):
        prepare(replace(entries["mo_t2_a100_2bit_full"], batch=5000))


def test_fit_json_keeps_other_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fit --write --only X`` replaces X's record and keeps every other runtime's."""
    from moesim.experiments.published import report
    from moesim.experiments.published.fit import FitResult

    path = tmp_path / "fit.json"
    path.write_text(json.dumps([{"runtime": "a", "values": {"k": 1.0}, "calibration": ["e1"],
                                 "loss": 0.5},
                                {"runtime": "b", "values": {"k": 2.0}, "calibration": ["e2"],
                                 "loss": 0.1}]))
    monkeypatch.setattr(report, "FIT_JSON", path)
    report.write_fit_json([FitResult("b", {"k": 3.0}, ("e3",), 0.2, 10)])
    got = {f["runtime"]: f for f in json.loads(path.read_text())}
    assert got["a"]["values"] == {"k": 1.0}
    assert got["b"] == {"runtime": "b", "values": {"k": 3.0}, "calibration": ["e3"],
                        "loss": 0.2}


def _routing_trace(decode_lengths: list[int], prefill: int = 1):
    """Requests whose token t at layer 0 routes expert 100 * request + t (prefill tokens -1)."""
    import numpy as np

    from moesim.traces.trace import DECODE, PREFILL, RequestRouting, Trace, TraceMeta

    meta = TraceMeta(model="x", moe_layers=(0,), num_experts=1000, top_k=1)
    reqs = []
    for r, n in enumerate(decode_lengths):
        ex = np.array([-1] * prefill + [100 * r + t for t in range(n)], np.int16)[:, None, None]
        phase = np.array([PREFILL] * prefill + [DECODE] * n, np.uint8)
        reqs.append(RequestRouting(r, ex, phase))
    return Trace(meta, reqs)


def test_batch_segments_cut_decode_tokens_round_robin() -> None:
    """Lengths 6 and 4, batch 4: the longest segment giving 4 is 2 tokens (3 + 2 segments; 3
    tokens give only 2 + 1), taken request 0, 1, 0, 1; prefill tokens never appear."""
    out = batch_segments(_routing_trace([6, 4]), 4)
    got = [r.experts[:, 0, 0].tolist() for r in out.requests]
    assert got == [[0, 1], [100, 101], [2, 3], [102, 103]]
    assert [r.request_id for r in out.requests] == [0, 1, 2, 3]
    assert all(r.phase.tolist() == [1, 1] for r in out.requests)
    # a batch the requests already fill keeps whole requests' decode tokens as one segment each
    whole = batch_segments(_routing_trace([5, 5]), 2)
    assert [r.experts[:, 0, 0].tolist() for r in whole.requests] == [
        [0, 1, 2, 3, 4], [100, 101, 102, 103, 104]]


def test_a_batch_keeps_every_sequence_for_the_whole_replay() -> None:
    """Batch 2 over requests of 80, 3, 90, 75 and 77 decode tokens (the replay needs MAX_TOKENS
    + WARMUP): the requests long enough, in order, as many as a batch-1 replay takes
    (MAX_REQUESTS), renumbered; a trace whose first requests are all long is kept; too few long
    requests for the batch: batch_segments."""
    from moesim.experiments.published.predict import MAX_REQUESTS
    from moesim.traces.trace import Trace

    n = MAX_TOKENS + WARMUP
    wide = _routing_trace([n + 8, 3, n + 18, n + 3, n + 5])
    first = Trace(wide.meta, wide.requests[:2])
    out = full_batch(first, 2, lambda: wide)
    assert [r.experts[1, 0, 0] for r in out.requests] == [0, 200, 300, 400][:MAX_REQUESTS]
    assert [r.request_id for r in out.requests] == list(range(len(out.requests)))
    filled = _routing_trace([n] * MAX_REQUESTS)
    assert full_batch(filled, 2, lambda: wide) is filled
    short = _routing_trace([n + 8, 3, 4])
    got = full_batch(short, 3, lambda: short)
    assert [len(r.phase) for r in got.requests] == [len(r.phase) for r in
                                                    batch_segments(short, 3).requests]


def test_batch_segments_refuse_too_few_tokens() -> None:
    with pytest.raises(ValueError, match="3 decode tokens cannot make 4 sequences"):
        batch_segments(_routing_trace([2, 1]), 4)


@pytest.mark.shared
def test_qwen36_entries_replay_its_full_top8_trace() -> None:
    """Qwen3.6-35B-A3B entries replay the model's own trace (MODEL_TRACES): every layer, the
    native top-8 of 256 experts (a top-k below the card's would be refused), its one recorded
    prompt of 36 tokens cut to a prefill entry's input length and refused beyond it; a
    ``--n-cpu-moe 18`` entry keeps the other 22 layers' experts on the GPU from the start
    (static_cpu with 18 layers and every other expert resident)."""
    from tests.traces.fixtures import require_shared

    require_shared("qwen36_qwen15_moe-ocs-learning")
    from dataclasses import replace

    from moesim.experiments.published.predict import MODEL_TRACES, NotPredictable, prepare
    from moesim.traces.trace import PREFILL

    assert MODEL_TRACES["qwen36_35b_a3b"] == "qwen36_35b_a3b"
    entries = {e.id: e for e in load_entries(runtimes=list_runtimes())}
    pre = prepare(entries["atsinfer_rtx3060_q36_ncmoe18_prefill"])
    meta = pre.trace.meta
    assert (meta.top_k, meta.num_experts) == (pre.card.top_k, pre.card.num_experts) == (8, 256)
    assert len(meta.moe_layers) == pre.card.num_moe_layers == 40
    assert pre.replay == "prefill"
    assert all(len(r.phase) == 20 and (r.phase == PREFILL).all() for r in pre.trace.requests)
    prepare(replace(pre.entry, input_tokens=36))
    with pytest.raises(NotPredictable, match="recorded prompt of 37 tokens"):
        prepare(replace(pre.entry, input_tokens=37))
    dec = prepare(entries["atsinfer_rtx3060_q36_ncmoe18_decode"])
    assert dec.placement == {"name": "static_cpu", "layers": 18}
    # the other 22 layers' experts resident from the start (cold fetches are not llama.cpp's)
    assert (dec.capacity, dec.partition, dec.warmup) == (40 * 256, "global", WARMUP)


def test_deepspeed_entries_follow_zero3_structure() -> None:
    """DeepSpeed ZeRO-Inference entries (hw_profiles/runtimes/deepspeed.yaml, read from
    DeepSpeed v0.14.3): no decoder layer resident (layer_offload, gpu_layers 0), nothing
    prefetched, no expert cache; routed experts only, one copy per tensor, pageable memory."""
    from moesim.experiments.published.predict import gpu_layers_of

    ds = [e for e in load_entries(runtimes=list_runtimes()) if e.runtime == "deepspeed"]
    assert len(ds) == 15
    for e in ds:
        assert (e.placement, e.prefetch, e.cache) == ("layer_offload", "none", {"none": True})
        assert gpu_layers_of(e) == 0
    rt = load_runtime("deepspeed")
    assert rt.host_memory == "pageable" and not rt.whole_layer and not rt.swap
    assert int(rt.tensors_per_expert.value) == 3 and set(rt.fit) == {"copy.per_copy_s",
                                                                      "copy.efficiency"}


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_deepspeed_layer_cost_closed_form(engine: str) -> None:
    """A token under the shipped deepspeed runtime with every layer offloaded: per layer its
    attention, shared-expert and each routed expert's weights copied (3 tensor copies each:
    3 x per_copy_s + 3 x the link's time for a third of the bytes / efficiency), each followed
    by its kernels, in series."""
    from types import SimpleNamespace

    from moesim.hw_profiles.runtime import apply_runtime
    from moesim.sim import FixedCompute, FixedLink, HostSide, simulate
    from tests.helpers import trace_from_lists

    base = FixedLink(1e-5, 1e6, 1)
    comp = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4)
    card = SimpleNamespace(num_experts=4, top_k=2, expert_bytes=1200, shared_bytes_per_layer=0,
                           num_layers=2)
    rt = load_runtime("deepspeed")
    link, compute = apply_runtime(rt, base, comp, card, lambda: base)
    host = HostSide(activation_bytes=64, dtype_bits=16, attention_bytes=600, shared_bytes=300)
    res = simulate(trace_from_lists([[[[0, 1], [2, 3]]] * 3], experts=4, expert_bytes=1200),
                   "lru", capacity=8, link=link, compute=compute, host=host,
                   placement={"name": "layer_offload", "gpu_layers": 0}, prefill="random",
                   engine=engine)
    pc, eff = rt.value("copy.per_copy_s"), rt.value("copy.efficiency")

    def copy(n: int) -> float:
        return 3 * pc + 3 * (1e-5 + (n // 3) / 1e6) / eff

    layer = (copy(600) + 1e-3 + 1e-4) + (copy(300) + 1e-4) + 2 * (copy(1200) + 3e-4)
    assert res.summary["total_time_s"] == pytest.approx(3 * 2 * layer, rel=1e-9)
    assert res.summary["demand_fetches"] == 12 and res.summary["prefetch_transfers"] == 0


def test_vllm_entries_copy_whole_offloaded_layers() -> None:
    """vLLM --cpu-offload-gb entries (hw_profiles/runtimes/vllm.yaml, read from vLLM's V0
    maybe_offload_to_cpu): layer_offload with a stated number of resident layers, the whole
    layer copied (fused experts: copy.whole_layer) from pinned memory on the compute stream."""
    from moesim.experiments.published.predict import gpu_layers_of

    vl = [e for e in load_entries(runtimes=list_runtimes()) if e.runtime == "vllm"]
    assert len(vl) == 6
    for e in vl:
        assert e.placement == "layer_offload" and e.prefetch == "none"
        assert gpu_layers_of(e) == {"mixtral_8x7b": 6, "deepseek_v2_lite": 17}[e.model]
    rt = load_runtime("vllm")
    assert rt.whole_layer and rt.host_memory == "pinned" and rt.stream == "compute"


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_vllm_layer_cost_closed_form_at_batch_1(engine: str) -> None:
    """At batch 1 an offloaded layer under the shipped vllm runtime copies its attention and
    its whole MoE block (top_k routed experts x num_experts / top_k = every expert's bytes)
    before their kernels; the step's fixed cost is spread over the layers."""
    from types import SimpleNamespace

    from moesim.hw_profiles.runtime import apply_runtime
    from moesim.sim import FixedCompute, FixedLink, HostSide, simulate
    from tests.helpers import trace_from_lists

    base = FixedLink(1e-5, 1e6, 1)
    comp = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=0.0)
    card = SimpleNamespace(num_experts=4, top_k=2, expert_bytes=1200, shared_bytes_per_layer=0,
                           num_layers=2)
    rt = load_runtime("vllm")
    link, compute = apply_runtime(rt, base, comp, card)
    host = HostSide(activation_bytes=64, dtype_bits=16, attention_bytes=600)
    res = simulate(trace_from_lists([[[[0, 1], [2, 3]]] * 3], experts=4, expert_bytes=1200),
                   "lru", capacity=8, link=link, compute=compute, host=host,
                   placement={"name": "layer_offload", "gpu_layers": 0}, prefill="random",
                   engine=engine)
    pc, eff, step = (rt.value("copy.per_copy_s"), rt.value("copy.efficiency"),
                     rt.value("overhead.step_s"))

    def copy(n: int) -> float:  # 2 copies (1 tensor x the 4 / 2 whole-layer factor)
        return 2 * pc + 2 * (1e-5 + (n // 2) / 1e6) / eff

    layer = (copy(600) + 1e-3 + step / 2 + 1e-4) + 2 * (copy(2 * 1200) + 3e-4)
    assert res.summary["total_time_s"] == pytest.approx(3 * 2 * layer, rel=1e-9)


def _top_k_trace(rows: list[list[list[int]]], num_experts: int = 8):
    """One request of decode tokens: ``rows[t][layer]`` its recorded experts (-1: none)."""
    import numpy as np

    from moesim.traces.trace import DECODE, RequestRouting, Trace, TraceMeta

    ex = np.array(rows, np.int16)
    meta = TraceMeta(model="x", moe_layers=tuple(range(ex.shape[1])), num_experts=num_experts,
                     top_k=ex.shape[2])
    return Trace(meta, [RequestRouting(0, ex, np.full(ex.shape[0], DECODE, np.uint8))])


def test_complete_routing_keeps_the_recorded_experts_and_draws_the_rest() -> None:
    """Completed routing: the recorded experts first, the rest distinct and drawn by the seed;
    an unrecorded layer drawn whole; half-recorded rows and a smaller k refused."""
    import numpy as np

    from moesim.experiments.published.predict import complete_routing

    trace = _top_k_trace([[[1, 2], [-1, -1]], [[7, 0], [3, 4]]] * 20)
    out = complete_routing(trace, 4, seed=0)
    ex = out.requests[0].experts
    assert out.meta.top_k == 4 and ex.shape == (40, 2, 4)
    assert (ex[:, :, :2][trace.requests[0].experts >= 0]
            == trace.requests[0].experts[trace.requests[0].experts >= 0]).all()
    assert all(len(set(row.tolist())) == 4 and row.min() >= 0 and row.max() < 8
               for row in ex.reshape(-1, 4))
    assert np.array_equal(ex, complete_routing(trace, 4, seed=0).requests[0].experts)
    assert not np.array_equal(ex, complete_routing(trace, 4, seed=1).requests[0].experts)
    with pytest.raises(ValueError, match="neither 2 distinct recorded experts nor none"):
        complete_routing(_top_k_trace([[[1, -1]]]), 4, seed=0)
    with pytest.raises(ValueError, match="cannot complete top-2 routing to top-1"):
        complete_routing(trace, 1, seed=0)


@pytest.mark.shared
def test_routing_independent_entries_predict_the_same_on_any_routing() -> None:
    """What lets a model whose trace records fewer than its native top-k experts be predicted:
    for a batch-1 decode entry with every expert in a fixed place (all on the GPU; whole
    layers' experts on the CPU, all of them or a static --n-cpu-moe split; whole layers on the
    CPU), the prediction on the model's real trace equals the prediction on that trace cut to
    fewer experts and completed at random (``complete_routing``); an entry with an evicting
    cache differs (the check can fail), and its cut trace is refused; a dynamic policy beside
    the CPU layers is not routing-independent."""
    from tests.traces.fixtures import require_shared

    require_shared("qwen36_qwen15_moe-ocs-learning")
    require_shared("mixtral8x7b_speculative-moe")
    from dataclasses import replace

    from moesim.experiments.published.predict import (
        NotPredictable,
        complete_routing,
        predict_s_per_token,
        prepare,
        routing_independent,
    )
    from moesim.traces.trace import RequestRouting, Trace

    def cut_and_completed(p, keep: int):
        t, k = p.trace, p.card.top_k
        cut = Trace(replace(t.meta, top_k=keep),
                    [RequestRouting(r.request_id, r.experts[:, :, :keep].copy(), r.phase)
                     for r in t.requests])
        return replace(p, trace=complete_routing(cut, k, seed=3))

    entries = {e.id: e for e in load_entries(runtimes=list_runtimes())}
    for eid, keep in (("club3090_rtx3090_q36_cerebellum_decode_code", 6),  # whole on the GPU
                      ("atsinfer_rtx3060_q36_ncmoe18_decode", 6),  # --n-cpu-moe 18 (a budget)
                      ("homelab_rtx5000_q36_ncmoe24_tg128", 6),
                      ("insiderllm_rushuna_rtx3060_q36_ncmoe40_tg128", 6),  # every layer's
                      ("mi_lat_ollama_mixtral", 1)):  # whole layers on the CPU (cpu_layers)
        e = entries[eid]
        assert routing_independent(e), eid
        p = prepare(e)
        rt = load_runtime(e.runtime)
        assert predict_s_per_token(cut_and_completed(p, keep), rt) == pytest.approx(
            predict_s_per_token(p, rt), rel=1e-12), eid
    # an evicting cache of 64 experts per layer on Qwen3.6
    e = replace(entries["club3090_rtx3090_q36_cerebellum_decode_code"], cache={"per_layer": 64},
                policy="lru")
    assert not routing_independent(e)
    p = prepare(e)
    rt = load_runtime(e.runtime)
    assert predict_s_per_token(cut_and_completed(p, 6), rt) != pytest.approx(
        predict_s_per_token(p, rt), rel=1e-3)
    with pytest.raises(NotPredictable, match="time depends on the routing"):
        prepare(replace(e, model="gpt_oss_120b"))
    # a GPU share cached by a dynamic policy beside the CPU layers (HybriMoE) starts empty
    dyn = replace(entries["atsinfer_rtx3060_q36_ncmoe18_decode"], policy="lru")
    assert not routing_independent(dyn)
    assert prepare(dyn).placement == {"name": "static_cpu", "layers": None}


def test_the_table_marks_entries_replayed_on_a_completed_trace() -> None:
    from moesim.experiments.published.docs import render_table

    row = {"source": "s", "hw": "rtx4090", "runtime": "llama_cpp_graphs",
           "runtime_options": math.nan, "metric": "tokens_per_s", "measured": 100.0,
           "predicted": 90.0, "ratio": 0.9, "role": "held_out"}
    pred = pd.DataFrame([{**row, "id": "a", "routing": "qwen36_35b_a3b"},
                         {**row, "id": "b", "routing": "x_bmoe, completed to top-8 (...)"}])
    text = render_table(pred)
    assert "| `b` (c) |" in text and "| `a` |" in text and "Entries marked (c)" in text
    assert "Entries marked (c)" not in render_table(pred.iloc[:1])
