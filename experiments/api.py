"""The Python API: ``moesim.simulate(trace, policy, hw, cache=...)`` -> one summary row.

A run here is a run of ``moesim-sim``: the same config (composed from experiments/conf with
Hydra's compose API, so every default, group and interpolation is the app's), the same option
checks (experiments/schema.py), the same trace, profile and policy resolution and the same
:func:`moesim.experiments.sim_app.run`; the row has the columns and meanings of the app's
``summary.parquet`` (config choices flattened, ``config_hash``, provenance, then every metric).
No Hydra app runs, no working directory changes and nothing is written unless ``outdir`` is
given. Bad input raises :class:`InputError` (a ValueError) whose message is the line the CLI
prints after ``error:``.

Imported lazily by ``moesim/__init__.py`` (``import moesim`` stays fast and never loads torch;
the embedded trace's first use does, to run the small model once).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas, hydra and the simulator load on the first call, not on import
    import pandas as pd
    from omegaconf import DictConfig

    from moesim.traces.trace import Trace

SIZE_KEYS = ("fraction", "experts", "bytes", "mib")
GROUPS = ("trace", "hw", "policy", "model", "predictor")


class InputError(ValueError):
    """Bad input to :func:`simulate`: the message is what ``moesim-sim`` prints after
    ``error:`` (several problems are joined with ``; ``; ``lines`` keeps them apart)."""

    def __init__(self, lines: str | Sequence[str]) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("; ".join(self.lines))


@dataclass(frozen=True)
class _Prepared:
    """A checked config and how to label its trace in the result row."""

    cfg: DictConfig
    trace_name: str | None  # overrides trace.name in the row (a trace passed as an object)


def list_policies() -> list[str]:
    """Names accepted as ``policy`` (``policy=<name>`` on the command line)."""
    from moesim.policies.registry import policy_names

    return policy_names()


def list_profiles() -> list[str]:
    """Hardware profiles shipped in hw_profiles/ (``hw=<name>``); a path to a YAML works too."""
    from moesim.hw_profiles import list_profiles as names

    return names()


def list_traces() -> list[str]:
    """Named traces (experiments/conf/trace): ``embedded`` needs nothing; the real ones are
    read from ``$MOESIM_TRACES`` (default ``../shared/traces``)."""
    return [n for n in _group("trace") if n != "file"]  # trace=file is a path given here


def load_trace(
    trace: str | PathLike[str] | Mapping[str, Any] = "embedded",
    *,
    max_requests: int | None = None,
    max_tokens: int | None = None,
) -> Trace:
    """A trace by name (``"embedded"``, ``"deepseek_v2_lite"``, ...), by path (a moesim
    ``.parquet`` trace) or as ``{"path": ..., "format": ...}`` for a raw source (imported once
    into the cache, as the app does); only the first ``max_requests`` are decoded."""
    from moesim.experiments.inputs import trace_file
    from moesim.traces import TraceError
    from moesim.traces import load_trace as read

    for key, value in (("max_requests", max_requests), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InputError(f"{key}={value!r}: must be a whole number >= 1 (or None)")
    prep = _prepare(trace, None, None, None, {})
    node = prep.cfg.trace
    try:
        path = trace_file(node.path, node.get("format"))
        out = read(path, max_requests=max_requests)
    except TraceError as exc:
        raise InputError(str(exc)) from None
    return out.subset(max_requests, max_tokens) if max_tokens is not None else out


def simulate(
    trace: str | PathLike[str] | Mapping[str, Any] | Trace | None = None,
    policy: str | Mapping[str, Any] | None = None,
    hw: str | PathLike[str] | Mapping[str, Any] | None = None,
    *,
    cache: float | int | Mapping[str, Any] | None = None,
    model: str | Mapping[str, Any] | None = None,
    predictor: str | None = None,
    outdir: str | PathLike[str] | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Simulate one run; returns its one-row summary table (``summary.parquet``'s columns).

    Args:
        trace: a trace name (:func:`list_traces`), a path to a ``.parquet`` trace, a mapping
            ``{"path": ..., "format": ...}`` for a raw source, or a loaded
            :class:`~moesim.traces.trace.Trace`. None: the app's default (the embedded trace).
        policy: a policy name (:func:`list_policies`) or ``{"name": ..., <param>: ...}``.
            None: the app's default (LRU).
        hw: a profile name (:func:`list_profiles`), a path to a profile YAML, or a mapping
            like a profile file's. None: the app's default (V100-PCIe).
        cache: the cache size: a float is ``cache.fraction`` of all routed experts, an int
            ``cache.experts`` slots, a mapping any ``cache.*`` options (``{"bytes": 8e9,
            "partition": "per_layer"}``); the size given replaces the default 25 %.
        model: a model card name or mapping (None: the card the trace names).
        predictor: a predictor group (``predictor=<name>``: its policy and prediction table).
        outdir: also write the app's outputs (summary.parquet, per_layer.parquet, ...) here.
        options: any other ``moesim-sim`` option by its key (``mode="zero_latency"``,
            ``batch=8``, ``max_requests=10``, ``progress=True``; nested as mappings,
            ``predictions={"path": ...}``, or dotted, ``**{"predictions.path": ...}``;
            ``placement={"name": ..., <param>: ...}`` is ``placement`` plus
            ``placement_params``; ``runtime="hqq_offload"`` a runtime profile by name, or a
            mapping like a runtime YAML). ``progress`` defaults to False here. ``plugins=[module,
            ...]`` imports modules first (out-of-tree policies, ...), as ``moesim-sim
            plugins=[...]``; installed plugins load by entry point anyway.

    Raises:
        InputError: an unknown name or option, a value the schema rejects, a missing file,
            a trace that does not fit the model card, ...: the CLI's one-line message.
    """
    prep = _prepare(trace, policy, hw, cache, {"model": model, "predictor": predictor,
                                               **options})
    out = None
    if outdir is not None:  # made now, as moesim-sim's run folder: not after the run
        out = Path(outdir).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"outdir {out}: cannot create the folder ({exc.strerror})") from None
    return _run(prep, out)


