"""The Python API runs what ``moesim-sim`` runs: the same config, checks, errors and summary row.

Runs use ``engine=python`` on a 3-request trace unless the engine is the point: cheap, and the
API's job is the config path, which every engine shares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import moesim
from moesim.experiments import api
from moesim.hw_profiles import profile_path
from tests.helpers import write_deepseek_shaped

FAST = {"engine": "python"}


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic routing with DeepSeek-V2-Lite's shape (26 MoE layers, 64 experts, top-6)."""
    return write_deepseek_shaped(tmp_path_factory.mktemp("api") / "t.parquet", requests=3,
                                 tokens=6, seed=11)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moesim", "sim", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_row_is_the_cli_summary_row(trace_file: Path, tmp_path: Path) -> None:
    """Same columns in the same order, same config hash (so the same config), same metrics
    (provenance aside: other sessions may commit between the two runs)."""
    proc = _cli("trace=file", f"trace.path={trace_file}", "policy=belady", "cache.fraction=0.25",
                "batch=2", "engine=python", "progress=false", f"hydra.run.dir={tmp_path}/run",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = pd.read_parquet(tmp_path / "run" / "summary.parquet")
    row = moesim.simulate(trace_file, "belady", cache=0.25, batch=2, **FAST)
    assert list(row.columns) == list(cli.columns)
    assert row.loc[0, "config_hash"] == cli.loc[0, "config_hash"]
    provenance = {"moesim.commit", "run.host", "run.date", "run.wall_s", "run.cpu_s",
                  "run.sim_cpu_s"}
    same = [c for c in cli.columns if c not in provenance]
    pd.testing.assert_frame_equal(row[same], cli[same], check_dtype=False)


def test_bad_values_raise_the_cli_lines(trace_file: Path, tmp_path: Path) -> None:
    proc = _cli("trace=file", f"trace.path={trace_file}", "cache.fraction=2", "batch=0",
                cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln.removeprefix("error: ") for ln in proc.stderr.strip().splitlines()]
    with pytest.raises(moesim.InputError) as info:
        moesim.simulate(trace_file, cache=2.0, batch=0)
    # The CLI's override parser reads "2" as an int; here cache=2 would be two expert slots,
    # so the fraction is the float 2.0.
    assert info.value.lines == [ln.replace("cache.fraction=2:", "cache.fraction=2.0:")
                                for ln in lines]
    assert isinstance(info.value, ValueError) and str(info.value) == "; ".join(info.value.lines)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policy": "nope"}, "policy 'nope' is not registered; known: "),
    ({"policy": {"name": "lru", "nope": 1}}, "policy 'lru': unknown parameter(s) ['nope']"),
    ({"hw": "nope"}, "hw: unknown profile 'nope'; known profiles: a100_pcie"),
    ({"trace": "nope"}, "trace: 'nope' is neither a trace name (deepseek_v2_lite"),
    ({"trace": "missing/t.parquet"}, "trace.path: "),
    ({"model": "nope"}, "model: unknown model 'nope'; known: "),
    ({"predictor": "nope"}, "predictor: unknown predictor 'nope'; known: "),
    ({"batch": 0}, "batch=0: must be >= 1"),
    ({"mode": "fast"}, "mode=fast: must be one of timed, zero_latency"),
    ({"nope": 1}, "nope: not a moesim-sim option"),
    ({"cache": {"experts": 0}}, "cache.experts=0: must be >= 1"),
    ({"cache": True}, "cache=True: expected a fraction, a number of experts or a mapping"),
    ({"hydra": {"job": {"chdir": True}}}, "hydra.job.chdir: Hydra's settings do not apply"),
    ({"warmup_tokens": 6}, "warmup_tokens=6: must be shorter than the longest replayed request"),
])
def test_bad_input_is_one_input_error(trace_file: Path, kwargs: dict, message: str) -> None:
    args = {"trace": trace_file, **FAST, **kwargs}
    with pytest.raises(moesim.InputError) as info:
        moesim.simulate(**args)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_cache_forms(trace_file: Path) -> None:
    total = 26 * 64
    by_slots = moesim.simulate(trace_file, cache=100, **FAST).loc[0]
    assert by_slots["cache.slots"] == 100 and pd.isna(by_slots["cache.fraction"])
    by_bytes = moesim.simulate(trace_file, cache={"bytes": 17301504 * 520 + 1,
                                                  "partition": "per_layer"}, **FAST).loc[0]
    assert by_bytes["cache.slots"] == 520 and by_bytes["cache.partition"] == "per_layer"
    by_fraction = moesim.simulate(trace_file, cache=0.5, **FAST).loc[0]
    assert by_fraction["cache.slots"] == total // 2


