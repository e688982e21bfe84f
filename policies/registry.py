"""Policies registered by name; ``policy=<name>`` picks one.

A name may be an eviction policy (``lru``: demand fetching with LRU eviction) or a prefetch
policy (``next_layer_all``: its ``default_eviction`` unless ``policy.eviction`` overrides it).
Parameters are flat: each class declares ``params`` (name -> default) and takes the ones it knows;
an unknown parameter is an error, so a typo never silently runs the default.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moesim.policies.base import (
    EvictionPolicy,
    FetchOnMiss,
    Knowledge,
    NoPrefetch,
    PlacementPolicy,
    PolicyError,
    PrefetchPolicy,
)

EVICTION: dict[str, type[EvictionPolicy]] = {}
PREFETCH: dict[str, type[PrefetchPolicy]] = {"none": NoPrefetch}
# The third axis, ``placement=<name>``: what happens to a routed expert that is not resident.
PLACEMENT: dict[str, type[PlacementPolicy]] = {"fetch": FetchOnMiss}

E = TypeVar("E", bound=type[EvictionPolicy])
P = TypeVar("P", bound=type[PrefetchPolicy])
L = TypeVar("L", bound=type[PlacementPolicy])

_RESERVED = {"name", "eviction", "prefetch"}


def register_eviction(cls: E) -> E:
    """Class decorator: make an eviction policy available under ``cls.name``."""
    _check_new(cls.name)
    EVICTION[cls.name] = cls
    return cls


def register_prefetch(cls: P) -> P:
    """Class decorator: make a prefetch policy available under ``cls.name``."""
    _check_new(cls.name)
    PREFETCH[cls.name] = cls
    return cls


def register_placement(cls: L) -> L:
    """Class decorator: make a placement policy available under ``placement=<cls.name>``."""
    if not cls.name or cls.name in PLACEMENT:
        raise PolicyError(f"placement name {cls.name!r} is empty or already registered")
    PLACEMENT[cls.name] = cls
    return cls


def _check_new(name: str) -> None:
    if not name or name in EVICTION or name in PREFETCH:
        raise PolicyError(f"policy name {name!r} is empty or already registered")


def discover() -> None:
    """Import every module of the ``policies`` package so their decorators run, and the
    plugins installed under moesim's entry points (:mod:`moesim.plugins`; once per process).

    Every lookup by name goes through here, so a plugin's policy resolves in any process (a
    joblib worker, a submitit job) without that process being told about it, and a policy
    registered by a user's own ``@register_eviction`` at any time is found on the next lookup.
    """
    from moesim import policies
    from moesim.plugins import PluginError, load_entry_points

    for mod in pkgutil.iter_modules(policies.__path__):
        if mod.name not in ("base", "registry"):
            importlib.import_module(f"{policies.__name__}.{mod.name}")
    try:
        load_entry_points()
    except PluginError as exc:
        raise PolicyError(str(exc)) from None


def params_of(cls: type) -> dict[str, Any]:
    return dict(getattr(cls, "params", {}))


@dataclass(frozen=True)
class PolicySpec:
    """A resolved policy: one eviction class, one prefetch class, and their parameters."""

    name: str
    eviction: type[EvictionPolicy]
    prefetch: type[PrefetchPolicy]
    eviction_params: dict[str, Any] = field(default_factory=dict)
    prefetch_params: dict[str, Any] = field(default_factory=dict)

    def needs(self, what: Knowledge) -> bool:
        """Whether the eviction or the prefetch class declares this knowledge."""
        return what in (self.eviction.knows, self.prefetch.knows)

    @property
    def knows(self) -> Knowledge:
        order = [Knowledge.PAST, Knowledge.PREDICTIONS, Knowledge.ORACLE]
        return max(self.eviction.knows, self.prefetch.knows, key=order.index)


def policy_names() -> list[str]:
    discover()
    return sorted(set(EVICTION) | (set(PREFETCH) - {"none"}))


def default_config(name: str) -> dict[str, Any]:
    """The config node stored for ``policy=<name>``: names plus every parameter default."""
    spec = resolve({"name": name})
    cfg: dict[str, Any] = {
        "name": name,
        "eviction": spec.eviction.name,
        "prefetch": spec.prefetch.name,
    }
    cfg.update(params_of(spec.eviction))
    cfg.update(params_of(spec.prefetch))
    return cfg


def as_spec(policy: str | Mapping[str, Any] | PolicySpec) -> PolicySpec:
    """A policy as the simulators take it (a name, ``{name, **params}`` or a resolved spec)."""
    if isinstance(policy, PolicySpec):
        return policy
    return resolve({"name": policy} if isinstance(policy, str) else policy)


def resolve(cfg: Mapping[str, Any]) -> PolicySpec:
    """Turn ``{name, [eviction], [prefetch], **params}`` into classes and checked parameters."""
    discover()
    cfg = dict(cfg)
    name = cfg.get("name")
    if name in EVICTION:
        ev_name, pf_name = name, "none"
    elif name in PREFETCH and name != "none":
        ev_name, pf_name = PREFETCH[name].default_eviction, name
    else:
        raise PolicyError(f"policy {name!r} is not registered; known: {', '.join(policy_names())}")
    ev_name = cfg.get("eviction") or ev_name
    pf_name = cfg.get("prefetch") or pf_name
    if ev_name not in EVICTION:
        raise PolicyError(f"policy.eviction {ev_name!r} unknown; known: {', '.join(EVICTION)}")
    if pf_name not in PREFETCH:
        raise PolicyError(f"policy.prefetch {pf_name!r} unknown; known: {', '.join(PREFETCH)}")
    ev_cls, pf_cls = EVICTION[ev_name], PREFETCH[pf_name]
    given = {k: v for k, v in cfg.items() if k not in _RESERVED}
    ev_defaults, pf_defaults = params_of(ev_cls), params_of(pf_cls)
    # The config node of policy=<name> lists its default partner's parameters; when
    # policy.eviction/prefetch swaps that partner, its untouched defaults no longer apply.
    default_ev = EVICTION.get(name) or EVICTION[PREFETCH[name].default_eviction]
    default_pf = PREFETCH["none"] if name in EVICTION else PREFETCH[name]
    for cls in {default_ev, default_pf} - {ev_cls, pf_cls}:
        for key, default in params_of(cls).items():
            if key in given and key not in ev_defaults and key not in pf_defaults and (
                given[key] == default
            ):
                del given[key]
    unknown = sorted(set(given) - set(ev_defaults) - set(pf_defaults))
    if unknown:
        raise PolicyError(
            f"policy {name!r}: unknown parameter(s) {unknown}; "
            f"known: {sorted(set(ev_defaults) | set(pf_defaults))}"
        )
    ev_params = _merge(ev_defaults, given, name)
    pf_params = _merge(pf_defaults, given, name)
    return PolicySpec(str(name), ev_cls, pf_cls, ev_params, pf_params)


def _merge(defaults: dict[str, Any], given: dict[str, Any], name: str) -> dict[str, Any]:
    out = dict(defaults)
    for key, default in defaults.items():
        if key not in given:
            continue
        value = given[key]
        if default is not None and value is not None and not _same_kind(default, value):
            raise PolicyError(
                f"policy {name!r}: parameter {key}={value!r} should be like {default!r}"
            )
        out[key] = value
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


@dataclass(frozen=True)
class PlacementSpec:
    """A resolved placement: its class and checked parameters."""

    name: str
    cls: type[PlacementPolicy]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_default(self) -> bool:
        """Plain fetching: the runs every engine replays alike."""
        return self.cls is FetchOnMiss


def placement_names() -> list[str]:
    discover()
    return sorted(PLACEMENT)


def resolve_placement(name: str | None = None,
                      params: Mapping[str, Any] | None = None) -> PlacementSpec:
    """``placement=<name>`` plus its parameters; a parameter given (not None) that the
    placement does not take is an error, so a threshold never silently does nothing."""
    discover()
    name = "fetch" if name is None else str(name)
    if name not in PLACEMENT:
        raise PolicyError(
            f"placement {name!r} is not registered; known: {', '.join(placement_names())}")
    cls = PLACEMENT[name]
    defaults = params_of(cls)
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        takes = ", ".join(sorted(defaults)) or "no parameters"
        raise PolicyError(f"placement {name!r} does not take {unknown} (it takes: {takes}); "
                          "leave the others null")
    out = dict(defaults)
    for key, value in given.items():
        default = defaults[key]
        if default is not None and not _same_kind(default, value):
            raise PolicyError(f"placement {name!r}: parameter {key}={value!r} should be like "
                              f"{default!r}")
        out[key] = value
    return PlacementSpec(name, cls, out)
