"""``moesim-sim``: one simulation run (or a sweep with ``-m``) as a Hydra app.

The Hydra entry point is thin: :func:`run` takes a plain config and returns the result, and
:func:`write_outputs` writes ``summary.parquet`` (one row: every config choice flattened plus
every metric), ``per_layer.parquet`` and ``per_request.parquet`` (one row per request: output
tokens, time, time per output token) into the run directory, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.inputs import (
    hw_profile,
    load_run_predictions,
    load_run_trace,
    model_card,
    open_run_predictions,
    replays_held_out,
    run_trace_file,
    sweep_input_hashes,
    with_card_bytes,
)
from moesim.experiments.paths import resolve_path, sweep_workers_die_with_parent
from moesim.experiments.provenance import package_version, provenance
from moesim.experiments.schema import check as check_config
from moesim.experiments.schema import check_overrides, check_unused_overrides, check_warmup
from moesim.experiments.sweep_summary import write_status
from moesim.extras import MissingExtra, as_missing_extra
from moesim.hw_profiles import ProfileError
from moesim.hw_profiles.runtime import (
    RuntimeProfile,
    apply_runtime,
    apply_runtime_cpu,
    load_runtime,
    runtime_from_mapping,
)
from moesim.plugins import PluginError, import_modules, load_plugins, plugins_from_argv
from moesim.policies.base import Knowledge, PolicyError
from moesim.policies.registry import resolve, resolve_placement
from moesim.predictors.data import PredictorError
from moesim.traces import TraceError
from moesim.traces.cache import ProcessMemo, entry_lock
from moesim.traces.model_card import ModelCardError
from moesim.traces.store import atomic_path

if TYPE_CHECKING:  # the simulator (numba) and pandas load in the process that runs, not in a
    # sweep's parent or for --help (about 2.5 CPU-s): see run(), write_outputs(), finished()
    import pandas as pd

    from moesim.sim.metrics import RunResult


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are the user's input, not a bug: one error line, no traceback."""
    from moesim.sim import SimulationError
    from moesim.sim.workload import WorkloadError

    return (
        SimulationError, TraceError, ProfileError, PolicyError, ModelCardError, WorkloadError,
        PredictorError, MissingExtra, PluginError,
    )


