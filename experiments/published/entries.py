"""Published measurements as data: one YAML per source in this folder, validated on load.

Each entry is one measured number (tokens/s, s/token or a speed-up) with its source, the
verbatim quote, and the setup it was measured in (model, weight format per component, GPU,
host, runtime, batch, lengths, cache, policy); every fact the source does not state is an
``assumptions`` item with its reasoning. The format is the README of this folder. Loading
refuses, with one line naming the file, entry and field: an entry without a source or quote,
an unknown runtime or placement, bits per weight outside (0, 32], a cache smaller than one expert
per layer, duplicate ids, unknown keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_DIR = Path(__file__).parent
METRICS = ("tokens_per_s", "s_per_token", "speedup")
PHASES = ("decode", "prefill", "request")
PREFETCHES = ("none", "speculative", "next_layer_all", "oracle")
CACHE_KINDS = ("per_layer", "experts", "fraction", "gpu_memory_gib", "none", "all")
# Where a system runs or gets a routed expert (each a moesim placement; the last two whole
# layers on the CPU, llama.cpp's -ngl, and accelerate's layer-order offload, both with the
# entry's gpu_layers assumption). A placement no moesim placement is would be named here and
# reported as not predictable with its reason (predict.UNMODELLED_PLACEMENTS).
PLACEMENTS = ("fetch", "cpu_on_miss", "fetch_or_cpu", "static_cpu", "low_precision_fetch",
              "skip_low_weight", "cpu_layers", "layer_offload")
ENTRY_KEYS = frozenset({
    "id", "quote", "metric", "value", "baseline", "model", "weights", "gpu", "hw", "host", "link",
    "runtime", "system", "version", "batch", "input_tokens", "output_tokens", "phase", "cache",
    "policy", "prefetch", "placement", "notes", "runtime_options",
})
WEIGHT_KEYS = frozenset({"experts_bits", "attention_bits", "shared_bits", "format"})
_ID = re.compile(r"^[a-z0-9_]+$")


class PublishedError(ValueError):
    """A published-measurement file is malformed; the message names file, entry and field."""


@dataclass(frozen=True)
class Source:
    id: str
    title: str
    cite: str
    where: str
    url: str = ""


@dataclass(frozen=True)
class Assumption:
    field: str
    value: Any
    why: str
    entries: tuple[str, ...] | None = None  # None: every entry of the file


@dataclass(frozen=True)
class Entry:
    """One measured number with its full setup (the file's defaults merged in)."""

    id: str
    source: Source
    quote: str
    metric: str
    value: float
    model: str
    hw: str
    runtime: str
    cache: Mapping[str, Any]
    baseline: str | None = None
    weights: Mapping[str, Any] = field(default_factory=dict)
    gpu: str = ""
    host: str = ""
    link: str = ""
    system: str = ""
    version: str = ""
    batch: int = 1
    input_tokens: int | None = None
    output_tokens: int | None = None
    phase: str = "decode"
    policy: str = "lru"
    prefetch: str = "none"
    placement: str = "fetch"
    notes: str = ""
    # structural choices of the runtime that the measured version makes, read from its code
    # (``hw_profiles.runtime.STRUCTURAL`` keys, e.g. ``compute.expert_calls: per_token``)
    runtime_options: Mapping[str, str] = field(default_factory=dict)
    assumptions: tuple[Assumption, ...] = ()

    @property
    def file(self) -> str:
        return f"{self.source.id}.yaml"

    def bits(self, component: str) -> float | None:
        v = self.weights.get(f"{component}_bits")
        return None if v is None else float(v)


def _err(where: str, field_: str, problem: str, value: Any = ...) -> PublishedError:
    got = "" if value is ... else f"; got {value!r}"
    return PublishedError(f"{where}: field {field_!r}: {problem}{got}")


def _str(where: str, key: str, raw: Any, required: bool = True) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if required:
            raise _err(where, key, "is required and may not be empty")
        return ""
    if not isinstance(raw, str):
        raise _err(where, key, "expected text", raw)
    return raw.strip()


def _number(where: str, key: str, raw: Any, *, positive: bool = True) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise _err(where, key, "expected a finite number", raw)
    if positive and raw <= 0:
        raise _err(where, key, "must be > 0", raw)
    return float(raw)


def _whole(where: str, key: str, raw: Any, lo: int = 1) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != int(raw) or raw < lo:
        raise _err(where, key, f"expected a whole number >= {lo}", raw)
    return int(raw)


def _weights(where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _err(where, "weights", "expected a mapping", raw)
    unknown = sorted(set(raw) - WEIGHT_KEYS)
    if unknown:
        raise _err(where, "weights", f"unknown key(s) {unknown}; expected some of "
                                     f"{sorted(WEIGHT_KEYS)}")
    out = dict(raw)
    for key in ("experts_bits", "attention_bits", "shared_bits"):
        v = raw.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 32:
            raise _err(where, f"weights.{key}", "bits per weight must be in (0, 32]", v)
    return out


def _cache(where: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise _err(where, "cache", f"expected exactly one of {list(CACHE_KINDS)}", raw)
    (kind, value), = raw.items()
    if kind not in CACHE_KINDS:
        raise _err(where, "cache", f"unknown cache kind {kind!r}; one of {list(CACHE_KINDS)}")
    if kind in ("none", "all"):
        if value is not True:
            raise _err(where, f"cache.{kind}", "must be true", value)
    elif kind in ("per_layer", "experts"):
        if _whole(where, f"cache.{kind}", value, lo=0) is None or value < 1:
            raise _err(where, f"cache.{kind}", "a cache smaller than one expert per layer "
                       "cannot run (use cache: {none: true} for a system without a cache)",
                       value)
    elif kind == "fraction":
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise _err(where, "cache.fraction", "must be in (0, 1]", value)
    else:
        _number(where, "cache.gpu_memory_gib", value)
    return {kind: value}


def _assumptions(where: str, raw: Any, ids: set[str]) -> tuple[Assumption, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise _err(where, "assumptions", "expected a list", raw)
    out = []
    for i, item in enumerate(raw):
        w = f"{where} assumptions[{i}]"
        if not isinstance(item, Mapping):
            raise _err(w, "assumptions", "expected a mapping {field, value, why}", item)
        unknown = sorted(set(item) - {"field", "value", "why", "entries"})
        if unknown:
            raise _err(w, "assumptions", f"unknown key(s) {unknown}")
        which = item.get("entries", "all")
        entries: tuple[str, ...] | None = None
        if which != "all":
            if not isinstance(which, list) or not all(isinstance(x, str) for x in which):
                raise _err(w, "entries", "expected 'all' or a list of entry ids", which)
            missing = sorted(set(which) - ids)
            if missing:
                raise _err(w, "entries", f"names no entry of this file: {missing}")
            entries = tuple(which)
        out.append(Assumption(_str(w, "field", item.get("field")), item.get("value"),
                              _str(w, "why", item.get("why")), entries))
    return tuple(out)


def _runtime_options(where: str, raw: Any) -> dict[str, str]:
    """An entry's ``runtime_options``: structural keys and one of each key's choices."""
    from moesim.hw_profiles.runtime import STRUCTURAL

    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _err(where, "runtime_options", "expected a mapping of structural choices", raw)
    out: dict[str, str] = {}
    for key, value in raw.items():
        allowed = STRUCTURAL.get(str(key))
        if allowed is None:
            raise _err(where, f"runtime_options.{key}",
                       f"unknown; structural choices: {sorted(STRUCTURAL)}")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text not in allowed:
            raise _err(where, f"runtime_options.{key}", f"must be one of {list(allowed)}",
                       value)
        out[str(key)] = text
    return out


# llama.cpp's build eras for MoE decode on CUDA (the runtime profiles' headers give the code
# evidence): up to about b5159 every MoE matmul copied the routing ids to the host and MoE
# graphs were never captured (``llama_cpp``); from PR #13014 (2025-04-22, about b5160) a
# batch-1 step has no host sync and runs as one CUDA graph (``llama_cpp_graphs``). The boundary
# is interpolated from dated releases (+-60 builds), so builds near it are refused as unsure.
LLAMA_CPP_ERAS: dict[str, tuple[int, int]] = {"llama_cpp": (0, 5100),
                                              "llama_cpp_graphs": (5220, 10**6)}
# A build as versions name it: ``b9603``, ``build 10809``, or llama-bench's ``build: 9db77a0
# (8820)``; four or five digits, not part of a date, a version number or a word (``b200``,
# ``build 2025-04-22`` and ``build 550.54`` are not builds).
_BUILD = re.compile(r"(?<![\w.-])(?:b|build )(\d{4,5})(?![\w-])(?!\.\d)"
                    r"|\bbuild:\s*[0-9a-f]{6,40}\s*\((\d{4,5})\)")


# Turing and Volta GPUs (these hardware profiles) run llama.cpp's graphs only from PR #25749
# (2026-07-16, about b10040; +-60 builds as above): a graph-era build before it runs their MoE
# decode without graphs and without the host syncs, which neither profile models.
GRAPHS_LATE_HW = frozenset({"t4", "quadro_rtx5000", "quadro_rtx6000", "v100_pcie", "v100_sxm2"})
GRAPHS_LATE_FROM = 10100


def _check_build(where: str, runtime: str, version: str, hw: str) -> None:
    """A llama.cpp entry whose version states its build must use that build's era profile:
    the two eras' per-token costs differ several-fold, so a wrong one is not a small error."""
    era = LLAMA_CPP_ERAS.get(runtime)
    if era is None:
        return
    builds = {int(a or b) for a, b in _BUILD.findall(version)}
    if not builds:
        return
    if len(builds) > 1:
        raise _err(where, "version", f"names more than one llama.cpp build {sorted(builds)}; "
                                     "name the measured one", version)
    build = builds.pop()
    graphs = LLAMA_CPP_ERAS["llama_cpp_graphs"]
    if hw in GRAPHS_LATE_HW and graphs[0] <= build < GRAPHS_LATE_FROM:
        raise _err(where, "runtime", f"{hw} is a Turing/Volta GPU, which llama.cpp runs "
                                     f"with CUDA graphs only from about b{GRAPHS_LATE_FROM}; "
                                     f"build {build} is neither llama.cpp profile", runtime)
    if era[0] <= build <= era[1]:
        return
    fits = [rt for rt, (lo, hi) in LLAMA_CPP_ERAS.items() if lo <= build <= hi]
    hint = f"use runtime {fits[0]}" if fits else "the build is too near an era boundary to tell"
    raise _err(where, "runtime", f"{runtime} models llama.cpp builds b{era[0]}-b{era[1]}; "
                                 f"the version states build {build}: {hint}", runtime)


def load_file(path: Path, runtimes: Sequence[str] | None = None) -> list[Entry]:
    """Every entry of one source file, defaults merged, validated."""
    where = path.name
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PublishedError(f"{where}: cannot read as YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise PublishedError(f"{where}: expected a mapping with source, defaults, entries")
    unknown = sorted(set(data) - {"source", "defaults", "entries", "assumptions"})
    if unknown:
        raise PublishedError(f"{where}: unknown top-level key(s) {unknown}")
    src = data.get("source")
    if not isinstance(src, Mapping):
        raise _err(where, "source", "every file needs a source {id, title, cite, where, url}")
    source = Source(
        id=_str(where, "source.id", src.get("id")),
        title=_str(where, "source.title", src.get("title")),
        cite=_str(where, "source.cite", src.get("cite")),
        where=_str(where, "source.where", src.get("where")),
        url=_str(where, "source.url", src.get("url"), required=False),
    )
    if source.id != path.stem:
        raise _err(where, "source.id", f"must equal the file name {path.stem!r}", source.id)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise _err(where, "defaults", "expected a mapping", defaults)
    bad = sorted(set(defaults) - ENTRY_KEYS)
    if bad:
        raise _err(where, "defaults", f"unknown key(s) {bad}")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _err(where, "entries", "expected a non-empty list")
    ids = {str(e.get("id")) for e in raw_entries if isinstance(e, Mapping)}
    assumptions = _assumptions(where, data.get("assumptions"), ids)
    out = []
    for i, raw in enumerate(raw_entries):
        if not isinstance(raw, Mapping):
            raise _err(f"{where} entries[{i}]", "entry", "expected a mapping", raw)
        merged = {**defaults, **raw}
        eid = merged.get("id")
        if not isinstance(eid, str) or not _ID.match(eid):
            raise _err(f"{where} entries[{i}]", "id", "expected [a-z0-9_]+", eid)
        w = f"{where} entry {eid}"
        bad = sorted(set(raw) - ENTRY_KEYS)
        if bad:
            raise _err(w, "entry", f"unknown key(s) {bad}; expected some of {sorted(ENTRY_KEYS)}")
        metric = merged.get("metric")
        if metric not in METRICS:
            raise _err(w, "metric", f"must be one of {list(METRICS)}", metric)
        baseline = merged.get("baseline")
        if (metric == "speedup") != (baseline is not None):
            raise _err(w, "baseline", "a speedup needs the id of its baseline entry; other "
                                      "metrics have none", baseline)
        runtime = _str(w, "runtime", merged.get("runtime"))
        if runtimes is not None and runtime not in runtimes:
            raise _err(w, "runtime", f"unknown runtime; shipped: {', '.join(runtimes)}", runtime)
        _check_build(w, runtime, str(merged.get("version") or ""), str(merged.get("hw") or ""))
        phase = merged.get("phase", "decode")
        if phase not in PHASES:
            raise _err(w, "phase", f"must be one of {list(PHASES)}", phase)
        prefetch = merged.get("prefetch", "none")
        if prefetch not in PREFETCHES:
            raise _err(w, "prefetch", f"must be one of {list(PREFETCHES)}", prefetch)
        placement = merged.get("placement", "fetch")
        if placement not in PLACEMENTS:
            raise _err(w, "placement", f"must be one of {list(PLACEMENTS)}", placement)
        out.append(Entry(
            id=eid, source=source,
            quote=_str(w, "quote", merged.get("quote")),
            metric=metric, value=_number(w, "value", merged.get("value")),
            baseline=baseline,
            model=_str(w, "model", merged.get("model")),
            hw=_str(w, "hw", merged.get("hw")),
            runtime=runtime,
            cache=_cache(w, merged.get("cache")),
            weights=_weights(w, merged.get("weights")),
            gpu=_str(w, "gpu", merged.get("gpu"), required=False),
            host=_str(w, "host", merged.get("host"), required=False),
            link=_str(w, "link", merged.get("link"), required=False),
            system=_str(w, "system", merged.get("system"), required=False),
            version=_str(w, "version", merged.get("version"), required=False),
            batch=_whole(w, "batch", merged.get("batch", 1)) or 1,
            input_tokens=_whole(w, "input_tokens", merged.get("input_tokens")),
            output_tokens=_whole(w, "output_tokens", merged.get("output_tokens")),
            phase=phase,
            policy=_str(w, "policy", merged.get("policy", "lru")),
            prefetch=prefetch,
            placement=placement,
            notes=_str(w, "notes", merged.get("notes"), required=False),
            runtime_options=_runtime_options(w, merged.get("runtime_options")),
            assumptions=tuple(a for a in assumptions if a.entries is None or eid in a.entries),
        ))
    return out


def load_entries(folder: Path = DATA_DIR, runtimes: Sequence[str] | None = None) -> list[Entry]:
    """Every entry of every source file in ``folder``; ids unique across files, speed-up
    baselines resolvable."""
    entries: list[Entry] = []
    for path in sorted(folder.glob("*.yaml")):
        entries += load_file(path, runtimes)
    seen: dict[str, str] = {}
    for e in entries:
        if e.id in seen:
            raise PublishedError(f"{e.file} entry {e.id}: id also used in {seen[e.id]}")
        seen[e.id] = e.file
    for e in entries:
        if e.baseline is not None and e.baseline not in seen:
            raise PublishedError(f"{e.file} entry {e.id}: field 'baseline': no entry "
                                 f"{e.baseline!r}")
    return entries