def test_a_loaded_trace_runs_like_its_file(trace_file: Path) -> None:
    trace = moesim.load_trace(trace_file)
    assert len(trace) == 3 and trace.meta.model == "deepseek_v2_lite"
    from_object = moesim.simulate(trace, "lru", cache=0.1, **FAST).loc[0]
    from_file = moesim.simulate(trace_file, "lru", cache=0.1, **FAST).loc[0]
    assert from_object["trace.name"] == "loaded:deepseek_v2_lite"
    for key in ("accesses", "hits", "misses", "stall_time_s", "cache.slots"):
        assert from_object[key] == from_file[key], key
    assert len(moesim.load_trace(trace_file, max_requests=2, max_tokens=4).requests[1].experts) \
        == 4


def test_hw_profile_by_relative_path(trace_file: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "profiles").mkdir()
    shutil.copy(profile_path("a100_pcie"), tmp_path / "profiles" / "a100_pcie.yaml")
    monkeypatch.chdir(tmp_path)
    by_path = moesim.simulate(trace_file, hw="profiles/a100_pcie.yaml", **FAST).loc[0]
    by_name = moesim.simulate(trace_file, hw="a100_pcie", **FAST).loc[0]
    assert by_path["hw.name"] == "a100_pcie"
    assert by_path["link.expert_transfer_s"] == by_name["link.expert_transfer_s"]
    assert by_path["stall_time_s"] == by_name["stall_time_s"]


def test_outdir_gets_the_apps_files(trace_file: Path, tmp_path: Path) -> None:
    row = moesim.simulate(trace_file, "next_layer_all", cache=0.2, outdir=tmp_path / "run",
                          **FAST)
    written = pd.read_parquet(tmp_path / "run" / "summary.parquet")
    pd.testing.assert_frame_equal(written, row)
    assert (tmp_path / "run" / "per_layer.parquet").is_file()
    assert '"done"' in (tmp_path / "run" / "status.json").read_text()


