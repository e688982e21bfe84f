"""The run config's schema: every bad value is one ``error: key=value: why`` line and exit 2,
before anything runs; ``--help`` documents every option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from moesim.experiments.configs import CONF_DIR, register_configs
from moesim.experiments.schema import OPTIONS, check, check_warmup

register_configs()


def _check(*overrides: str) -> list[str]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return check(compose("config", overrides=list(overrides)))


def test_defaults_and_every_experiment_are_valid() -> None:
    assert _check() == []
    for exp in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        assert _check(f"experiment={exp}") == [], exp


@pytest.mark.parametrize(("override", "why"), [
    ("cache.fraction=abc", "cache.fraction=abc: must be a number"),
    ("cache.fraction=0", "cache.fraction=0: must be > 0"),
    ("cache.fraction=1.5", "cache.fraction=1.5: must be <= 1"),
    ("batch=abc", "batch=abc: must be an integer"),
    ("batch=0", "batch=0: must be >= 1"),
    ("seed=abc", "seed=abc: must be an integer"),
    ("max_tokens=0", "max_tokens=0: must be >= 1"),
    ("max_tokens=-1", "max_tokens=-1: must be >= 1"),
    ("max_requests=-1", "max_requests=-1: must be >= 1"),
    ("warmup_tokens=-3", "warmup_tokens=-3: must be >= 0"),
    ("prefill_chunk=-1", "prefill_chunk=-1: must be >= 0"),
    ("output.timeline_steps=-2", "output.timeline_steps=-2: must be >= 0"),
    ("+cache.experts=2.5", "cache.experts=2.5: must be a whole number"),
    ("mode=fast", "mode=fast: must be one of timed, zero_latency"),
    ("progress=maybe", "progress=maybe: must be true or false"),
    ("compute_scale=0", "compute_scale=0: must be > 0"),
    ("cache.partition=ring", "cache.partition=ring: must be one of global, per_layer"),
    ("placement_params.threshold=1.5", "placement_params.threshold=1.5: must be <= 1"),
    ("placement_params.bits=1", "placement_params.bits=1: must be >= 2"),
    ("placement_params.layers=-1", "placement_params.layers=-1: must be >= 0"),
])
def test_bad_value_is_one_line(override: str, why: str) -> None:
    errors = _check(override)
    assert why in errors, errors


@pytest.mark.parametrize(("override", "why"), [
    ("placement_params=3", "placement_params=3: must be a mapping (keys: threshold, bits, "
     "layers, gpu_layers)"),
    ("output=3", "output=3: must be a mapping (keys: transfers, timeline_steps)"),
    ("output=null", "output=null: must be a mapping (keys: transfers, timeline_steps)"),
])
def test_section_given_as_a_scalar_is_one_line(override: str, why: str) -> None:
    """A scalar in place of a section hid its options from the checks (a traceback in the
    config hash or the run); placement_params=null still means every default."""
    assert why in _check(override)
    assert _check("placement_params=null") == []


def test_cache_size_is_exactly_one_of_four() -> None:
    errors = _check("cache.experts=10")
    assert errors == ["cache size: give exactly one of cache.fraction, cache.experts, cache.bytes, "
                      "cache.mib (given: cache.fraction=0.25, cache.experts=10)"]
    assert _check("cache.experts=10", "cache.fraction=null") == []


def test_warmup_must_leave_tokens_to_count() -> None:
    assert check_warmup(0, 5) is None and check_warmup(4, 5) is None
    assert "shorter than the longest replayed request (5 tokens)" in check_warmup(5, 5)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from moesim.experiments.sim_app import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_reports_every_bad_value_and_writes_nothing(tmp_path: Path) -> None:
    proc = _cli("batch=abc", "max_tokens=0", "cache.fraction=2", "progress=false", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: batch=abc: must be an integer",
                     "error: max_tokens=0: must be >= 1",
                     "error: cache.fraction=2: must be <= 1"], proc.stderr
    assert not list(tmp_path.rglob("*.parquet"))


def test_cli_warmup_longer_than_the_trace(tmp_path: Path) -> None:
    proc = _cli("warmup_tokens=100000", "max_requests=2", "progress=false", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: warmup_tokens=100000: must be shorter")
    assert not list(tmp_path.rglob("summary.parquet"))


def test_help_documents_every_option(tmp_path: Path) -> None:
    proc = _cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for opt in OPTIONS:
        assert opt.key in proc.stdout and opt.doc[:40] in proc.stdout
    assert "policy" in proc.stdout and "belady" in proc.stdout
    assert len(proc.stdout.splitlines()) < 120  # two lines an option, a screen or two


def test_cli_placement_without_a_host_cpu_is_one_line(tmp_path: Path) -> None:
    """A placement the profile cannot run: one error line, exit 2, nothing written (the
    placement's own parameter errors are tests/policies/test_placement_registry.py's)."""
    proc = _cli("placement=cpu_on_miss", "hw=jetson_agx_orin", "max_requests=2",
                "progress=false", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: placement 'cpu_on_miss' computes experts on the host CPU, but hw profile "
        "'jetson_agx_orin' is a unified-memory device"), proc.stderr
    assert not list(tmp_path.rglob("summary.parquet"))


def test_a_sweep_experiment_without_multirun_is_refused(tmp_path: Path) -> None:
    """Without -m Hydra ignores hydra.sweeper.params and would run the default config once."""
    proc = _cli("experiment=stall_vs_link", "hw=v100_pcie", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: experiment=stall_vs_link is a sweep over policy: run it with -m "
                     "(moesim-sim -m experiment=stall_vs_link ...), or pin each of them"]
    assert not list(tmp_path.rglob("summary.parquet"))


def test_unswept_lists_only_unpinned_keys() -> None:
    from types import SimpleNamespace

    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from moesim.experiments.sim_app import unswept

    def hc(mode: RunMode, task: list[str]) -> SimpleNamespace:
        sweeper = OmegaConf.create({"params": {"hw": "a,b", "policy": "lru,lfu"}})
        return SimpleNamespace(mode=mode, sweeper=sweeper,
                               overrides=SimpleNamespace(task=task))

    assert unswept(hc(RunMode.RUN, ["experiment=x"])) == ["hw", "policy"]
    assert unswept(hc(RunMode.RUN, ["hw=a", "+policy=lru"])) == []
    assert unswept(hc(RunMode.MULTIRUN, [])) == []