def __getattr__(name: str) -> Any:
    if name == "USER_ERRORS":  # sim_app.USER_ERRORS, as before: built on first use
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(cfg: DictConfig) -> tuple[RunResult, dict[str, Any]]:
    """Simulate the configured run; returns the result and the flat config row."""
    from moesim.sim import SimulationError, capacity_slots, dense_layers_before, simulate
    from moesim.sim.hardware import host_side

    # Plugins first, in whatever process runs this (a joblib worker, a submitit job): entry
    # points and plugins=[...] modules register their policies, profiles, importers.
    load_plugins(cfg.get("plugins") or ())
    stream = stream_options(cfg)
    trace = stream_outline(cfg) if stream.enabled else run_trace(cfg)
    if not len(trace):
        raise TraceError("the replay has no requests (check requests=, max_requests=)")
    longest = trace.longest if stream.enabled else max(len(r.experts) for r in trace.requests)
    if why := check_warmup(int(cfg.warmup_tokens), longest):
        raise SimulationError(why)
    card = model_card(cfg, trace)
    card = card.with_weights(**_weights(cfg))
    trace = (dc_replace(trace, meta=dc_replace(trace.meta, expert_bytes=card.expert_bytes))
             if stream.enabled else with_card_bytes(trace, card))
    meta = trace.meta
    total = meta.num_moe_layers * meta.num_experts
    c = cfg.cache
    capacity = capacity_slots(
        total, card.expert_bytes, fraction=c.get("fraction"), experts=c.get("experts"),
        nbytes=c.get("bytes") if c.get("mib") is None else int(float(c["mib"]) * 2**20),
        sizing=c.get("sizing", "round"),
    )
    timed = cfg.mode == "timed"
    policy = OmegaConf.to_container(cfg.policy, resolve=True)
    predictions = None
    if resolve(policy).needs(Knowledge.PREDICTIONS):
        predictions = (open_run_predictions(cfg, meta) if stream.enabled
                       else load_run_predictions(cfg, trace))
    # Zero-latency runs may drop layer pinning (MoE-Beyond's protocol has none); a timed GPU
    # always keeps the computing layer's experts.
    pin_layer = bool(c.pin_layer) or timed
    placement = resolve_placement(cfg.get("placement"), _placement_params(cfg))
    link = compute = None
    host = None
    if not placement.is_default:  # activations and weight width; the CPU from the profile
        host = host_side(None, card)
    rt = run_runtime(cfg)
    if timed:
        profile = hw_profile(cfg)
        link = profile.expert_link()
        compute = profile.compute_model(card)
        if not placement.is_default:  # the runtime's CPU expert kernels, where it has some
            host = apply_runtime_cpu(rt, host_side(profile, card), f"{profile.name} host_cpu")
        link, compute = apply_runtime(rt, link, compute, card,
                                      lambda: profile.host_link_model("pageable"))
        scale = float(cfg.get("compute_scale", 1.0))
        if scale != 1.0:  # what-if: slower compute than the profile's (framework overhead)
            from moesim.hw_profiles.compute import ScaledCompute

            try:
                compute = ScaledCompute(compute, scale)
            except ValueError as exc:
                raise ProfileError(f"compute_scale: {exc}") from None
    engine = _engine(cfg, trace, stream.enabled)
    sim_cpu0 = time.process_time()  # run.sim_cpu_s: the simulation alone (a sweep's overhead
    result = simulate(                # is run.cpu_s minus this, and the rest of the process)
        trace,
        policy,
        capacity=capacity,
        mode=cfg.mode,
        link=link,
        compute=compute,
        partition=c.partition,
        pin_layer=pin_layer,
        prefill=c.prefill,
        reset_per_request=c.reset_per_request,
        replay=cfg.replay,
        batch=cfg.batch,
        prefill_chunk=cfg.prefill_chunk,
        warmup_tokens=cfg.warmup_tokens,
        warmup_extra_row=bool(cfg.get("warmup_extra_row", False)),
        seed=cfg.seed,
        record_transfers=bool(cfg.output.transfers) and timed,
        timeline_steps=int(cfg.output.timeline_steps) if timed else 0,
        progress=bool(cfg.progress) and not _parallel_sweep(),
        dense_before=dense_layers_before(meta.moe_layers, card.num_layers),
        predictions=predictions,
        engine=engine,
        placement=placement,
        host=host,
        staging=rt.staging_buffers if timed else 0,
        stream=stream,
    )
    sim_cpu_s = time.process_time() - sim_cpu0
    row = flat_config(cfg)
    if not cfg.get("plugins"):  # the column appears only when plugins=[...] was given
        row.pop("plugins", None)
    row.update({
        "model.name": card.name,
        "cache.slots": capacity,
        "cache.pin_layer_effective": pin_layer,
        "cache.capacity_fraction": capacity / total,
        "cache.capacity_bytes": capacity * card.expert_bytes,
        "expert_bytes": card.expert_bytes,
        "runtime.name": rt.name,
        "runtime.model": rt.describe() if timed and not rt.is_none else "none",
        "trace.requests": len(trace),
        "trace.tokens": trace.num_tokens,
    })
    row.update(effective_values(cfg, trace, longest))
    if timed:
        row["link.expert_transfer_s"] = link.transfer_time(card.expert_bytes)
    if host is not None and host.cpu is not None:
        row["host_cpu.expert_time_s"] = host.cpu.expert_time(1)
        row["host_cpu.parallel"] = int(host.cpu.parallel)
        row["host_cpu.source"] = str(host.cpu.source)
    row["run.sim_cpu_s"] = round(sim_cpu_s, 3)
    return result, row


def _weights(cfg: DictConfig) -> dict[str, Any]:
    """The ``weights`` section (bits per weight per component; absent or null: the card's)."""
    node = cfg.get("weights")
    if node is None:
        return {}
    data = OmegaConf.to_container(node, resolve=True)
    return {k: data.get(k) for k in ("experts_bits", "attention_bits", "shared_bits")}


def run_runtime(cfg: DictConfig) -> RuntimeProfile:
    """The run's runtime profile (``runtime=<name>``; absent: ``none``)."""
    node = cfg.get("runtime")
    if node is None:
        return load_runtime("none")
    if isinstance(node, str):
        return load_runtime(node)
    data = OmegaConf.to_container(node, resolve=True)
    return runtime_from_mapping(data, where=f"runtime {data.get('name', '?')!r}")