def test_outdir_write_failure_leaves_no_table(trace_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (disk full) keeps none of the run's tables, as moesim-sim
    does: an InputError naming the folder, status failed, nothing to mistake for a result."""
    from moesim.experiments import sim_app

    real = sim_app.write_outputs

    def half(result, row, outdir):  # type: ignore[no-untyped-def]
        real(result, row, outdir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sim_app, "write_outputs", half)
    with pytest.raises(moesim.InputError, match="No space left on device; none kept"):
        moesim.simulate(trace_file, "lru", cache=0.2, outdir=tmp_path / "run", **FAST)
    assert not list((tmp_path / "run").glob("*.parquet"))
    assert '"failed"' in (tmp_path / "run" / "status.json").read_text()


def test_sweep_is_the_grid_in_order(trace_file: Path) -> None:
    table = moesim.sweep(trace_file, ["lru", "belady"], cache=[0.1, 0.5], mode="zero_latency",
                         **FAST)
    assert list(zip(table["policy.name"], table["cache.fraction"], strict=True)) == [
        ("lru", 0.1), ("lru", 0.5), ("belady", 0.1), ("belady", 0.5)]
    hits = table.set_index(["policy.name", "cache.fraction"])["hits"]
    for size in (0.1, 0.5):  # Belady's MIN is optimal for demand paging with no latency
        assert hits["belady", size] >= hits["lru", size]


def test_sweep_checks_every_config_before_running_any(
        trace_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[object] = []
    monkeypatch.setattr(api, "_run", lambda prep, outdir: ran.append(prep))
    with pytest.raises(moesim.InputError, match=r"cache.fraction=2.0: must be <= 1"):
        moesim.sweep(trace_file, ["lru", "belady"], cache=[0.1, 2.0], **FAST)
    assert ran == []
    with pytest.raises(moesim.InputError, match="empty list for policy"):
        moesim.sweep(trace_file, [], **FAST)


def test_listings() -> None:
    from moesim.hw_profiles import list_profiles
    from moesim.policies.registry import policy_names

    assert moesim.list_policies() == policy_names()
    assert moesim.list_profiles() == list_profiles()
    traces = moesim.list_traces()
    assert "embedded" in traces and "deepseek_v2_lite" in traces and "file" not in traces


def test_import_moesim_is_light() -> None:
    """``import moesim`` loads neither torch nor pandas, Hydra or the simulator; the API's
    names load on first use."""
    code = (
        "import sys, moesim\n"
        "heavy = [m for m in ('torch', 'pandas', 'hydra', 'numba', 'moesim.experiments')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(moesim.simulate) and 'moesim.experiments.api' in sys.modules\n"
        "assert 'torch' not in sys.modules\n"
        "assert {'simulate', 'sweep', 'load_trace', 'InputError'} <= set(dir(moesim))\n"
        "try:\n    moesim.nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_placement_as_a_mapping_is_name_plus_params() -> None:
    """``placement={"name": ..., "threshold": ...}``, as ``policy`` and ``moesim.sim.simulate``
    take it (it was refused as "placement.name: not a moesim-sim option")."""
    as_map = api._prepare(None, None, None, None,
                          {"placement": {"name": "skip_low_weight", "threshold": 0.2}}).cfg
    split = api._prepare(None, None, None, None, {"placement": "skip_low_weight",
                                                  "placement_params": {"threshold": 0.2}}).cfg
    assert as_map == split and as_map.placement_params.threshold == 0.2
    with pytest.raises(moesim.InputError, match="placement: a mapping needs 'name'"):
        api._prepare(None, None, None, None, {"placement": {"threshold": 0.2}})
    with pytest.raises(moesim.InputError, match="placement_params=3: must be a mapping"):
        api._prepare(None, None, None, None,
                     {"placement": {"name": "skip_low_weight", "threshold": 0.2},
                      "placement_params": 3})


def test_bad_outdir_and_load_limits_are_input_errors(tmp_path: Path) -> None:
    """An outdir that cannot be made failed with an OSError after the whole run; load_trace
    took max_requests=0 or max_tokens=-1 (moesim-sim refuses both)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(moesim.InputError, match=r"outdir .*file/run: cannot create the folder"):
        moesim.simulate(max_requests=1, outdir=tmp_path / "file" / "run", **FAST)
    for bad in ({"max_requests": 0}, {"max_tokens": -1}, {"max_requests": True}):
        with pytest.raises(moesim.InputError, match="must be a whole number >= 1"):
            moesim.load_trace("embedded", **bad)


def test_a_placement_parameter_left_null_hashes_as_its_default() -> None:
    """A rerun with the default written out is the same run (and is skipped as done)."""
    from moesim.experiments.sim_app import config_hash
    from moesim.policies.registry import resolve_placement

    default = resolve_placement("skip_low_weight").params["threshold"]

    def cfg(**params):
        return api._prepare(None, None, None, None, {"placement": "skip_low_weight",
                                                     "placement_params": params}).cfg

    assert config_hash(cfg()) == config_hash(cfg(threshold=default))
    assert config_hash(cfg()) != config_hash(cfg(threshold=default / 2))
    # the default placement keeps the hash runs had before placements existed
    plain = api._prepare(None, None, None, None, {}).cfg
    fetch = api._prepare(None, None, None, None, {"placement": "fetch"}).cfg
    assert config_hash(plain) == config_hash(fetch)


def test_runtime_by_name_or_mapping_and_its_cpu_kernels(trace_file: Path) -> None:
    """``runtime=`` is the config group (a name) or a runtime YAML's mapping; a CPU placement
    runs under the runtime's CPU kernels (the run's host_cpu.source names them); an unknown
    name lists the known ones."""
    row = moesim.simulate(trace_file, "lru", hw="rtx4090", cache=0.2, runtime="llama_cpp",
                          placement="cpu_on_miss", **FAST).loc[0]
    assert row["runtime.name"] == "llama_cpp"
    assert "llama_cpp CPU kernels" in row["host_cpu.source"]
    mine = {"name": "mine", "overhead": {"step_s": {"value": 1, "unit": "ms",
                                                    "kind": "estimate", "source": "a guess"}}}
    base = moesim.simulate(trace_file, "lru", cache=0.2, **FAST).loc[0]
    own = moesim.simulate(trace_file, "lru", cache=0.2, runtime=mine, **FAST).loc[0]
    assert own["runtime.name"] == "mine"
    assert own["total_time_s"] == pytest.approx(base["total_time_s"] + 1e-3 * own["steps"],
                                                rel=1e-6)
    with pytest.raises(moesim.InputError, match=r"runtime: unknown runtime 'nope'; known: .*"
                                                r"hqq_offload"):
        moesim.simulate(trace_file, "lru", runtime="nope", **FAST)
