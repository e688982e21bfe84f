"""The placement registry: names, parameters and their errors (one line each)."""

from __future__ import annotations

import pytest

from moesim.policies.base import CPU, FETCH, LOW_PRECISION, SKIP, ModelShape, PolicySetup
from moesim.policies.registry import PLACEMENT, placement_names, resolve_placement


def test_shipped_placements() -> None:
    assert placement_names() == ["cpu_layers", "cpu_on_miss", "fetch", "fetch_or_cpu",
                                 "layer_offload", "low_precision_fetch", "skip_low_weight",
                                 "static_cpu"]
    assert resolve_placement(None).is_default and resolve_placement("fetch").is_default
    assert not resolve_placement("cpu_on_miss").is_default
    for name in placement_names():
        cls = PLACEMENT[name]
        assert cls.__doc__ and cls.name == name
        assert cls.needs_gate_weights == cls.approximates  # only weights decide approximations


@pytest.mark.parametrize(("name", "params", "message"), [
    ("nearest", {}, "placement 'nearest' is not registered; known: cpu_layers, cpu_on_miss, "
     "fetch"),
    ("cpu_on_miss", {"threshold": 0.3},
     "placement 'cpu_on_miss' does not take ['threshold'] (it takes: no parameters)"),
    ("skip_low_weight", {"bits": 4},
     "placement 'skip_low_weight' does not take ['bits'] (it takes: threshold)"),
    ("low_precision_fetch", {"bits": "four"},
     "placement 'low_precision_fetch': parameter bits='four' should be like 4"),
])
def test_bad_placement_is_one_clear_error(name, params, message) -> None:
    with pytest.raises(ValueError) as err:
        resolve_placement(name, params)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def _make(name: str, capacity: int = 8, **params):
    spec = resolve_placement(name, params)
    setup = PolicySetup(shape=ModelShape(4, 8, 2, 1000), capacity=capacity, clock=None,
                        rng=None, params=spec.params)
    return spec.cls(setup)


def test_decisions() -> None:
    assert _make("cpu_on_miss").decide(None, 3, float("nan"), 1) == CPU
    low = _make("low_precision_fetch", threshold=0.2, bits=8)
    assert low.decide(None, 0, 0.1, 1) == LOW_PRECISION and low.decide(None, 0, 0.2, 1) == FETCH
    assert low.low_precision_bits() == 8
    skip = _make("skip_low_weight", threshold=0.2)
    assert skip.decide(None, 0, 0.19, 1) == SKIP and skip.decide(None, 0, 0.5, 1) == FETCH
    with pytest.raises(ValueError, match="threshold must be in"):
        _make("skip_low_weight", threshold=1.5)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
        _make("low_precision_fetch", bits=5)


@pytest.mark.parametrize(("layers", "capacity", "cpu"), [
    (None, 16, [0, 1]),  # 16 slots hold the last two layers' 8 experts each
    (None, 15, [0, 1, 2]),
    (None, 32, []),
    (1, 16, [0]),
    (99, 16, [0, 1, 2, 3]),  # every MoE layer (kTransformers)
])
def test_static_cpu_layers(layers, capacity, cpu) -> None:
    pol = _make("static_cpu", capacity=capacity, layers=layers)
    assert pol.cpu_layers() == cpu
    for key in range(32):
        assert pol.decide(None, key, 1.0, 1) == (CPU if key // 8 in cpu else FETCH)


@pytest.mark.parametrize(("gpu_layers", "dense_before", "cpu", "dense"), [
    (2, None, [2, 3], [0, 0, 0, 0]),  # -ngl 2 of 4 MoE layers
    (0, None, [0, 1, 2, 3], [0, 0, 0, 0]),  # everything on the host
    (4, None, [], [0, 0, 0, 0]),
    (99, None, [], [0, 0, 0, 0]),  # >= the layers: everything on the GPU
    (2, [1, 0, 0, 0], [1, 2, 3], [0, 0, 0, 0]),  # dense layer 0 is one of the -ngl layers
    (0, [1, 0, 0, 0], [0, 1, 2, 3], [1, 0, 0, 0]),
    (3, [0, 2, 0, 0], [1, 2, 3], [0, 0, 0, 0]),  # decoder layers 0 (MoE), 1, 2 (dense) on GPU
    (2, [0, 2, 0, 0], [1, 2, 3], [0, 1, 0, 0]),  # the second dense layer on the host
])
def test_cpu_layers_split(gpu_layers, dense_before, cpu, dense) -> None:
    """``gpu_layers`` counts decoder layers, dense ones included, as llama.cpp's -ngl does."""
    params = {"gpu_layers": gpu_layers}
    if dense_before is not None:
        params["_dense_before"] = dense_before
    spec = resolve_placement("cpu_layers", {"gpu_layers": gpu_layers})
    pol = spec.cls(PolicySetup(shape=ModelShape(4, 8, 2, 1000), capacity=8, clock=None,
                               rng=None, params=params))
    assert pol.cpu_layers() == cpu and pol.cpu_dense_layers() == dense
    assert pol.whole_layers == "cpu" and pol.uses_cpu
    offload = PLACEMENT["layer_offload"](PolicySetup(shape=ModelShape(4, 8, 2, 1000),
                                                     capacity=8, clock=None, rng=None,
                                                     params=params))
    assert offload.cpu_layers() == cpu and offload.cpu_dense_layers() == dense
    assert offload.whole_layers == "copied" and not offload.uses_cpu


@pytest.mark.parametrize("bad", [None, -1, 1.5, True, "16"])
def test_cpu_layers_bad_gpu_layers_is_one_clear_error(bad) -> None:
    with pytest.raises(ValueError) as err:
        PLACEMENT["cpu_layers"](PolicySetup(shape=ModelShape(4, 8, 2, 1000), capacity=8,
                                            clock=None, rng=None, params={"gpu_layers": bad}))
    assert str(err.value) == ("cpu_layers: gpu_layers must be a whole number >= 0 (decoder "
                              f"layers on the GPU, as llama.cpp's -ngl), got {bad!r}")
