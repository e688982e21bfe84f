"""Runtime profiles: parsing, the closed-form cost of each mechanism, identity of ``none``, and
both engines equal under a runtime (they read every duration from the same wrappers)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.hw_profiles import ProfileError
from moesim.hw_profiles.runtime import (
    RuntimeCompute,
    RuntimeLink,
    RuntimeProfile,
    apply_runtime,
    list_runtimes,
    load_runtime,
    runtime_from_mapping,
    with_values,
)
from moesim.sim import SimulationError, simulate
from moesim.sim.hardware import FixedCompute, FixedLink
from moesim.traces.model_card import ModelCardError, load_card
from tests.helpers import random_trace


def _q(v: float, unit: str | None = None) -> dict:
    out = {"value": v, "kind": "estimate", "source": "test"}
    if unit:
        out["unit"] = unit
    return out


def test_every_shipped_runtime_loads_and_none_adds_nothing() -> None:
    names = list_runtimes()
    assert {"none", "hqq_offload", "accelerate", "moe_infinity"} <= set(names)
    for name in names:
        rt = load_runtime(name)
        assert rt.name == name
    none = load_runtime("none")
    assert none.is_none
    link, comp = FixedLink(bandwidth_Bps=1e9), FixedCompute(expert_s=1e-3)
    assert apply_runtime(none, link, comp, load_card("mixtral_8x7b")) == (link, comp)
    assert not load_runtime("hqq_offload").is_none


@pytest.mark.parametrize("data, field", [
    ({"name": "x", "copy": {"stream": "side"}}, "copy.stream"),
    ({"name": "x", "copy": {"host_memory": "mmap"}}, "copy.host_memory"),
    ({"name": "x", "copy": {"staging_buffers": -1}}, "copy.staging_buffers"),
    ({"name": "x", "copy": {"swap": "yes"}}, "copy.swap"),
    ({"name": "x", "copy": {"host_s": _q(-2, "us")}}, "copy.host_s"),
    ({"name": "x", "copy": {"host_s": 3}}, "copy.host_s"),
    ({"name": "x", "copy": {"stream": "compute", "order": "lifo"}}, "copy.order"),
    ({"name": "x", "copy": {"order": "fifo", "staging_buffers": 4}}, "copy.order"),
    ({"name": "x", "copy": {"stream": "compute", "order": "fifo"}}, "copy.order"),
    ({"name": "x", "copy": {"stream": "compute", "order": "fifo", "window": _q(0)}},
     "copy.window"),
    ({"name": "x", "copy": {"stream": "compute", "order": "fifo", "window": _q(1.5)}},
     "copy.window"),
    ({"name": "x", "copy": {"stream": "compute", "window": _q(2)}}, "copy.window"),
    ({"name": "x", "copy": {"stream": "compute", "sync": "expert"}}, "copy.sync"),
    ({"name": "x", "copy": {"stream": "compute", "order": "fifo", "staging_buffers": 2,
                            "sync": "layer"}}, "copy.sync"),
    ({"name": "x", "copy": {"stream": "compute", "order": "fifo", "staging_buffers": 2,
                            "prefetch_stream": "copy"}}, "copy.prefetch_stream"),
    ({"name": "x", "copy": {"stream": "compute", "prefetch_stream": "own"}},
     "copy.prefetch_stream"),
    ({"name": "x", "copy": {"prefetch_stream": "own"}}, "copy.prefetch_stream"),
    ({"name": "x", "overhead": {"layer_s": _q(-1)}}, "overhead.layer_s"),
    ({"name": "x", "overhead": {"launch_s": _q(1)}}, "overhead"),
    ({"name": "x", "prefetch": {"recall": _q(1.5)}}, "prefetch.recall"),
    ({"name": "x", "fit": ["overhead.nope"]}, "fit"),
    ({"name": "x", "compute": {"expert_calls": "per_row"}}, "compute.expert_calls"),
    ({"name": "x", "compute": {"launches": 2}}, "compute"),
    ({"copy": {}}, "name"),
    ({"name": "x", "bogus": 1}, "<top level>"),
    # CPU kernels shared with another runtime (``same_as``)
    ({"name": "x", "cpu_kernels": {"same_as": "nope"}}, "cpu_kernels.same_as"),
    ({"name": "x", "cpu_kernels": {"same_as": "x"}}, "cpu_kernels.same_as"),
    ({"name": "x", "cpu_kernels": {"same_as": "hqq_offload"}}, "cpu_kernels.same_as"),
    ({"name": "x", "cpu_kernels": {"same_as": "llama_cpp", "int4": _q(1)}}, "cpu_kernels"),
    ({"name": "x", "cpu_kernels": {"same_as": "llama_cpp"}, "fit": ["cpu_kernels.int4"]},
     "cpu_kernels.same_as"),
])
def test_bad_runtime_is_one_error_naming_the_field(data: dict, field: str) -> None:
    with pytest.raises(ProfileError) as err:
        runtime_from_mapping(data, "rt.yaml", allow_bare=False)
    msg = str(err.value)
    assert msg.startswith("rt.yaml: field ") and field in msg and "\n" not in msg


def test_shared_cpu_kernels_are_the_other_runtimes() -> None:
    """llama.cpp's build eras run the same ggml CPU kernels: the graph era's profile takes
    llama_cpp's factors (``cpu_kernels: {same_as: llama_cpp}``) under its own name."""
    own = load_runtime("llama_cpp").cpu_kernels
    shared = load_runtime("llama_cpp_graphs").cpu_kernels
    assert own is not None and shared is not None
    assert shared.rates == own.rates and shared.needs == own.needs == "avx2"
    assert shared.runtime == "llama_cpp_graphs"