def sweep(
    trace: Any = None,
    policy: Any = None,
    hw: Any = None,
    *,
    cache: Any = None,
    outdir: str | PathLike[str] | None = None,
    n_jobs: int = 1,
    progress: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """Every combination of the arguments given as lists (or tuples), as :func:`simulate`
    runs; returns their rows concatenated, in grid order (the last list varies fastest).

    ``moesim.sweep(policy=["lru", "belady"], cache=[0.1, 0.25])`` is four runs. Every config
    is composed and checked before the first run, so a bad value fails the whole call at once
    and nothing has run.

    Args:
        outdir: write each run into its own folder below this one, as ``moesim-sim -m`` does
            (``<n>_<key=value,...>/`` with ``summary.parquet``, ``per_layer.parquet``, ...,
            ``status.json`` and the config in ``.hydra/config.yaml``): ``moesim-plot outdir``
            reads it, and a second call with the same outdir skips every run whose folder
            holds a finished run of the same config hash (its row is read back).
        n_jobs: runs in parallel in that many worker processes (joblib, like
            ``hydra/launcher=joblib``; -1: one per CPU). A policy registered in this process
            (a plugin, or a class defined in a notebook) is sent to the workers.
        progress: one bar over the runs.
    """
    given = {"trace": trace, "policy": policy, "hw": hw, "cache": cache, **options}
    axes = {k: list(v) for k, v in given.items()
            if isinstance(v, (list, tuple)) and k != "plugins"}
    if any(not v for v in axes.values()):
        raise InputError(f"sweep: empty list for {', '.join(k for k, v in axes.items() if not v)}")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise InputError(f"n_jobs={n_jobs!r}: must be a whole number >= 1 (or -1: every CPU)")
    fixed = {k: v for k, v in given.items() if k not in axes}
    preps, names, memo = [], [], {}
    for i, combo in enumerate(itertools.product(*axes.values())):
        chosen = dict(zip(axes, combo, strict=True))
        args = {**fixed, **chosen}
        preps.append(_prepare(args.pop("trace"), args.pop("policy"), args.pop("hw"),
                              args.pop("cache"), args, memo))
        names.append(_run_dirname(i, chosen))
    root = None
    if outdir is not None:
        root = Path(outdir).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"outdir {root}: cannot create the folder ({exc.strerror})") from None
    import pandas as pd
    from tqdm import tqdm

    dirs = [None if root is None else root / n for n in names]
    bar = tqdm(total=len(preps), desc="runs", unit="run", disable=not progress)
    if n_jobs == 1 or len(preps) == 1:
        rows = []
        for prep, run_dir in zip(preps, dirs, strict=True):
            rows.append(_run_in_dir(prep, run_dir))
            bar.update()
    else:
        from joblib import Parallel, delayed

        foreign = _foreign_classes()
        jobs = (delayed(_run_in_worker)(prep, run_dir, foreign)
                for prep, run_dir in zip(preps, dirs, strict=True))
        rows = []
        for row in Parallel(n_jobs=n_jobs, return_as="generator")(jobs):
            rows.append(row)
            bar.update()
    bar.close()
    return pd.concat(rows, ignore_index=True)


