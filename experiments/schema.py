"""The run config's typed schema: every scalar option of ``moesim-sim`` with its type, range and
one-line doc, checked before anything runs.

Hydra parses an override into whatever type it looks like (``batch=abc`` is a string,
``cache.experts=2.5`` a float), and the YAML defaults carry no types, so a bad value used to
surface as a traceback deep in a run or, worse, be coerced silently. :func:`check` reads every
option listed here from the composed config and returns one ``<key>=<value>: <why>`` line per
violation; the app prints them as ``error: ...`` and exits 2. The same table writes the
``--help`` text (:func:`help_text`), so the docs cannot drift from the checks.

Groups with their own validation (``trace``, ``hw``, ``model``, ``policy``) are checked where they
are loaded (trace readers, the profile schema, model cards, the policy registry).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

_MISSING = object()
_UNSET = object()  # a mandatory value left as ``???``
# Integer options above this are refused: a value like max_requests=1e30 crashed deep in a run
# (islice takes at most sys.maxsize, parquet columns are int64) instead of here.
INT_MAX = 2**63 - 1
TRACE_CONF_DIR = Path(__file__).parent / "conf" / "trace"
# Sections that may be null as a whole (every option in them then takes its default).
_NULLABLE_SECTIONS = ("placement_params", "predictions", "validate")


@dataclass(frozen=True)
class Opt:
    """One scalar option: its key, kind, constraint and doc."""

    key: str
    kind: str  # int | float | bool | str | choice
    doc: str
    nullable: bool = False
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    lo_open: bool = False  # lower bound exclusive
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            rng = " | ".join(self.choices)
        else:
            parts = []
            if self.lo is not None:
                parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
            if self.hi is not None:
                parts.append(f"<= {self.hi:g}")
            rng = self.kind + (" " + ", ".join(parts) if parts else "")
        return rng + (" | null" if self.nullable else "")


OPTIONS: tuple[Opt, ...] = (
    Opt("mode", "choice", "timed: GPU, link and compute as a SimPy model; zero_latency: no time, "
        "every load completes at once (MoE-Beyond's protocol)", choices=("timed", "zero_latency")),
    Opt("replay", "choice", "decode: every token is a decode step; prefill: prompts in chunks",
        choices=("decode", "prefill")),
    Opt("prefill_chunk", "int", "tokens per prefill chunk (0 = the whole prompt)", lo=0),
    Opt("batch", "int", "requests decoded together (continuous batching)", lo=1),
    Opt("warmup_tokens", "int", "first tokens of each request only warm the cache (not counted);"
        " must leave tokens to count", lo=0),
    Opt("warmup_extra_row", "bool", "MoE-Beyond's warm-up quirk: the first counted token's "
        "first MoE layer is also accessed once during warm-up (batch 1, decode replay)"),
    Opt("seed", "int", "seed of every random choice (random prefill, tie-breaks)", lo=0),
    Opt("engine", "choice", "auto: the compiled engine where the policy and options have a "
        "compiled twin, else SimPy (and SimPy for a small run, alone or one of a sweep's, while "
        "the kernels are not compiled yet or being compiled: they compile in the background, "
        "once; MOESIM_BACKGROUND_COMPILE=0 turns that off); python: the SimPy engine always; "
        "compiled: the compiled engine or an error; sim_engine in summary.parquet names the "
        "one that ran",
        choices=("auto", "python", "compiled")),
    Opt("run.stream", "bool", "replay the trace file in chunks of requests, never loading it "
        "whole (the compiled engine's evictions, next_layer_all and moe_infinity; not policies "
        "that read the future or a prediction table; same results)"),
    Opt("run.chunk_requests", "int", "requests per chunk of a streamed run", lo=1),
    Opt("max_requests", "int", "replay only the first N requests", nullable=True, lo=1),
    Opt("max_tokens", "int", "and only the first N tokens of each", nullable=True, lo=1),
    Opt("requests", "choice", "which requests: all, held_out (the predictors' test split) or "
        "auto (held_out for predictor tables, else all)", choices=("auto", "held_out", "all")),
    Opt("label", "str", "free-form run label for plots", nullable=True),
    Opt("compute_scale", "float", "what-if: every compute time x this; copies unchanged",
        lo=0.0, lo_open=True),
    Opt("placement", "str", "a routed expert not resident when its layer routes: fetch (copy "
        "and cache it), cpu_on_miss, fetch_or_cpu, static_cpu, low_precision_fetch, "
        "skip_low_weight, cpu_layers, layer_offload (policies/; docs: Policies, Placement)"),
    Opt("placement_params.threshold", "float", "low_precision_fetch, skip_low_weight: "
        "normalised gate weight below which a missed expert is fetched in low precision / "
        "skipped (null: 0.1)", nullable=True, lo=0.0, hi=1.0),
    Opt("placement_params.bits", "int", "low_precision_fetch: bits per weight of the "
        "low-precision copy, 2, 3, 4 or 8 (null: 4)", nullable=True, lo=2, hi=8),
    Opt("placement_params.layers", "int", "static_cpu: the first N MoE layers' routed experts "
        "run on the host CPU (null: the fewest that let the other layers fit in the cache)",
        nullable=True, lo=0),
    Opt("placement_params.gpu_layers", "int", "cpu_layers, layer_offload: the first N decoder "
        "layers on the GPU, dense ones included (llama.cpp's -ngl); every later layer runs "
        "whole on the host CPU (cpu_layers) or is copied in at each use (layer_offload)",
        nullable=True, lo=0),
    Opt("weights.experts_bits", "float", "bits per routed-expert weight of a quantised "
        "deployment, scales included (e.g. 2.6, 4.5); null: the model card's", nullable=True,
        lo=0.0, lo_open=True, hi=32.0),
    Opt("weights.attention_bits", "float", "bits per attention, router and dense-FFN weight; "
        "null: the model card's", nullable=True, lo=0.0, lo_open=True, hi=32.0),
    Opt("weights.shared_bits", "float", "bits per shared-expert weight; null: as the routed "
        "experts", nullable=True, lo=0.0, lo_open=True, hi=32.0),
    Opt("progress", "bool", "progress bars"),
    Opt("predictions.path", "str", "prediction table (a file, or predictor:<name>); null: the "
        "table an importer wrote beside the trace", nullable=True),
    Opt("predictions.min_coverage", "float", "fewest (request, token) rows of the replay a "
        "prediction table must cover", lo=0.0, hi=1.0),
    Opt("cache.fraction", "float", "cache size as a fraction of all routed experts",
        nullable=True, lo=0.0, lo_open=True, hi=1.0),
    Opt("cache.experts", "int", "cache size in expert slots", nullable=True, lo=1),
    Opt("cache.bytes", "int", "cache size in bytes (whole experts)", nullable=True, lo=1),
    Opt("cache.mib", "float", "cache size in MiB (2**20 B, whole experts), as engines size it",
        nullable=True, lo=0.0, lo_open=True),
    Opt("cache.sizing", "choice", "slots of a cache.fraction: round to nearest, or floor "
        "(MoE-Beyond's int())", choices=("round", "floor")),
    Opt("cache.partition", "choice", "one global pool, or equal per-layer partitions",
        choices=("global", "per_layer")),
    Opt("cache.pin_layer", "bool", "the computing layer's experts cannot be evicted (false: "
        "zero-latency only)"),
    Opt("cache.prefill", "choice", "cache contents at the start", choices=("empty", "random")),
    Opt("cache.reset_per_request", "bool", "empty the cache before every request"),
    Opt("output.transfers", "bool", "write transfers.parquet (one row per copy)"),
    Opt("output.timeline_steps", "int", "write timeline.json (Chrome trace) of the first N steps",
        lo=0),
    # experiment=validate (sim/executor): the real runs
    Opt("validate.scale", "float", "validate: hidden and intermediate sizes x this", lo=0.0,
        lo_open=True),
    Opt("validate.dtype", "choice", "validate: expert weight dtype",
        choices=("float32", "bfloat16")),
    Opt("validate.repeats", "int", "validate: real runs per config", lo=1),
    Opt("validate.backend", "choice", "validate: where experts live and compute runs",
        choices=("storage", "cuda")),
    Opt("validate.threads", "int", "validate: torch compute threads", lo=1),
    Opt("validate.copy_engines", "int", "validate: copy worker threads", lo=1),
    Opt("validate.calibrate", "bool", "validate: profile this machine right before each config"),
    Opt("validate.profile_once", "bool", "validate: calibrate once per trace, not before each "
        "config"),
    Opt("validate.pace_GBps", "float", "validate: pace every expert read to this rate (a paced "
        "slow tier; null: the disk's own speed)", nullable=True, lo=0.0, lo_open=True),
    Opt("validate.bracket_reads", "int", "validate: expert reads timed around each real run",
        lo=0),
    Opt("validate.batch", "int", "validate: requests decoded together", lo=1),
    Opt("validate.warmup_tokens", "int", "validate: tokens per request that only warm the cache",
        lo=0),
)


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, part):
            return _UNSET
        if not isinstance(node, DictConfig) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _convert(opt: Opt, value: Any) -> tuple[Any, str | None]:
    """(converted value, None) or (None, why it is not of the option's kind)."""
    if opt.kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if opt.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, "must be an integer"
        if isinstance(value, float) and not value.is_integer():
            return None, "must be a whole number"
        return int(value), None
    if opt.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, "must be a number"
        if not math.isfinite(float(value)):
            return None, "must be finite"
        return float(value), None
    if opt.kind == "choice":
        if str(value) not in opt.choices:
            return None, f"must be one of {', '.join(opt.choices)}"
        return str(value), None
    return (str(value), None) if isinstance(value, (str, int, float)) else (None, "must be text")


def _range(opt: Opt, value: float) -> str | None:
    if opt.lo is not None and (value <= opt.lo if opt.lo_open else value < opt.lo):
        return f"must be {'>' if opt.lo_open else '>='} {opt.lo:g}"
    if opt.hi is not None and value > opt.hi:
        return f"must be <= {opt.hi:g}"
    if opt.kind == "int" and value > INT_MAX:
        return f"must be <= {INT_MAX}"
    return None


def check(cfg: DictConfig) -> list[str]:
    """Every violation as ``<key>=<value>: <why>`` (empty when the config is valid)."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    # A section replaced by a scalar (``placement_params=3``, ``output=3``) would hide its
    # options from the checks below and fail later with a traceback.
    sections = dict.fromkeys(o.key.split(".")[0] for o in OPTIONS if "." in o.key)
    for section in sections:
        if section not in cfg:
            continue
        node = cfg[section]
        if node is None and section in _NULLABLE_SECTIONS:
            continue
        if not isinstance(node, DictConfig):
            keys = ", ".join(o.key.split(".", 1)[1] for o in OPTIONS
                             if o.key.startswith(section + "."))
            errors.append(f"{section}={'null' if node is None else node}: must be a mapping "
                          f"(keys: {keys})")
    plugins = cfg.get("plugins") if "plugins" in cfg else []
    if plugins is not None and not (
            isinstance(plugins, ListConfig) and all(isinstance(m, str) and m for m in plugins)):
        errors.append(f"plugins={plugins}: must be a list of module names "
                      "(plugins=[my_pkg.policies]; [] for none)")
    converted: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = _get(cfg, opt.key)
        if raw is _MISSING:
            continue
        if raw is _UNSET:
            errors.append(f"{opt.key}=???: must be set ({opt.describe()})")
            continue
        if raw is None:
            if not opt.nullable:
                errors.append(f"{opt.key}=null: must be set ({opt.describe()})")
            values[opt.key] = None
            continue
        value, why = _convert(opt, raw)
        if why is None and opt.kind in ("int", "float"):
            why = _range(opt, value)
        if why:
            errors.append(f"{opt.key}={raw}: {why}")
        else:
            values[opt.key] = value
            if type(value) is not type(raw):  # seed=1.0 runs as seed 1, recorded as 1
                converted[opt.key] = value
    sizes = [k for k in ("cache.fraction", "cache.experts", "cache.bytes", "cache.mib")
             if values.get(k) is not None]
    size_errors = any(e.startswith("cache.") for e in errors)
    if len(sizes) != 1 and not size_errors and "cache" in cfg:
        given = ", ".join(f"{k}={values[k]}" for k in sizes) or "none"
        errors.append(f"cache size: give exactly one of cache.fraction, cache.experts, "
                      f"cache.bytes, cache.mib (given: {given})")
    errors += check_trace(cfg) + check_policy(cfg)
    if not errors:
        for key, value in converted.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return errors


def _trace_configs() -> dict[str, dict[str, Any]]:
    """The named trace configs (experiments/conf/trace) by the name they record, with their
    paths resolved (they read ``$MOESIM_TRACES``)."""
    return _trace_configs_under(os.environ.get("MOESIM_TRACES"))


@functools.lru_cache(maxsize=4)
def _trace_configs_under(_traces_env: str | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(TRACE_CONF_DIR.glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if isinstance(node, dict) and node.get("name"):
            out.setdefault(str(node["name"]), node)
    return out


def check_trace(cfg: DictConfig) -> list[str]:
    """The trace that runs is the one the row names: a named trace (``trace=embedded``) reads
    its own path and format, so ``trace.path=x`` without ``trace=file`` (which ran the embedded
    trace and recorded ``x``) and a ``trace.name`` that names another trace are refused."""
    node = cfg.get("trace") if "trace" in cfg else None
    if not isinstance(node, DictConfig):
        return []
    name = node.get("name")
    if OmegaConf.is_missing(node, "path"):
        return [f"trace.path: trace={name} needs the trace file: trace={name} "
                "trace.path=<trace.parquet>"]
    if name == "file":
        return []
    known = _trace_configs()
    if name not in known:
        return [f"trace.name={name}: names no trace config ({', '.join(sorted(known))}, or "
                "trace=file trace.path=<file>); a trace is chosen with trace=<name>"]
    want = known[name]
    return [f"trace.{key}={node.get(key)}: trace={name} reads its own {key} ({want.get(key)}); "
            "another trace is trace=file trace.path=<file> (trace.format=<importer> for a "
            "raw source)"
            for key in ("path", "format") if str(node.get(key)) != str(want.get(key))]


def check_policy(cfg: DictConfig) -> list[str]:
    """``policy.name`` is the row's label, so it must name what runs: an eviction policy's
    name is its eviction (and it prefetches nothing), a prefetch policy's name its prefetch.
    ``policy=lru policy.name=belady`` ran LRU recorded as Belady, ``policy=lru
    policy.eviction=belady`` the reverse; a prefetch policy's eviction may still be swapped
    (``policy=moe_infinity policy.eviction=lru``), which the row records beside the name."""
    node = cfg.get("policy") if "policy" in cfg else None
    if not isinstance(node, DictConfig):
        return []
    from moesim.policies.registry import EVICTION, PREFETCH, discover

    discover()
    name, ev, pf = node.get("name"), node.get("eviction"), node.get("prefetch")
    if name in EVICTION:
        if ev not in (None, name):
            return [f"policy.name={name}, policy.eviction={ev}: the row would record {name} "
                    f"while {ev} runs; choose the policy with policy=<name>"]
        if pf not in (None, "none"):
            return [f"policy.name={name}, policy.prefetch={pf}: {name} prefetches nothing; "
                    f"run policy={pf} policy.eviction={name}"]
    elif name in PREFETCH and name != "none":
        if pf not in (None, name):
            return [f"policy.name={name}, policy.prefetch={pf}: the row would record {name} "
                    f"while {pf} runs; choose the policy with policy=<name>"]
    else:
        return [f"policy.name={name}: not a registered policy; a policy is chosen with "
                "policy=<name> (moesim-sim --help lists them)"]
    return []


# Fields that name what runs: chosen by their group (``policy=belady``), never set alone.
IDENTITY_KEYS = ("policy.name", "hw.name", "trace.name", "runtime.name")
# Sections whose own loader refuses an unknown key (profile schema, policy registry, cards).
_SELF_CHECKED = ("hw", "policy", "model", "runtime")


def check_overrides(overrides: list[str], groups: set[str]) -> list[str]:
    """Command-line overrides that would run something other than what the row records:
    ``policy.name=...`` (and ``hw.name``, ``trace.name``) relabel a run without changing it,
    and ``+foo=1`` adds a key nothing reads. ``groups`` are the config groups (``+experiment=``
    picks one)."""
    errors = []
    known = {o.key for o in OPTIONS}
    for text in overrides:
        key, eq, _ = text.partition("=")
        if not eq:
            continue
        plain = key.lstrip("+~")
        if plain in IDENTITY_KEYS:
            group = plain.split(".")[0]
            errors.append(f"{text}: {plain} names what runs; choose another with "
                          f"{group}=<name> (label=<text> names a run freely)")
        elif key.startswith("+") and plain not in groups and plain not in known and (
                plain.split(".")[0] not in _SELF_CHECKED):
            errors.append(f"{text}: {plain} is not a moesim-sim option (moesim-sim --help "
                          "lists them)")
    return errors


def check_unused_overrides(overrides: list[str], cfg: Any) -> list[str]:
    """Options given on the command line that the composed run would not use: recorded, they
    would say the run did something it did not (``run.chunk_requests`` without a streamed
    run)."""
    given = {o.partition("=")[0].lstrip("+~") for o in overrides}
    run = cfg.get("run") or {}
    if "run.chunk_requests" in given and not run.get("stream", False):
        return ["run.chunk_requests: applies to a streamed run only (add run.stream=true); "
                "nothing would be chunked"]
    return []


def check_warmup(warmup_tokens: int, longest_request: int) -> str | None:
    """Warm-up must leave something to count: some request longer than it."""
    if warmup_tokens and warmup_tokens >= longest_request:
        return (f"warmup_tokens={warmup_tokens}: must be shorter than the longest replayed "
                f"request ({longest_request} tokens), or nothing is counted")
    return None


def help_text(groups: dict[str, list[str]], app: str = "moesim-sim") -> str:
    """``--help``: the config groups with their choices, then every option with its doc."""
    lines = [f"{app}: simulate an MoE expert cache over a routing trace (Hydra app).", "",
             f"Usage: {app} [key=value ...]    sweep: {app} -m key=a,b ...", "",
             "Config groups (group=<choice>):"]
    for group, names in sorted(groups.items()):
        shown = ", ".join(names[:14]) + (f", ... ({len(names)} in all)" if len(names) > 14 else "")
        lines.append(f"  {group:<11} {shown}")
    lines += ["", "Options (key=value; checked before a run starts):"]
    width = max(len(o.key) for o in OPTIONS) + 2
    for o in OPTIONS:
        lines.append(f"  {o.key:<{width}}{o.describe()}")
        lines.append(f"  {'':<{width}}  {o.doc}")
    lines += ["", "Policy parameters: policy=<name> policy.<param>=<value> (docs: Policies).",
              "Plugins: installed ones load by entry point; plugins=[module,...] imports more "
              "first.",
              "Show the composed config: --cfg job;  Hydra's own flags: --hydra-help."]
    return "\n".join(lines)