def test_unknown_runtime_names_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown runtime 'nope'; shipped: .*hqq_offload"):
        load_runtime("nope")


def test_compute_overheads_closed_form() -> None:
    base = FixedCompute(attention_s=1e-4, router_s=2e-5, expert_s=3e-4, shared_s=5e-5,
                        dense_s=7e-4)
    comp = RuntimeCompute(base, layers=4, step_s=8e-3, layer_s=1e-3, expert_s=2e-4,
                          expert_dequant_s=5e-5, shared_dequant_s=1e-5)
    assert comp.attention_time(1, 10) == pytest.approx(1e-4 + 1e-3 + 8e-3 / 4)
    assert comp.dense_layer_time(1, 10) == pytest.approx(7e-4 + 1e-3 + 8e-3 / 4)
    assert comp.router_time(1) == 2e-5
    assert comp.expert_time(3) == pytest.approx(3e-4 + 2e-4 + 5e-5)
    assert comp.shared_time(3) == pytest.approx(5e-5 + 2e-4 + 1e-5)
    assert comp.expert_time(0) == 0.0
    assert comp.attention_time(0, 10) == base.attention_time(0, 10)  # nothing added


@given(nbytes=st.integers(1, 10**9), tensors=st.integers(1, 8),
       per_copy=st.floats(0, 1e-3), eff=st.floats(0.05, 1.0), swap=st.booleans(),
       factor=st.sampled_from([1.0, 4.0]))
