"""Resolving ``policy=<name>`` configs into classes and checked parameters."""

import pytest

from moesim.policies.base import PolicyError
from moesim.policies.registry import default_config, policy_names, resolve


@pytest.mark.parametrize("name", policy_names())
def test_every_default_config_resolves(name):
    spec = resolve(default_config(name))
    assert spec.name == name


def test_unknown_name_and_parameter_are_errors():
    with pytest.raises(PolicyError, match="not registered"):
        resolve({"name": "nope"})
    with pytest.raises(PolicyError, match="unknown parameter"):
        resolve({"name": "lru", "bogus": 1})
    with pytest.raises(PolicyError, match="should be like"):
        resolve({"name": "lru", "prefetch_touch": "yes"})


def test_swapping_the_partner_drops_its_untouched_defaults():
    cfg = default_config("moe_infinity")  # lists moe_infinity_lfu's `order`
    spec = resolve({**cfg, "eviction": "lru"})
    assert spec.eviction.name == "lru" and "order" not in spec.eviction_params
    with pytest.raises(PolicyError, match="unknown parameter"):
        resolve({**cfg, "eviction": "lru", "order": "max"})  # set on purpose: it no longer applies


def test_prediction_availability_rules():
    from moesim.policies.prediction_prefetch import available

    assert available("pre_attention:same_layer", "pre_attention", 0)
    assert not available("pre_attention:same_layer", "pre_attention", 1)
    assert not available("routed:same_layer", "pre_attention", 0)
    assert available("routed:same_layer", "routed", 0)
    assert available("routed:prev_layer", "demand_issued", 1)  # Fate
    assert not available("routed:prev_layer", "pre_attention", 1)
    assert not available("routed:prev_layer", "demand_issued", 2)
    assert available("routed:minus2_layer", "demand_issued", 2)  # speculation, 2 ahead
    assert not available("routed:minus2_layer", "pre_attention", 2)
    assert not available("routed:minus2_layer", "routed", 3)