def effective_values(cfg: DictConfig, trace: Any, longest: int | None = None
                     ) -> dict[str, Any]:
    """What ran where it differs from what was asked: a ``batch`` above the replayed requests
    decodes them all at once, ``max_requests``/``max_tokens`` above the trace's take what it
    has. The row records the effective value; the asked one stays beside it as
    ``<key>_requested`` (only then)."""
    if longest is None:
        longest = max(len(r.experts) for r in trace.requests)
    ran = {"batch": min(int(cfg.batch), len(trace)), "max_requests": len(trace),
           "max_tokens": longest}
    out: dict[str, Any] = {}
    for key, value in ran.items():
        asked = cfg.get(key)
        if asked is not None and int(asked) != value:
            out[key], out[f"{key}_requested"] = value, int(asked)
    return out


# Traces loaded in this process, by content: a sweep worker running many configs on one trace
# decodes it once (about 1 CPU-s for the DeepSeek training trace), not once per run.
LOADED_TRACES = ProcessMemo(size=2)


def run_trace(cfg: DictConfig) -> Any:
    """The run's trace (:func:`load_run_trace`), from :data:`LOADED_TRACES` when this process
    already loaded it. The key is everything that chooses what is loaded: the content hash of
    the trace file and of a prediction table (:func:`input_digest`; a table's notes or a
    predictor's split choose the replayed requests), ``requests``, ``max_requests`` and
    ``max_tokens``; a rewritten trace file has another hash, so it is loaded anew."""
    node = cfg.get("predictions") or {}
    key = (input_digest(cfg), str(cfg.get("requests") or "auto"), str(node.get("path")),
           cfg.get("max_requests"), cfg.get("max_tokens"))
    return LOADED_TRACES.get(key, lambda: load_run_trace(cfg))


def stream_options(cfg: DictConfig) -> Any:
    """``run.stream`` / ``run.chunk_requests`` as the typed ``sim.stream.StreamOptions``."""
    from moesim.sim.stream import DEFAULT_CHUNK_REQUESTS, StreamOptions

    node = cfg.get("run") or {}
    return StreamOptions(bool(node.get("stream", False)),
                         int(node.get("chunk_requests", DEFAULT_CHUNK_REQUESTS)))


def stream_outline(cfg: DictConfig) -> Any:
    """A streamed run's trace: its file's outline (``sim.stream.TraceOutline``), never its
    routing; request selections a streamed run cannot make are refused by name."""
    from moesim.sim import SimulationError
    from moesim.sim.stream import TraceOutline

    if cfg.get("max_tokens") is not None:
        raise SimulationError("run.stream: max_tokens is not streamed (whole requests only)")
    which = str(cfg.get("requests") or "auto")
    if which == "held_out" or (which == "auto" and replays_held_out(cfg)):
        raise SimulationError(f"run.stream: requests={which} replays a subset of the "
                              "requests (a predictor's held-out ones), which is not streamed "
                              "(every request of the file, or the first max_requests: "
                              "requests=all)")
    return TraceOutline.read(run_trace_file(cfg), cfg.get("max_requests"))


def _placement_params(cfg: DictConfig) -> dict[str, Any]:
    node = cfg.get("placement_params")
    if node is None:
        return {}
    return dict(OmegaConf.to_container(node, resolve=True))


def _engine(cfg: DictConfig, trace: Any, streamed: bool) -> str:
    """The configured engine, except for a small run (alone or in a sweep) while the kernels are
    not compiled yet: SimPy (the same results) and one background compile
    (``sim.compiled.warm``), so that a first run or sweep does not wait ~40 s for the compiler.
    ``sim_engine`` records what ran."""
    engine = str(cfg.get("engine", "auto"))
    if streamed or engine != "auto" or not HydraConfig.initialized():
        return engine  # a library call compiles in its process
    from moesim.sim.compiled import warm

    kind: warm.RunKind = "run" if HydraConfig.get().mode == RunMode.RUN else "sweep"
    accesses = trace.num_tokens * trace.meta.num_moe_layers * trace.meta.top_k
    chosen = warm.cold_start_engine(engine, accesses, kind)
    if chosen == engine:
        return engine
    state = warm.start(once=kind == "sweep")
    if state in ("ready", "unlocked"):
        return engine  # compiled meanwhile; or a sweep that cannot start one compile only
    if state == "started" or (state == "busy" and kind == "run"):
        # a sweep's runs: only the run that started the compile says so (once per sweep)
        print(warm.NOTICE if kind == "run" else warm.SWEEP_NOTICE, file=sys.stderr, flush=True)
    return chosen