def _run_dirname(num: int, chosen: Mapping[str, Any]) -> str:
    """``<n>_<key=value,...>``: ``moesim-sim -m``'s run folder name (``hydra.job.num`` and the
    sorted overrides), from the arguments that vary."""
    from moesim.experiments.paths import safe_dirname

    def text(value: Any) -> str:
        if isinstance(value, Mapping):
            return str(value.get("name", "")) if set(value) == {"name"} else json.dumps(
                dict(value), sort_keys=True, default=str)
        return str(value)

    return f"{num}_{safe_dirname(','.join(f'{k}={text(v)}' for k, v in sorted(chosen.items())))}"


def _run_in_dir(prep: _Prepared, run_dir: Path | None) -> pd.DataFrame:
    """One run of a sweep; with a folder, skipped when it holds this config's finished run."""
    if run_dir is None:
        return _run(prep, None)
    from omegaconf import OmegaConf

    from moesim.experiments import sim_app
    from moesim.experiments.sweep_summary import write_status

    run_dir.mkdir(parents=True, exist_ok=True)
    with sim_app.run_lock(run_dir):
        sim_app.remove_stale_temporaries(run_dir)
        try:
            digest = sim_app.config_hash(prep.cfg, sim_app.input_digest(prep.cfg))
        except sim_app.USER_ERRORS as exc:
            raise InputError(str(exc)) from None
        done = sim_app.finished(run_dir, digest)
        if done is not None:
            write_status(run_dir, "skipped")
            return done
        (run_dir / "summary.parquet").unlink(missing_ok=True)  # another config's
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(prep.cfg, run_dir / ".hydra" / "config.yaml")
        return _run(prep, run_dir, digest)


def _foreign_classes() -> dict[str, dict[str, type]]:
    """Registered policy and placement classes that are not moesim's own (plugins, classes
    defined in a notebook or script): a worker process re-registers them (cloudpickle sends a
    class defined in ``__main__`` by value, an importable one by reference)."""
    from moesim.policies import registry

    registry.discover()
    out: dict[str, dict[str, type]] = {}
    for kind, table in (("eviction", registry.EVICTION), ("prefetch", registry.PREFETCH),
                        ("placement", registry.PLACEMENT)):
        out[kind] = {name: cls for name, cls in table.items()
                     if not cls.__module__.startswith("moesim.")}
    return out


def _run_in_worker(prep: _Prepared, run_dir: Path | None,
                   foreign: dict[str, dict[str, type]]) -> pd.DataFrame:
    from moesim.policies import registry

    registry.discover()
    for kind, table in (("eviction", registry.EVICTION), ("prefetch", registry.PREFETCH),
                        ("placement", registry.PLACEMENT)):
        for name, cls in foreign.get(kind, {}).items():
            table.setdefault(name, cls)
    return _run_in_dir(prep, run_dir)


