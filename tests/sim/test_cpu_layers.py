"""Placement ``cpu_layers`` (llama.cpp's ``-ngl``): the last layers whole on the host CPU.
Golden numbers on a tiny fixture, invariants over random traces, both engines, bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies.base import PolicyError
from moesim.sim import FixedCompute, FixedHostCpu, FixedLink, HostSide, simulate
from moesim.sim.cache import SimulationError
from tests.helpers import random_trace, trace_from_lists
from tests.sim.parts import check_parts

LINK = FixedLink(1e-5, 1e6, 1)  # 1 ms per 1000-byte expert; 64 B of hidden state: 74 us
COMPUTE = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4)
ACT = 64  # bytes of one token's hidden state


def _host(parallel: int = 1, **kw) -> HostSide:
    cpu = FixedHostCpu(call_s=2e-4, per_token_s=5e-5, parallel=parallel,
                       **{"attention_s": 2e-3, "shared_s": 3e-4, "dense_s": 4e-3, **kw})
    return HostSide(cpu, activation_bytes=ACT, dtype_bits=16)


def _tiny(tokens: int = 3):
    """2 MoE layers, 4 experts, top-2: layer 0 routes experts 0, 1 and layer 1 experts 2, 3
    at every token."""
    return trace_from_lists([[[[0, 1], [2, 3]]] * tokens], experts=4)


@pytest.mark.parametrize("engine", ["python", "compiled"])
@pytest.mark.parametrize(("parallel", "experts_s"), [(1, 2 * 2.5e-4), (2, 2.5e-4)])
def test_golden_two_layers_one_on_the_gpu(engine, parallel, experts_s) -> None:
    """gpu_layers=1 of 2: a token is the GPU layer (attention + router + shared + its two
    resident experts) + the hidden state's copy host-ward + the CPU layer's attention + its
    shared experts + its two routed experts on the host (one after the other on one lane,
    side by side on two)."""
    res = simulate(_tiny(), "lru", capacity=4, link=LINK, compute=COMPUTE,
                   host=_host(parallel), placement={"name": "cpu_layers", "gpu_layers": 1},
                   prefill="random", engine=engine)
    s = res.summary
    gpu = 1e-3 + 1e-4 + 1e-4 + 2 * 3e-4
    d2h = 1e-5 + ACT / 1e6
    cpu = 2e-3 + 3e-4 + experts_s  # call_s + 1 token x per_token_s per expert
    assert s["total_time_s"] == pytest.approx(3 * (gpu + d2h + cpu), rel=1e-12)
    assert s["sim_engine"] == engine
    assert s["hits"] == 6 and s["misses"] == 6 and s["cpu_expert_execs"] == 6
    assert s["demand_fetches"] == 0 and s["prefetch_transfers"] == 0
    assert s["stall_time_s"] == 0
    # the host is busy for the CPU layer (attention and shared on every lane) and its experts
    busy = 3 * (parallel * (2e-3 + 3e-4) + 2 * 2.5e-4)
    assert s["cpu_busy_fraction"] == pytest.approx(busy / (s["total_time_s"] * parallel))
    assert res.per_layer["misses"].tolist() == [0, 3 * 2]


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_golden_dense_layer_and_batch(engine) -> None:
    """A dense decoder layer before MoE layer 1, on the host with gpu_layers=1 (it counts as a
    decoder layer, as -ngl counts it); batch 2: the hidden states of both tokens cross."""
    trace = trace_from_lists([[[[0, 1], [2, 3]]] * 2, [[[0, 1], [2, 3]]] * 2], experts=4)
    res = simulate(trace, "lru", capacity=4, link=LINK, compute=COMPUTE, host=_host(),
                   placement={"name": "cpu_layers", "gpu_layers": 1}, dense_before=[0, 1],
                   prefill="random", batch=2, engine=engine)
    gpu = 1e-3 + 1e-4 + 1e-4 + 2 * 3e-4  # FixedCompute: per call, whatever the tokens
    d2h = 1e-5 + 2 * ACT / 1e6
    cpu = 4e-3 + 2e-3 + 3e-4 + 2 * (2e-4 + 2 * 5e-5)  # dense + attention + shared + experts
    assert res.summary["total_time_s"] == pytest.approx(2 * (gpu + d2h + cpu), rel=1e-12)


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_a_gpu_dense_layer_before_the_split_is_charged(engine) -> None:
    """Decoder [dense, MoE, MoE] (DeepSeek-V2-Lite's shape) with only the dense layer on the
    GPU: it costs the GPU's dense time per token, where every layer on the host costs the
    host's, and an offloaded layer after it copies no dense weights (the split falls between
    the dense layer and the first MoE layer; both used to drop the dense layer's time)."""
    gpu_dense, cpu_dense, tokens = 5e-3, 4e-3, 3
    compute = FixedCompute(attention_s=1e-3, router_s=1e-4, expert_s=3e-4, shared_s=1e-4,
                           dense_s=gpu_dense)

    def total(name: str, gpu_layers: int, host: HostSide) -> float:
        r = simulate(_tiny(tokens), "lru", capacity=4, link=LINK, compute=compute, host=host,
                     placement={"name": name, "gpu_layers": gpu_layers}, dense_before=[1, 0],
                     prefill="random", engine=engine)
        return float(r.summary["total_time_s"])

    host = _host(dense_s=cpu_dense)
    assert total("cpu_layers", 1, host) - total("cpu_layers", 0, host) == pytest.approx(
        tokens * (gpu_dense - cpu_dense), abs=1e-12)
    dense_bytes = 1000  # 1 ms at LINK's rate, plus its 10 us per copy
    off = HostSide(None, ACT, 16, attention_bytes=1000, dense_bytes=dense_bytes)
    assert total("layer_offload", 0, off) - total("layer_offload", 1, off) == pytest.approx(
        tokens * (1e-5 + dense_bytes / 1e6), abs=1e-12)


def test_everything_on_the_host_copies_nothing() -> None:
    """gpu_layers=0: every routed expert is computed on the host, nothing crosses the link but
    the hidden state (not an expert copy: no demand or prefetch bytes)."""
    res = simulate(_tiny(), "next_layer_all", capacity=4, link=LINK, compute=COMPUTE,
                   host=_host(), placement={"name": "cpu_layers", "gpu_layers": 0})
    s = res.summary
    assert s["demand_bytes"] == s["prefetch_bytes"] == s["hits"] == 0
    assert s["cpu_expert_execs"] == s["misses"] == s["accesses"] == 12
    per_token = 1e-5 + ACT / 1e6 + 2 * (2e-3 + 3e-4 + 2 * 2.5e-4)
    assert s["total_time_s"] == pytest.approx(3 * per_token, rel=1e-12)


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
traces = st.builds(
    lambda n, t, layers, e, k, seed, skew: random_trace(
        num_requests=n, tokens=t, layers=layers, experts=e, top_k=k, seed=seed, skew=skew),
    st.integers(1, 3), st.integers(1, 8), st.integers(1, 4), st.integers(4, 10),
    st.integers(1, 3), st.integers(0, 10_000), st.floats(0.0, 2.0),
)


def _cap(trace, batch: int = 1) -> int:
    meta = trace.meta
    return min((meta.top_k * batch + 1) * 2, meta.num_moe_layers * meta.num_experts)


@SETTINGS
@given(trace=traces, gpu=st.integers(0, 5), mode=st.sampled_from(["timed", "zero_latency"]),
       pf=st.sampled_from(["none", "next_layer_all", "oracle_prefetch"]),
       batch=st.integers(1, 3), warmup=st.integers(0, 2))
def test_cpu_layers_are_never_cached(trace, gpu, mode, pf, batch, warmup) -> None:
    """A CPU layer's experts never hit and are never copied (prefetches of them are dropped);
    every one of its accesses is a miss computed on the host; the run is compiled."""
    timing = {"link": LINK, "compute": COMPUTE} if mode == "timed" else {}
    res = simulate(trace, {"name": "lru", "prefetch": pf}, capacity=_cap(trace, batch),
                   mode=mode, host=_host(), placement={"name": "cpu_layers", "gpu_layers": gpu},
                   batch=batch, warmup_tokens=warmup, prefill="random", **timing)
    s, pl = res.summary, res.per_layer
    check_parts(res)
    cpu = pl[pl["layer"] >= gpu]
    assert (cpu["hits"] + cpu["late_hits"] + cpu["promoted"]).sum() == 0
    assert s["cpu_expert_execs"] == cpu["misses"].sum()
    assert s["demand_fetches"] == pl[pl["layer"] < gpu]["misses"].sum() + s["promoted"]
    assert s["sim_engine"] == "compiled"
    if mode == "timed":
        assert s["stall_cpu_s"] == 0 and s["total_time_s"] >= s["stall_time_s"]


@SETTINGS
@given(trace=traces, mode=st.sampled_from(["timed", "zero_latency"]),
       pf=st.sampled_from(["none", "next_layer_all"]))
def test_every_layer_on_the_gpu_is_fetch(trace, mode, pf) -> None:
    """gpu_layers >= the model's layers is the plain fetch run, on both engines."""
    timing = {"link": LINK, "compute": COMPUTE} if mode == "timed" else {}
    policy = {"name": "lru", "prefetch": pf}
    for engine in ("python", "compiled"):
        base = simulate(trace, policy, capacity=_cap(trace), mode=mode, engine=engine,
                        **timing).summary
        got = simulate(trace, policy, capacity=_cap(trace), mode=mode, engine=engine,
                       host=_host(), placement={"name": "cpu_layers",
                                                "gpu_layers": trace.meta.num_moe_layers},
                       **timing).summary
        diff = [k for k, v in base.items() if k != "placement" and v != got[k]
                and not (isinstance(v, float) and math.isnan(v) and math.isnan(got[k]))]
        assert diff == []


@SETTINGS
@given(trace=traces, gpu=st.integers(0, 4))
def test_a_faster_host_is_never_slower(trace, gpu) -> None:
    """Halving every host time never makes the run slower (no queue on the host can
    reorder: CPU layers run one after another)."""
    kw = dict(capacity=_cap(trace), link=LINK, compute=COMPUTE,
              placement={"name": "cpu_layers", "gpu_layers": gpu})
    slow = simulate(trace, "lru", host=_host(), **kw).summary["total_time_s"]
    fast_host = HostSide(FixedHostCpu(call_s=1e-4, per_token_s=2.5e-5, attention_s=1e-3,
                                      shared_s=1.5e-4, dense_s=2e-3), ACT, 16)
    fast = simulate(trace, "lru", host=fast_host, **kw).summary["total_time_s"]
    assert fast <= slow * (1 + 1e-12)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(PolicyError, match=r"^cpu_layers: gpu_layers must be a whole number "
                                          r">= 0 .*got None$"):
        simulate(_tiny(), "lru", capacity=4, link=LINK, compute=COMPUTE, host=_host(),
                 placement="cpu_layers")
    with pytest.raises(PolicyError, match=r"got -1$"):
        simulate(_tiny(), "lru", capacity=4, mode="zero_latency",
                 placement={"name": "cpu_layers", "gpu_layers": -1})
    with pytest.raises(SimulationError, match="computes experts on the host CPU, but no host "
                                              "CPU model was given"):
        simulate(_tiny(), "lru", capacity=4, link=LINK, compute=COMPUTE,
                 placement={"name": "cpu_layers", "gpu_layers": 1})
    for name in ("cpu_layers", "layer_offload"):  # host layers would waste partitions
        with pytest.raises(SimulationError, match=rf"^placement '{name}' with "
                                                  r"cache\.partition=per_layer: .*use "
                                                  r"cache\.partition=global$"):
            simulate(_tiny(), "lru", capacity=6, mode="zero_latency", partition="per_layer",
                     placement={"name": name, "gpu_layers": 1})


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_compute_stream_copies_run_during_cpu_layers(engine) -> None:
    """With copies on the compute stream (a runtime's ``copy.stream: compute``) a CPU layer is
    host time: the link runs through it. Token 0: layer 0 misses experts 0 and 1 (1 ms copies,
    the link paused during kernels: 1.1 ms attention + 0.1 ms shared + 2 x (1 ms wait + 0.3
    ms) = 3.8 ms, 2 ms of it stall); the CPU layer (3 ms attention + 64 us hidden state, then
    two 1.05 ms experts) prefetches layer 0's experts 2 and 3 at its routing (next_layer_all,
    wrapping), and both copies land during its 2.1 ms of experts: token 1's layer 0 hits
    both (1.8 ms), its CPU layer takes 5.164 ms again."""
    from moesim.hw_profiles.runtime import RuntimeCompute, RuntimeLink

    link = RuntimeLink(FixedLink(0.0, 1e6, 1), stream="compute")  # 1 ms per expert
    comp = RuntimeCompute(COMPUTE, 2)
    trace = trace_from_lists([[[[0, 1], [2, 3]], [[2, 3], [0, 1]]]], experts=4)
    host = HostSide(FixedHostCpu(call_s=1e-3, per_token_s=5e-5, attention_s=3e-3), ACT, 16)
    s = simulate(trace, {"name": "next_layer_all", "eviction": "lru"}, capacity=4, link=link,
                 compute=comp, host=host, placement={"name": "cpu_layers", "gpu_layers": 1},
                 engine=engine).summary
    assert s["sim_engine"] == engine
    assert s["prefetch_transfers"] == 2 and s["hits"] == 2 and s["late_hits"] == 0
    assert s["misses"] == 6 and s["cpu_expert_execs"] == 4
    assert s["stall_miss_s"] == pytest.approx(2e-3, rel=1e-12) and s["stall_late_s"] == 0
    cpu = 3e-3 + ACT / 1e6 + 2 * 1.05e-3
    assert s["total_time_s"] == pytest.approx(3.8e-3 + 1.8e-3 + 2 * cpu, rel=1e-12)


# -- layer_offload (accelerate's layer-order offload): the same walk, copies instead of a host --
OFF_HOST = HostSide(activation_bytes=ACT, dtype_bits=16, attention_bytes=500, shared_bytes=300,
                    dense_bytes=800)


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_golden_layer_offload(engine) -> None:
    """gpu_layers=1 of 2: a token is the resident GPU layer + the offloaded layer's attention
    weights copied (10 us + 500 B at 1 MB/s) and run, its shared experts copied and run, then
    each routed expert copied (1 ms) and run, one after another; its routed experts count as
    demand copies, none is cached."""
    res = simulate(_tiny(), "lru", capacity=4, link=LINK, compute=COMPUTE, host=OFF_HOST,
                   placement={"name": "layer_offload", "gpu_layers": 1}, prefill="random",
                   engine=engine)
    s = res.summary
    gpu = 1e-3 + 1e-4 + 1e-4 + 2 * 3e-4
    off = (1e-5 + 500 / 1e6 + 1e-3 + 1e-4) + (1e-5 + 300 / 1e6 + 1e-4) + 2 * (1.01e-3 + 3e-4)
    assert s["total_time_s"] == pytest.approx(3 * (gpu + off), rel=1e-12)
    assert s["sim_engine"] == engine
    assert s["hits"] == 6 and s["misses"] == 6 and s["demand_fetches"] == 6
    assert s["cpu_expert_execs"] == 0 and s["prefetch_transfers"] == 0
    assert res.per_layer["hits"].tolist() == [6, 0]


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_layer_offload_dense_layer_and_whole_layer_runtime(engine) -> None:
    """A dense layer before MoE layer 1, offloaded with it (gpu_layers=1), copies its 800 B;
    under a runtime whose routed-expert copies move the whole MoE block (``copy.whole_layer``:
    4 experts / top-2 = 2 x the bytes) only the routed experts' copies double."""
    from moesim.hw_profiles.runtime import RuntimeLink

    link = RuntimeLink(LINK, bytes_factor=2.0)
    res = simulate(_tiny(2), "lru", capacity=4, link=link, compute=COMPUTE, host=OFF_HOST,
                   placement={"name": "layer_offload", "gpu_layers": 1}, dense_before=[0, 1],
                   prefill="random", engine=engine)
    gpu = 1e-3 + 1e-4 + 1e-4 + 2 * 3e-4
    dense = 1e-5 + 800 / 1e6 + 0.0  # FixedCompute: dense_s 0
    off = (dense + (1e-5 + 500 / 1e6 + 1e-3 + 1e-4) + (1e-5 + 300 / 1e6 + 1e-4)
           + 2 * (1e-5 + 2000 / 1e6 + 3e-4))
    assert res.summary["total_time_s"] == pytest.approx(2 * (gpu + off), rel=1e-12)


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_whole_layer_runtime_moves_the_block_once_per_step(engine) -> None:
    """Batch 2 whose tokens route four distinct experts of the offloaded layer (top-2 of 4):
    a whole-layer runtime copies the layer's block once per step (top_k copies of 2x an
    expert's bytes), not once per routed expert (which would be two blocks); each routed
    expert still runs its kernel."""
    from moesim.hw_profiles.runtime import RuntimeLink

    link = RuntimeLink(LINK, bytes_factor=2.0)
    trace = trace_from_lists([[[[0, 1], [2, 3]]] * 2, [[[0, 1], [0, 1]]] * 2], experts=4)
    res = simulate(trace, "lru", capacity=5, link=link, compute=COMPUTE, host=OFF_HOST,
                   placement={"name": "layer_offload", "gpu_layers": 1}, prefill="random",
                   batch=2, engine=engine)
    gpu = 1e-3 + 1e-4 + 1e-4 + 2 * 3e-4
    block = 2 * (1e-5 + 2000 / 1e6)
    off = ((1e-5 + 500 / 1e6 + 1e-3 + 1e-4) + (1e-5 + 300 / 1e6 + 1e-4) + block
           + 4 * 3e-4)
    assert res.summary["total_time_s"] == pytest.approx(2 * (gpu + off), rel=1e-12)


@SETTINGS
@given(trace=traces, mode=st.sampled_from(["timed", "zero_latency"]),
       pf=st.sampled_from(["none", "next_layer_all"]), gpu=st.integers(0, 5))
def test_layer_offload_invariants(trace, mode, pf, gpu) -> None:
    """Offloaded layers never hit and every one of their experts is a demand copy; with every
    layer resident it is the plain fetch run, on both engines."""
    timing = {"link": LINK, "compute": COMPUTE} if mode == "timed" else {}
    policy = {"name": "lru", "prefetch": pf}
    res = simulate(trace, policy, capacity=_cap(trace), mode=mode, host=OFF_HOST,
                   placement={"name": "layer_offload", "gpu_layers": gpu}, **timing)
    check_parts(res)
    pl = res.per_layer
    off = pl[pl["layer"] >= gpu]
    assert (off["hits"] + off["late_hits"] + off["promoted"]).sum() == 0
    assert res.summary["sim_engine"] == "compiled"
    if gpu >= trace.meta.num_moe_layers:
        for engine in ("python", "compiled"):
            base = simulate(trace, policy, capacity=_cap(trace), mode=mode, engine=engine,
                            **timing).summary
            got = simulate(trace, policy, capacity=_cap(trace), mode=mode, engine=engine,
                           host=OFF_HOST, placement={"name": "layer_offload",
                                                     "gpu_layers": gpu}, **timing).summary
            assert [k for k, v in base.items() if k != "placement" and v != got[k]
                    and not (isinstance(v, float) and math.isnan(v))] == []


def test_layer_offload_bad_input() -> None:
    with pytest.raises(PolicyError, match=r"^layer_offload: gpu_layers must be a whole number "
                                          r">= 0 \(decoder layers on the GPU, in module order"):
        simulate(_tiny(), "lru", capacity=4, mode="zero_latency", placement="layer_offload")
    with pytest.raises(SimulationError, match="copies each offloaded layer's attention "
                                              "weights, but the host side gives no "
                                              "attention_bytes"):
        simulate(_tiny(), "lru", capacity=4, link=LINK, compute=COMPUTE,
                 placement={"name": "layer_offload", "gpu_layers": 1})