def _parallel_sweep() -> bool:
    """Inside a sweep whose runs share the terminal (joblib or forked workers): per-run
    progress bars would overwrite each other, so each run prints its summary line instead."""
    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    target = str(hc.launcher.get("_target_", ""))
    return hc.mode == RunMode.MULTIRUN and ("joblib" in target or "PackedFork" in target)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """Scalar config choices as ``group.key`` columns (hw and model reduced to their names)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    hw = data.pop("hw", None) or {}
    data.pop("model", None)
    rt = data.pop("runtime", None) or {}
    out: dict[str, Any] = {"hw.name": hw.get("name") if isinstance(hw, dict) else hw,
                           "runtime.name": rt.get("name") if isinstance(rt, dict) else rt}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(node, (list, tuple)):
            out[prefix[:-1]] = str(list(node))
        else:
            out[prefix[:-1]] = node

    walk("", data)
    return out


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_outputs(result: RunResult, row: dict[str, Any], outdir: Path) -> None:
    """Every output of a run, each atomically; ``summary.parquet`` last, because its presence
    is what marks the run finished (a run killed half-way is rerun, never half-skipped)."""
    outdir.mkdir(parents=True, exist_ok=True)
    per_layer = result.per_layer.copy()
    for key in ("policy.name", "cache.slots", "mode", "hw.name", "trace.name"):
        per_layer[key] = row.get(key)
    _atomic_parquet(per_layer, outdir / "per_layer.parquet")
    if result.per_request is not None:
        per_request = result.per_request.copy()
        for key in ("policy.name", "placement", "cache.slots", "mode", "hw.name", "trace.name"):
            per_request[key] = row.get(key)
        _atomic_parquet(per_request, outdir / "per_request.parquet")
    if result.transfers is not None:
        _atomic_parquet(result.transfers, outdir / "transfers.parquet")
    if result.timeline is not None:
        result.write_chrome_trace(outdir / "timeline.json")
    import pandas as pd

    _atomic_parquet(pd.DataFrame([{**row, **result.summary}]), outdir / "summary.parquet")


def remove_stale_temporaries(outdir: Path) -> None:
    """Temporary files of a write that was killed (SIGKILL runs no cleanup). Call only while
    holding the run folder's lock (:func:`run_lock`): then no other process writes in it, so
    every temporary there is stale."""
    if outdir.is_dir():
        for tmp in outdir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def format_summary(row: dict[str, Any], s: dict[str, Any]) -> str:
    def ms(x: float) -> str:
        return "n/a" if x != x else f"{x * 1e3:.3f} ms"

    runtime = row.get("runtime.name")
    lines = [
        f"policy {row.get('policy.name')}  mode {row.get('mode')}  hw {row.get('hw.name')}  "
        + (f"runtime {runtime}  " if runtime not in (None, "none") else "")
        + f"cache {row['cache.slots']} experts ({row['cache.capacity_fraction']:.1%})",
        f"  accesses {s['accesses']:,}  hits {s['hits']:,}  late {s['late_hits']:,}  "
        f"promoted {s['promoted']:,}  misses {s['misses']:,}",
        f"  hit_rate {s['hit_rate']:.4f}  (incl. late {s['hit_rate_incl_late']:.4f})",
        f"  stall_time {ms(s['stall_time_s'])}  time/token {ms(s['time_per_output_token_s'])}  "
        f"stall/token {ms(s['stall_per_output_token_s'])}",
        f"  bytes demand {s['demand_bytes'] / 1e9:.2f} GB  prefetch "
        f"{s['prefetch_bytes'] / 1e9:.2f} GB  wasted {s['wasted_prefetch_bytes'] / 1e9:.2f} GB",
    ]
    if row.get("placement", "fetch") != "fetch":
        lines.append(
            f"  placement {row['placement']}: cpu {s['cpu_expert_execs']:,}  low-precision "
            f"{s['low_precision_fetches']:,}  skipped {s['skipped_experts']:,}  gate mass full "
            f"{s['gate_mass_full']:.4f}  cpu busy {s['cpu_busy_fraction']:.3f}")
    if s.get("prediction_coverage") == s.get("prediction_coverage"):  # not NaN: a table ran
        lines.append(f"  prediction coverage {s['prediction_coverage']:.1%} (worst MoE layer)  "
                     f"prefetch precision "
                     f"{s['prefetch_precision']:.3f}  recall {s['prefetch_recall']:.3f}")
    return "\n".join(lines)


def run_recorded(cfg: DictConfig, digest: str) -> tuple[RunResult, dict[str, Any]]:
    """:func:`run`, its row completed with the config hash and the provenance columns (wall and
    CPU time of the run): what the app and ``moesim.simulate`` both write."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        result, row = run(cfg)
    except ModuleNotFoundError as exc:  # torch & co. in a base install: which extra, one line
        raise as_missing_extra(exc) from None
    row["config_hash"] = digest
    row.update(provenance(time.perf_counter() - wall0, time.process_time() - cpu0))
    return result, row