def plot(
    table_or_dir: pd.DataFrame | str | PathLike[str],
    out: str | PathLike[str] | None = None,
    *,
    x: str | None = None,
    hue: str | None = None,
    style: str | None = None,
    col: str | None = None,
    row: str | None = None,
    metrics: Sequence[str] | None = None,
    yscale: str = "auto",
    relative_to: str | None = None,
    where: Sequence[str] = (),
    formats: Sequence[str] = ("png", "pdf"),
    stem: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """``moesim-plot``'s figure of a sweep: from a table (rows of :func:`sweep` or
    :func:`simulate`, concatenated) or a folder of runs (``moesim-sim -m`` or
    ``sweep(outdir=...)``); returns the files written.

    The roles (``x``, ``hue``, ``style``, ``col``, ``row``), ``metrics``, ``yscale``,
    ``relative_to`` (a level of ``hue`` to divide by) and ``where`` (``"key=value"`` filters)
    are ``moesim-plot``'s ``--x``, ... options with the same defaults: roles not given are
    chosen from what varies. ``out`` is the folder (default: the runs' folder; required for a
    table); files are ``<out>/<stem>.<format>``. A folder's per-request tables give the
    confidence intervals, as in ``moesim-plot``. Bad input raises :class:`InputError`.
    """
    import pandas as pd

    from moesim.experiments import plot as mp

    per_request = None
    try:
        if isinstance(table_or_dir, pd.DataFrame):
            if out is None:
                raise InputError("plot: give out= (a folder) for a table")
            df = table_or_dir
        else:
            folder = Path(table_or_dir).expanduser()
            if not folder.is_dir():
                raise InputError(f"plot: {folder} is not a folder of runs")
            df = mp.collect(folder)
            per_request = mp.collect_per_request(folder)
            out = folder if out is None else out
        bad = [f for f in formats if f not in mp.FORMATS]
        if bad:
            raise InputError(f"plot: formats {bad}: choose from {', '.join(mp.FORMATS)}")
        rows = mp.apply_where(df, list(where))
        spec = mp.choose_spec(rows, x=x, hue=hue, style=style, col=col, row=row,
                              metrics=list(metrics) if metrics else None, yscale=yscale,
                              relative=relative_to)
        return mp.plot_spec(rows, spec, Path(out).expanduser(), stem, formats=tuple(formats),
                            per_request=per_request, seed=seed)
    except (mp.PlotError, FileNotFoundError) as exc:
        raise InputError(str(exc)) from None


# --- config: the app's, composed without running an app ---------------------------------


@contextmanager
def _compose_context() -> Iterator[None]:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moesim.experiments.configs import CONF_DIR, register_configs

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a compose block
        raise InputError("moesim.simulate cannot run inside a Hydra app; call "
                         "moesim.experiments.sim_app.run(cfg) there")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                               job_name="moesim_api"):
        yield


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _is_path(value: Any) -> bool:
    if isinstance(value, PathLike):
        return True
    text = str(value)
    return "/" in text or text.endswith((".parquet", ".yaml", ".yml")) or Path(text).exists()


def _trace_choice(trace: Any) -> tuple[list[str], dict[str, Any], str | None]:
    """Overrides, values and the row's trace name for the ``trace`` argument."""
    from moesim.traces.trace import Trace

    if trace is None:
        return [], {}, None
    if isinstance(trace, Trace):
        return ["trace=file"], {"trace.path": str(_trace_as_file(trace))}, \
            f"loaded:{trace.meta.model}"
    if isinstance(trace, Mapping):
        values = {f"trace.{k}": v for k, v in trace.items() if k != "name"}
        if "trace.path" not in values:
            raise InputError("trace: a mapping needs 'path' (and 'format' for a raw source)")
        values.setdefault("trace.format", None)
        return ["trace=file"], values, trace.get("name")
    if not isinstance(trace, (str, PathLike)):
        raise InputError(f"trace: expected a name, a path or a Trace, got {type(trace).__name__}")
    names = list_traces()
    if not isinstance(trace, PathLike) and trace in names:
        return [f"trace={trace}"], {}, None
    if not _is_path(trace):
        raise InputError(f"trace: {trace!r} is neither a trace name ({', '.join(names)}) nor "
                         "a path to a trace file")
    from moesim.experiments.paths import resolve_path

    path = resolve_path(trace)
    return ["trace=file"], {"trace.path": str(path),
                            "trace.format": "parquet" if path.suffix == ".parquet" else None}, None


def _trace_as_file(trace: Trace) -> Path:
    """A trace passed as an object goes through the same file-based path as a named one: it
    is written once into the cache, keyed by its content (meta and every routing array)."""
    import numpy as np

    from moesim.experiments.inputs import cache_dir
    from moesim.traces import write_trace
    from moesim.traces.cache import entry_lock

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(asdict(trace.meta), sort_keys=True, default=str).encode())
    for r in trace.requests:
        h.update(f"{r.request_id}|{r.label}|{r.tokens}".encode())
        for arr in (r.experts, r.phase, r.scores):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
    out = cache_dir() / "traces" / f"loaded-{h.hexdigest()}.parquet"
    if not out.is_file():
        with entry_lock(out):
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                write_trace(out, trace.meta, trace.requests)
    return out