@settings(max_examples=200, deadline=None)
def test_link_closed_form(nbytes: int, tensors: int, per_copy: float, eff: float, swap: bool,
                          factor: float) -> None:
    base = FixedLink(latency_s=2e-6, bandwidth_Bps=10e9)
    link = RuntimeLink(base, tensors, per_copy, eff, swap, factor, "compute")
    n = int(nbytes * factor)
    per = max(1, n // tensors)
    wire = tensors * (2e-6 + per / 10e9) / eff
    want = tensors * per_copy + wire  # a swap is an event of the link, not part of a copy
    assert link.transfer_time(nbytes) == pytest.approx(want, rel=1e-12)
    assert link.swap_time(nbytes) == (pytest.approx(want, rel=1e-12) if swap else 0.0)
    assert link.transfer_time(0) == 0.0
    assert link.copy_engines == 1
    assert link.compute_stream


def test_swap_always_is_read_and_applied() -> None:
    card = load_card("mixtral_8x7b")
    rt = runtime_from_mapping({"name": "t", "copy": {"stream": "compute", "swap": "always"}},
                              "t")
    assert rt.swap and rt.swap_always and "swap always" in rt.describe()
    link, _ = apply_runtime(rt, FixedLink(bandwidth_Bps=25e9), FixedCompute(), card)
    assert link.swap and link.swap_always
    with pytest.raises(ProfileError, match=r"copy\.swap.*true, false or always"):
        runtime_from_mapping({"name": "t", "copy": {"swap": "sometimes"}}, "t")


def test_host_s_is_read_and_applied() -> None:
    """``copy.host_s``: the compute thread's work per demand copy, on the link model (the
    engines read it through ``sim.link.copy_rules``), not in the copy's duration."""
    card = load_card("mixtral_8x7b")
    rt = runtime_from_mapping({"name": "t", "copy": {"host_s": _q(7.2, "us")}}, "t")
    assert rt.value("copy.host_s") == pytest.approx(7.2e-6) and not rt.is_none
    assert rt.quantity("copy.host_s").source == "test" and "issue 7.2 us" in rt.describe()
    base = FixedLink(bandwidth_Bps=25e9)
    link, _ = apply_runtime(rt, base, FixedCompute(), card)
    assert link.host_s == pytest.approx(7.2e-6)
    assert link.transfer_time(card.expert_bytes) == base.transfer_time(card.expert_bytes)
    assert with_values(rt, {"copy.host_s": 1e-5}, "fit").quantity("copy.host_s").kind == "fitted"


def test_fifo_order_and_its_window() -> None:
    """``copy.order: fifo``: the window is ``copy.window`` when given, else staging buffers
    - 1 (mixtral-offloading's ``load_experts``); the default ``ready`` has none, and the
    engines read it through the link model only on the compute stream."""
    card = load_card("mixtral_8x7b")
    fifo = {"stream": "compute", "order": "fifo"}
    rt = runtime_from_mapping({"name": "t", "copy": {**fifo, "staging_buffers": 4}}, "t")
    assert rt.order == "fifo" and rt.fifo_window == 3 and "fifo window 3" in rt.describe()
    given = runtime_from_mapping({"name": "t", "copy": {**fifo, "window": _q(2)}}, "t")
    assert given.fifo_window == 2 and given.window.source == "test"
    plain = runtime_from_mapping({"name": "t", "copy": {"stream": "compute",
                                                        "staging_buffers": 4}}, "t")
    assert plain.order == "ready" and plain.fifo_window == 0
    link, _ = apply_runtime(rt, FixedLink(bandwidth_Bps=25e9), FixedCompute(), card)
    assert link.window == 3
    from moesim.sim.link import copy_rules

    assert copy_rules(link, 10).window == 3 and copy_rules(link, 10).fifo
    assert not copy_rules(link, 10).sync
    synced = runtime_from_mapping({"name": "t", "copy": {**fifo, "staging_buffers": 2,
                                                         "sync": "expert"}}, "t")
    link, _ = apply_runtime(synced, FixedLink(bandwidth_Bps=25e9), FixedCompute(), card)
    assert copy_rules(link, 10).sync and "host syncs per expert" in synced.describe()
    hqq = load_runtime("hqq_offload")
    assert hqq.order == "fifo" and hqq.fifo_window == hqq.staging_buffers - 1 == 3
    assert hqq.window.kind == "measured" and "load_experts" in hqq.window.source
    assert synced.prefetch_stream == "compute" and not copy_rules(link, 10).own_prefetch


def test_prefetch_stream_own_reaches_the_copy_rules() -> None:
    """``copy.prefetch_stream: own`` (fifo only) is parsed, described, and reaches
    ``CopyRules.own_prefetch``; hqq_offload sets it (an assumption: its pre-loader is not
    public)."""
    from moesim.sim.link import copy_rules

    card = load_card("mixtral_8x7b")
    rt = runtime_from_mapping({"name": "t", "copy": {"stream": "compute", "order": "fifo",
                                                     "staging_buffers": 2,
                                                     "prefetch_stream": "own"}}, "t")
    assert rt.prefetch_stream == "own" and "own stream" in rt.describe()
    link, _ = apply_runtime(rt, FixedLink(bandwidth_Bps=25e9), FixedCompute(), card)
    rules = copy_rules(link, 10)
    assert rules.own_prefetch and rules.compute_stream and not rules.link_clock
    hqq = load_runtime("hqq_offload")
    assert hqq.prefetch_stream == "own"


@given(tokens=st.integers(0, 64), expert_s=st.floats(0, 1e-3), deq=st.floats(0, 1e-3))
@settings(max_examples=100, deadline=None)
def test_per_token_expert_calls_closed_form(tokens: int, expert_s: float, deq: float) -> None:
    """``compute.expert_calls: per_token``: an expert with n tokens costs n one-token calls
    (kernel, host part and dequantisation each time); ``batched`` one call over all n."""
    base = FixedCompute(expert_s=3e-4, shared_s=5e-5)
    kw = dict(layers=4, expert_s=expert_s, expert_dequant_s=deq)
    per, once = RuntimeCompute(base, per_token=True, **kw), RuntimeCompute(base, **kw)
    assert per.expert_time(tokens) == pytest.approx(tokens * once.expert_time(1), abs=0.0)
    assert per.expert_host(tokens) == pytest.approx(tokens * expert_s)
    assert per.expert_time(1) == once.expert_time(1)  # a decode step is unchanged
    assert per.shared_time(tokens) == once.shared_time(tokens)  # shared experts: batched


def test_expert_calls_is_read_and_is_a_structural_choice() -> None:
    from moesim.hw_profiles.runtime import structure_value, with_structure

    rt = runtime_from_mapping({"name": "t", "compute": {"expert_calls": "per_token"}}, "t")
    assert rt.expert_calls == "per_token" and not rt.is_none
    assert "one expert kernel per token" in rt.describe()
    _link, comp = apply_runtime(rt, None, FixedCompute(expert_s=1e-4), load_card("mixtral_8x7b"))
    assert comp.expert_time(5) == pytest.approx(5e-4)
    none = load_runtime("none")
    assert structure_value(none, "compute.expert_calls") == "batched"
    back = with_structure(rt, {"compute.expert_calls": "batched"})
    assert back.expert_calls == "batched" and back.is_none


def test_compute_host_parts() -> None:
    """The host parts (the GPU stream idle) are the runtime's overheads; the rest is kernel
    time (dequantisation included)."""
    base = FixedCompute(attention_s=1e-4, router_s=2e-5, expert_s=3e-4, shared_s=5e-5,
                        dense_s=7e-4)
    comp = RuntimeCompute(base, layers=4, step_s=8e-3, layer_s=1e-3, expert_s=2e-4,
                          expert_dequant_s=5e-5, shared_dequant_s=1e-5)
    assert comp.attention_host(1) == pytest.approx(1e-3 + 8e-3 / 4)
    assert comp.dense_layer_host(1) == pytest.approx(1e-3 + 8e-3 / 4)
    assert comp.expert_host(3) == 2e-4 and comp.shared_host(3) == 2e-4
    assert comp.expert_host(0) == 0.0 and comp.attention_host(0) == 0.0
    no_shared = RuntimeCompute(FixedCompute(shared_s=0.0), layers=1, expert_s=2e-4)
    assert no_shared.shared_host(1) == 0.0


def test_apply_runtime_reads_every_mechanism() -> None:
    card = load_card("mixtral_8x7b").with_weights(experts_bits=2.6)
    rt = runtime_from_mapping({
        "name": "t", "copy": {"host_memory": "pageable", "stream": "compute", "swap": True,
                              "tensors_per_expert": _q(3), "per_copy_s": _q(10, "us"),
                              "whole_layer": True, "staging_buffers": 2},
        "overhead": {"layer_s": _q(100, "us")}, "dequant": {"Bps": _q(100, "GB/s")},
    }, "t")
    pinned, pageable = FixedLink(bandwidth_Bps=25e9), FixedLink(bandwidth_Bps=10e9)
    link, comp = apply_runtime(rt, pinned, FixedCompute(expert_s=1e-4), card, lambda: pageable)
    assert link.base is pageable and link.swap and link.compute_stream
    assert link.bytes_factor == card.num_experts / card.top_k
    assert link.tensors == 3 * 4  # every tensor of the whole block
    assert comp.expert_time(1) == pytest.approx(1e-4 + card.expert_bytes / 100e9)
    with pytest.raises(ProfileError, match="pageable"):
        apply_runtime(rt, pinned, FixedCompute(), card, None)
    assert rt.staging_buffers == 2


def test_with_values_marks_fitted_and_refuses_negative() -> None:
    rt = with_values(load_runtime("none"), {"overhead.layer_s": 1e-3}, "fit on a, b")
    assert rt.layer_s.kind == "fitted" and rt.value("overhead.layer_s") == 1e-3
    assert not rt.is_none
    with pytest.raises(ValueError):
        with_values(rt, {"overhead.layer_s": -1.0}, "x")


def _run(engine: str, runtime: RuntimeProfile, **kw) -> dict:
    tr = random_trace(num_requests=2, tokens=12, layers=4, experts=8, top_k=2, seed=5,
                      expert_bytes=4_000_000)
    card = load_card("mixtral_8x7b")  # only its expert/top-k counts are read by the wrappers
    link, comp = apply_runtime(runtime, FixedLink(latency_s=5e-6, bandwidth_Bps=12e9),
                               FixedCompute(attention_s=2e-4, expert_s=1e-4), card,
                               lambda: FixedLink(bandwidth_Bps=5e9))
    res = simulate(tr, kw.pop("policy", "lru"), capacity=kw.pop("capacity", 12), link=link,
                   compute=comp, engine=engine, staging=runtime.staging_buffers, **kw)
    return res.summary


@pytest.mark.parametrize("policy", ["lru", {"name": "oracle_prefetch", "point": "routed"},
                                    {"name": "speculative_prefetch", "recall": 0.5}])
@pytest.mark.parametrize("calls", ["batched", "per_token"])
def test_both_engines_equal_under_a_runtime(policy, calls: str) -> None:
    rt = runtime_from_mapping({
        "name": "t", "copy": {"stream": "compute", "swap": True, "tensors_per_expert": _q(3),
                              "per_copy_s": _q(10, "us"), "staging_buffers": 1},
        "overhead": {"layer_s": _q(300, "us"), "expert_s": _q(50, "us"), "step_s": _q(1, "ms")},
        "compute": {"expert_calls": calls},
    }, "t")
    # per_token: batched steps (several tokens per expert), a cache that fits their width
    kw = {"batch": 3, "capacity": 24} if calls == "per_token" else {"capacity": 8}
    a = _run("python", rt, policy=policy, partition="per_layer", **kw)
    b = _run("compiled", rt, policy=policy, partition="per_layer", **kw)
    if calls == "per_token":  # the mechanism is exercised: slower than one call per expert
        from moesim.hw_profiles.runtime import with_structure

        batched = with_structure(rt, {"compute.expert_calls": "batched"})
        assert a["total_time_s"] > _run("python", batched, policy=policy,
                                        partition="per_layer", **kw)["total_time_s"]
    assert b["sim_engine"] == "compiled"
    for key, value in a.items():
        if key == "sim_engine":
            continue
        assert b[key] == value or (value != value and b[key] != b[key]), key


def test_runtime_slows_a_run_by_its_overheads() -> None:
    none = load_runtime("none")
    slow = with_values(none, {"overhead.layer_s": 1e-3}, "test")
    a, b = _run("python", none), _run("python", slow)
    # every layer of every step pays 1 ms more on the GPU's critical path (nothing overlaps it
    # except copies, which only shrink the stall): at least the added compute, at most that
    # plus the run without it
    steps = a["steps"]
    assert b["total_time_s"] >= a["total_time_s"]
    busy_a, busy_b = (x["total_time_s"] - x["stall_time_s"] for x in (a, b))
    assert busy_b - busy_a == pytest.approx(4 * 1e-3 * steps, rel=1e-9)
    assert b["stall_time_s"] <= a["stall_time_s"]  # copies hide behind the longer layers


def test_staging_buffers_run_caches_below_a_layer() -> None:
    none = load_runtime("none")
    with pytest.raises(SimulationError, match="cache too small"):
        _run("python", none, partition="per_layer", capacity=4)  # 1 slot per layer, top-2
    staged = runtime_from_mapping({"name": "s", "copy": {"staging_buffers": 2}}, "s")
    out = _run("python", staged, partition="per_layer", capacity=4)
    assert out["hit_rate"] < 1 and math.isfinite(out["time_per_output_token_s"])
    # buffers beyond the need add nothing: a cache that already fits runs as without them
    assert _run("python", staged, capacity=12) == _run("python", none, capacity=12) | {
        "sim_engine": _run("python", staged, capacity=12)["sim_engine"]}


def test_bits_per_weight_per_component() -> None:
    card = load_card("mixtral_8x7b")
    q = card.with_weights(experts_bits=2.6, attention_bits=4.25)
    assert q.expert_bytes == int(card.expert_params * 2.6 / 8)
    assert q.attention_weight_bytes == 4.25 / 8 and q.dtype_bytes == card.dtype_bytes
    assert card.with_weights() is card
    for bad in (0, -1, 33):
        with pytest.raises(ModelCardError, match="experts_bits"):
            card.with_weights(experts_bits=bad)