def config_hash(cfg: DictConfig, data_digest: str = "") -> str:
    """Hash of every choice that can change a result (not progress bars or output paths), of
    the input data's content (``data_digest``) and of the package version."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", "progress"):
        data.pop(key, None)
    if not data.get("plugins"):  # runs from before the option keep their hash
        data.pop("plugins", None)
    params = data.get("placement_params") or {}
    if data.get("placement", "fetch") == "fetch" and not any(
            v is not None for v in params.values()):
        # the default placement: runs from before placements existed keep their hash
        data.pop("placement", None)
        data.pop("placement_params", None)
    elif "placement" in data:  # hash what runs: a parameter left null is its default
        data["placement_params"] = resolve_placement(data["placement"], params).params
    if (data.get("runtime") or {}).get("name", "none") == "none" and "runtime" in data:
        data.pop("runtime")  # no runtime: runs from before runtimes existed keep their hash
    if "weights" in data and not any(v is not None for v in (data["weights"] or {}).values()):
        data.pop("weights")  # the card's own weights: likewise
    if "mib" in (data.get("cache") or {}) and data["cache"]["mib"] is None:
        data["cache"].pop("mib")  # runs from before cache.mib keep their hash
    data["_data"] = data_digest
    data["_version"] = package_version()
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def input_digest(cfg: DictConfig) -> str:
    """:func:`hash_inputs`, once per sweep inside :func:`inputs_hashed_once`."""
    hashes = sweep_input_hashes()
    if hashes is None:
        return hash_inputs(cfg)
    node = cfg.get("predictions") or {}
    key = (str(cfg.trace.get("path")), str(cfg.trace.get("format")), str(node.get("path")),
           str(cfg.get("requests") or "auto"))
    if key not in hashes:
        hashes[key] = hash_inputs(cfg)
    return hashes[key]


def hash_inputs(cfg: DictConfig) -> str:
    """Content hash of the run's trace file and of a prediction table given as a file, so a
    trace rewritten at the same path is never mistaken for a finished run (a
    ``predictor:<name>`` table contributes its own key: predictor config, split, router
    weights), and of the split when only held-out requests are replayed."""
    from moesim.predictors.data import file_digest
    from moesim.predictors.tables import parse_spec, split_settings, table_key

    trace = run_trace_file(cfg)
    parts = [file_digest(trace)]
    given = (cfg.get("predictions") or {}).get("path")
    if name := parse_spec(given):  # the table's key covers the predictor config and split
        parts.append(table_key(trace, name))
    elif given and resolve_path(given).is_file():
        parts.append(file_digest(resolve_path(given)))
    if str(cfg.get("requests") or "auto") == "held_out":  # which requests are replayed
        parts.append(str(split_settings()))
    return "-".join(parts)


def finished(outdir: Path, digest: str) -> pd.DataFrame | None:
    """The summary of an earlier run of this very config in ``outdir``, if it finished."""
    path = outdir / "summary.parquet"
    if not path.is_file():
        return None
    try:
        import pandas as pd

        df = pd.read_parquet(path)
    except (OSError, ValueError):
        return None
    if "config_hash" in df and df["config_hash"].iloc[0] == digest:
        return df
    return None


def run_lock(outdir: Path):
    """One process at a time in a run folder: two identical sweeps into one folder queue up
    per run, and the second finds the first's finished summary and skips (the kernel releases
    the lock of a killed process)."""
    return entry_lock(outdir / "run")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    outdir = Path(HydraConfig.get().runtime.output_dir)
    with run_lock(outdir):
        return _run_in(outdir, cfg)


class _RunFailed(Exception):
    """A user error already printed; the run ends with status ``failed``."""


def _fail(outdir: Path, lines: list[str]) -> _RunFailed:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    try:
        write_status(outdir, "failed", "; ".join(lines))
    except OSError as exc:  # a full or read-only disk: the error line above is what is left
        print(f"error: {outdir}: status.json not written ({exc.strerror or exc})",
              file=sys.stderr)
    return _RunFailed()


# Free space a run folder needs before a run starts: summary, per-layer and per-request tables
# are kilobytes; transfers.parquet and timeline.json of a long run reach tens of MiB.
MIN_FREE_BYTES = 64 << 20
OUTPUTS = ("summary.parquet", "per_layer.parquet", "per_request.parquet", "transfers.parquet",
           "timeline.json")


def check_outdir(outdir: Path, need: int = MIN_FREE_BYTES) -> str | None:
    """Before a run: the run folder takes a file and has room for the outputs (a full or
    read-only disk used to fail after the simulation, leaving tables without a summary)."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outdir, prefix=".write-check-", suffix=".tmp"):
            pass
        free = shutil.disk_usage(outdir).free
    except OSError as exc:
        return f"output folder {outdir}: not writable ({exc.strerror or exc})"
    if free < need:
        return (f"output folder {outdir}: {free / 2**20:.1f} MiB free, a run needs "
                f"{need / 2**20:.0f} MiB")
    return None