def _hw_choice(hw: Any) -> tuple[list[str], Mapping[str, Any] | None]:
    from moesim import hw_profiles

    if hw is None:
        return [], None
    if isinstance(hw, Mapping):
        try:
            hw_profiles.profile_from_mapping(hw, name=str(hw.get("name", "hw")))
        except hw_profiles.ProfileError as exc:
            raise InputError(str(exc)) from None
        return [], dict(hw)
    if not isinstance(hw, (str, PathLike)):
        raise InputError(f"hw: expected a profile name or path, got {type(hw).__name__}")
    if not isinstance(hw, PathLike) and hw in hw_profiles.list_profiles():
        return [f"hw={hw}"], None
    if not _is_path(hw):
        raise InputError(f"hw: unknown profile {hw!r}; known profiles: "
                         f"{', '.join(hw_profiles.list_profiles())} (or a path to a YAML)")
    import yaml

    from moesim.experiments.paths import resolve_path

    path = resolve_path(hw)
    try:
        hw_profiles.load_profile(path)  # the strict check: provenance for every number
    except hw_profiles.ProfileError as exc:
        raise InputError(str(exc)) from None
    return [], yaml.safe_load(path.read_text(encoding="utf-8"))


def _runtime_choice(runtime: Any, overrides: list[str]) -> Mapping[str, Any] | None:
    """``runtime=``: a runtime profile name (the config group, as ``moesim-sim
    runtime=<name>``; appended to ``overrides``) or a mapping like a runtime YAML (checked
    now, returned to replace the group's node)."""
    from moesim.hw_profiles import ProfileError
    from moesim.hw_profiles.runtime import list_runtimes, runtime_from_mapping

    if runtime is None:
        return None
    if isinstance(runtime, Mapping):
        try:
            runtime_from_mapping(runtime, "runtime")
        except ProfileError as exc:
            raise InputError(str(exc)) from None
        return dict(runtime)
    if not isinstance(runtime, str):
        raise InputError(f"runtime: expected a runtime profile name or mapping, got "
                         f"{type(runtime).__name__}")
    overrides.append(f"runtime={_known('runtime', runtime, list_runtimes())}")
    return None


def _cache_values(cache: Any) -> dict[str, Any]:
    if cache is None:
        return {}
    if isinstance(cache, bool):
        raise InputError(f"cache={cache}: expected a fraction, a number of experts or a mapping")
    if isinstance(cache, float):
        cache = {"fraction": cache}
    elif isinstance(cache, int):
        cache = {"experts": cache}
    if not isinstance(cache, Mapping):
        raise InputError(f"cache={cache!r}: expected a fraction, a number of experts or a mapping")
    values = {f"cache.{k}": v for k, v in cache.items()}
    if any(k in cache for k in SIZE_KEYS):  # the size given replaces the default one
        values.update({f"cache.{k}": None for k in SIZE_KEYS if k not in cache})
    return values


def _group(name: str) -> list[str]:
    from moesim.experiments.configs import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))


def _model_names() -> list[str]:
    from moesim.traces.model_card import list_cards

    return list_cards()


def _known(what: str, name: str, names: list[str]) -> str:
    if name not in names:
        raise InputError(f"{what}: unknown {what} {name!r}; known: {', '.join(names)}")
    return name