def write_run(result: RunResult, row: dict[str, Any], outdir: Path) -> str | None:
    """:func:`write_outputs`, or on a failure none of them: every output of this attempt is
    removed (no table is left to be mistaken for a result) and the reason is returned."""
    try:
        write_outputs(result, row, outdir)
    except BaseException as exc:
        for name in OUTPUTS:
            (outdir / name).unlink(missing_ok=True)
        remove_stale_temporaries(outdir)
        if isinstance(exc, OSError):
            return f"writing the results into {outdir}: {exc.strerror or exc}; none kept"
        raise
    return None


def _run_in(outdir: Path, cfg: DictConfig) -> float | None:
    """One run; in a sweep a user error fails this run only (the sweep goes on and its summary
    counts it); a single run exits with status 2."""
    try:
        try:
            return _run_checked(outdir, cfg)
        except OmegaConfBaseException as exc:  # a value that cannot resolve: ${oc.env:UNSET}
            key = getattr(exc, "full_key", None)
            raise _fail(outdir, [f"{key}: {one_line(exc)}" if key else one_line(exc)]) from None
    except _RunFailed:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)


def unswept(hydra_cfg: Any) -> list[str]:
    """Keys an experiment sweeps (``hydra.sweeper.params``) that a single run (no ``-m``)
    leaves unpinned on its command line: Hydra would silently run the default config once."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return []
    params = hydra_cfg.sweeper.get("params") or {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task}
    return [str(k) for k in params if str(k) not in given]


def _run_checked(outdir: Path, cfg: DictConfig) -> float | None:
    remove_stale_temporaries(outdir)
    if keys := unswept(HydraConfig.get()):
        name = next((o.split("=", 1)[1] for o in HydraConfig.get().overrides.task
                     if o.startswith("experiment=")), "this experiment")
        raise _fail(outdir, [f"experiment={name} is a sweep over {', '.join(keys)}: run it with "
                             f"-m (moesim-sim -m experiment={name} ...), or pin each of them"])
    hc = HydraConfig.get()
    if errors := check_overrides(list(hc.overrides.task), set(hc.runtime.choices)):
        raise _fail(outdir, errors)
    if errors := check_unused_overrides(list(hc.overrides.task), cfg):
        raise _fail(outdir, errors)
    if errors := check_config(cfg):  # every bad value, one line each, before anything runs
        raise _fail(outdir, errors)
    if cfg.get("published") is not None:  # experiment=published: predict published systems
        from moesim.experiments.published.entries import PublishedError
        from moesim.experiments.published.report import run_all

        out = cfg.published.get("out")
        try:
            summary = run_all(resolve_path(out) if out else outdir,
                              lambda m: print(m, file=sys.stderr) if cfg.progress else None)
        except (PublishedError, ProfileError, ValueError) as exc:
            raise _fail(outdir, [str(exc)]) from None
        write_status(outdir, "done")
        print(json.dumps(summary, indent=1))
        print(f"  results: {outdir}")
        return None
    if cfg.get("validate") is not None:  # experiment=validate[_smoke]: simulate + run for real
        from moesim.experiments.validate import USER_ERRORS as VALIDATE_ERRORS
        from moesim.experiments.validate import run_validation

        try:
            run_validation(cfg, outdir)
        except VALIDATE_ERRORS as exc:
            raise _fail(outdir, [str(exc)]) from None
        write_status(outdir, "done")
        return None
    try:
        digest = config_hash(cfg, input_digest(cfg))
    except user_errors() as exc:
        raise _fail(outdir, [str(exc)]) from None
    done = finished(outdir, digest)
    if done is not None:  # a rerun of a sweep skips what already finished
        print(f"already done ({digest}): {outdir}")
        write_status(outdir, "skipped")
        return float(done["hit_rate"].iloc[0])
    (outdir / "summary.parquet").unlink(missing_ok=True)  # another config's: never mix outputs
    if why := check_outdir(outdir):
        raise _fail(outdir, [why])
    try:
        result, row = run_recorded(cfg, digest)
    except user_errors() as exc:
        raise _fail(outdir, [str(exc)]) from None
    if why := write_run(result, row, outdir):
        raise _fail(outdir, [why])
    write_status(outdir, "done")
    print(format_summary(row, result.summary))
    print(f"  results: {outdir}")
    return result.summary["hit_rate"]


def main() -> None:
    # A plugins=[...] override names modules whose policies the config may choose: import them
    # before Hydra composes it (entry points load with the policy registry).
    try:
        import_modules(plugins_from_argv(sys.argv[1:]))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    user_wants_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors reach the handler below
    try:
        register_configs()
        with sweep_workers_die_with_parent():  # a killed sweep must not leave its workers running
            _hydra_main()
    except KeyboardInterrupt:
        print("interrupted; rerun resumes", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if user_wants_traces or _inside_a_run(exc):
            raise  # a bug: its traceback is what a report needs
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def _inside_a_run(exc: BaseException) -> bool:
    """Whether the exception came from a run's own code (a bug) rather than from composing
    the config, parsing the command line or making the run folder (the user's input)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _run_in.__code__:
            return True
        tb = tb.tb_next
    return False


_HYDRA_NOISE = ("full_key:", "object_type=", "reference_type=", "Set the environment variable",
                "To append to your config use")


def one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line: a list under "...:" is joined
    with commas, the key and type dumps are dropped."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    parts: list[str] = []
    items: list[str] = []
    for raw in str(exc).splitlines():
        line = raw.strip()
        if not line or line.startswith(_HYDRA_NOISE):
            continue
        if raw[:1] in (" ", "\t") and parts and parts[-1].endswith(":"):
            items.append(line)
            continue
        if items:
            parts[-1] += " " + ", ".join(items)
            items = []
        parts.append(line)
    if items:
        parts[-1] += " " + ", ".join(items)
    text = "; ".join(parts).partition("; Config search path:")[0] or type(exc).__name__
    if text.startswith("Config group override must be"):  # cache=null
        nulls = [a for a in sys.argv[1:] if a.endswith(("=null", "=None"))]
        return (f"{', '.join(nulls) or 'a group'}: a config group takes one of its options, "
                "not null (moesim-sim --help lists them)")
    key = text.partition("Could not override '")[2].partition("'")[0]
    if key:  # Hydra: an unknown key (Hydra's hint, +key=..., would add a key nothing reads)
        return f"{key}: not a moesim-sim option (moesim-sim --help lists them)"
    return text


if __name__ == "__main__":
    main()