def _prepare(trace: Any, policy: Any, hw: Any, cache: Any, options: dict[str, Any],
             memo: dict[tuple[str, ...], DictConfig] | None = None) -> _Prepared:
    """The run's config as ``moesim-sim`` would compose it, checked like the app checks it
    (``memo``: configs already composed for the same group choices, within one sweep)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from moesim.experiments.schema import check

    plugins = options.get("plugins")
    if plugins:  # before the policy name is looked up: they may register it
        from moesim.plugins import PluginError, import_modules

        if isinstance(plugins, str) or not isinstance(plugins, Sequence):
            raise InputError(f"plugins={plugins!r}: must be a list of module names")
        options["plugins"] = list(plugins)
        try:
            import_modules(plugins)
        except PluginError as exc:
            raise InputError(str(exc)) from None
    overrides, values, trace_name = _trace_choice(trace)
    hw_overrides, hw_node = _hw_choice(hw)
    overrides += hw_overrides
    params: dict[str, Any] = {}
    if isinstance(policy, Mapping):
        params = {k: v for k, v in policy.items() if k != "name"}
        policy = policy.get("name")
    if policy is not None:
        if policy not in list_policies():
            raise InputError(f"policy {policy!r} is not registered; known: "
                             f"{', '.join(list_policies())}")
        overrides.append(f"policy={policy}")
    model, predictor = options.pop("model", None), options.pop("predictor", None)
    if isinstance(model, str):
        overrides.append(f"model={_known('model', model, _model_names())}")
    elif model is not None:
        values["model"] = dict(model)
    if predictor is not None:
        overrides.append(f"predictor={_known('predictor', predictor, _group('predictor'))}")
    runtime_node = _runtime_choice(options.pop("runtime", None), overrides)
    place = options.get("placement")
    if isinstance(place, Mapping):  # {"name": ..., <param>: ...}, as policy and sim.simulate
        if place.get("name") is None:
            raise InputError("placement: a mapping needs 'name' (a placement) and its "
                             "parameters")
        given = options.get("placement_params")
        own = {k: v for k, v in place.items() if k != "name"}
        options["placement"] = place["name"]
        if own and (given is None or isinstance(given, Mapping)):  # else: the schema's line
            options["placement_params"] = {**(given or {}), **own}
    options.setdefault("progress", False)
    flat: dict[str, Any] = {}
    _flatten("", options, flat)
    for key in flat:
        head = key.split(".")[0]
        if head == "hydra":
            raise InputError(f"{key}: Hydra's settings do not apply here (no app runs)")
        if head in GROUPS:
            raise InputError(f"{key}: give {head} as its own argument (a name, path or mapping)")
    values.update(_cache_values(cache))
    values.update(flat)
    key = tuple(overrides)
    if memo is not None and key in memo:
        cfg = copy.deepcopy(memo[key])
    else:
        try:
            with _compose_context():
                cfg = compose("config", overrides=overrides)
        except HydraException as exc:  # a group choice that does not exist
            raise InputError(str(exc).splitlines()[0]) from None
        if memo is not None:
            memo[key] = copy.deepcopy(cfg)
    with open_dict(cfg):
        if hw_node is not None:
            cfg.hw = OmegaConf.create(dict(hw_node))
        if runtime_node is not None:
            cfg.runtime = OmegaConf.create(dict(runtime_node))
        if isinstance(values.get("model"), dict):
            cfg.model = OmegaConf.create(values.pop("model"))
        for key, value in params.items():  # the registry rejects unknown ones (like the CLI)
            cfg.policy[key] = value
    for key, value in values.items():
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException:
            raise InputError(f"{key}: not a moesim-sim option") from None
    if errors := check(cfg):
        raise InputError(errors)
    if cfg.get("validate") is not None:
        raise InputError("experiment=validate runs real executions: use moesim-sim")
    return _Prepared(cfg, trace_name)


# --- running: sim_app's own steps ------------------------------------------------------------


def _run(prep: _Prepared, outdir: Path | None, digest: str | None = None) -> pd.DataFrame:
    import pandas as pd

    from moesim.experiments import sim_app
    from moesim.experiments.sweep_summary import write_status

    cfg = prep.cfg
    try:
        if digest is None:
            digest = sim_app.config_hash(cfg, sim_app.input_digest(cfg))
        result, row = sim_app.run_recorded(cfg, digest)
    except sim_app.USER_ERRORS as exc:
        if outdir is not None:
            write_status(outdir, "failed", str(exc))
        raise InputError(str(exc)) from None
    if prep.trace_name is not None:
        row["trace.name"] = prep.trace_name
    if outdir is not None:  # as moesim-sim writes: all outputs, or on a failure none of them
        failed = sim_app.write_run(result, row, outdir)
        if failed is not None:
            write_status(outdir, "failed", failed)
            raise InputError(failed)
        write_status(outdir, "done")
    return pd.DataFrame([{**row, **result.summary}])
