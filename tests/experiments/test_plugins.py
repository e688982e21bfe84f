"""Plugins: the worked example package (experiments/docs/examples/moesim_example_plugin),
installed for real (pip, into a folder put on PYTHONPATH, so this environment is untouched),
runs through its entry points (a policy, a hardware profile) in a joblib sweep; a module given
as ``plugins=[...]`` registers its policy in every worker; a policy defined in a notebook runs in
``moesim.sweep(n_jobs=2)``; and a plugin that fails is one error line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import moesim
from moesim.plugins import GROUPS, plugins_from_argv

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "experiments" / "docs" / "examples" / "moesim_example_plugin"
SMALL = ["mode=zero_latency", "max_requests=2", "progress=false"]

MODULE_PLUGIN = '''
from moesim.policies.fifo import FIFO
from moesim.policies.registry import register_eviction


@register_eviction
class ModuleFIFO(FIFO):
    name = "module_fifo"
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """PYTHONPATH with the example installed by pip (its dist-info carries the entry point)
    and a plain module, ``my_plugin_mod``, that is importable but not installed."""
    tmp = tmp_path_factory.mktemp("plugins")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src)  # the build writes build/ and *.egg-info beside the sources
    site = tmp / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(site.glob("moesim_example_plugin-*.dist-info/entry_points.txt"))
    (site / "my_plugin_mod.py").write_text(MODULE_PLUGIN)
    return str(site)


def _sim(args: list[str], cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "moesim", "sim", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400, check=False)


def _rows(sweep: Path) -> pd.DataFrame:
    files = sorted(sweep.glob("*/summary.parquet"))
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)


def test_entry_points_and_plugins_option_run_in_a_joblib_sweep(plugin_path: str,
                                                               tmp_path: Path) -> None:
    """The example's policy (a moesim.policies entry point) and a ``plugins=[...]`` module's,
    timed on the example's hardware profile (a moesim.hw_profiles entry point), in joblib's
    worker processes, each of which composes its run and loads the plugins itself.

    (This sweep used to run twice, once more through ``submitit_local`` with the profile: the
    plugins load in ``sim_app.run``, whatever process a launcher runs it in, and submitit's own
    processes are tested in tests/experiments/test_packing.py; ~13 s of the suite.)"""
    sweep = tmp_path / "joblib"
    proc = _sim(["-m", "policy=my_random,module_fifo", "cache.fraction=0.2,0.4",
                 "plugins=[my_plugin_mod]", "hw=example_v100", "mode=timed", "max_requests=2",
                 "progress=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 f"hydra.sweep.dir={sweep}"], tmp_path, plugin_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sweep {sweep}: 4 done, 0 skipped, 0 failed" in proc.stdout
    rows = _rows(sweep)
    assert sorted(rows["policy.name"]) == ["module_fifo", "module_fifo", "my_random", "my_random"]
    assert (rows["plugins"] == "['my_plugin_mod']").all()  # the row says what was imported
    assert rows["config_hash"].nunique() == 4 and (rows["hit_rate"] > 0).all()
    # timed on the plugin's profile; the entry point needed no option (my_random is not in it)
    assert (rows["hw.name"] == "example_v100").all() and (rows["mode"] == "timed").all()
    assert (rows["time_per_output_token_s"] > 0).all()


def test_without_the_plugin_the_policy_is_one_error_line(tmp_path: Path) -> None:
    proc = _sim(["policy=module_fifo", *SMALL, "hydra.run.dir=out"], tmp_path, None)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    proc = _sim(["plugins=[no_such_plugin_mod]", "policy=lru", *SMALL, "hydra.run.dir=out"],
                tmp_path, None)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: plugins: cannot import 'no_such_plugin_mod': ModuleNotFoundError: "
        "No module named 'no_such_plugin_mod'"]


def test_a_notebook_policy_runs_in_a_parallel_api_sweep(tmp_path: Path) -> None:
    """A class defined in ``__main__`` (a notebook, a script), registered after moesim was
    first used, runs through ``moesim.sweep`` in worker processes, into resumable folders."""
    from moesim.policies.fifo import FIFO
    from moesim.policies.registry import EVICTION, register_eviction

    moesim.simulate(policy="lru", mode="zero_latency", max_requests=1)  # moesim already used
    notebook_class = type("NotebookFIFO", (FIFO,), {"name": "notebook_fifo",
                                                    "__module__": "__main__"})
    register_eviction(notebook_class)
    try:
        out = tmp_path / "runs"
        table = moesim.sweep(policy=["notebook_fifo", "fifo"], cache=[0.2, 0.4],
                             mode="zero_latency", max_requests=2, outdir=out, n_jobs=2)
        assert list(table["policy.name"]) == ["notebook_fifo"] * 2 + ["fifo"] * 2
        # the subclass changes nothing: the same hit rates as the shipped FIFO
        assert list(table["hit_rate"][:2]) == list(table["hit_rate"][2:])
        assert "plugins" not in table  # the column appears only when plugins=[...] was given
        statuses = [json.loads(p.read_text())["status"] for p in sorted(out.glob("*/status.json"))]
        assert statuses == ["done"] * 4
        again = moesim.sweep(policy=["notebook_fifo", "fifo"], cache=[0.2, 0.4],
                             mode="zero_latency", max_requests=2, outdir=out)
        statuses = [json.loads(p.read_text())["status"] for p in sorted(out.glob("*/status.json"))]
        assert statuses == ["skipped"] * 4
        pd.testing.assert_frame_equal(again, table)
        assert moesim.plot(out)  # moesim-plot's figure of the folder
    finally:
        EVICTION.pop("notebook_fifo", None)


def test_plugins_from_argv() -> None:
    assert plugins_from_argv(["policy=x", "plugins=[a.b,c]", "+plugins=d"]) == ["a.b", "c", "d"]
    assert plugins_from_argv(["plugins=[]", "x=plugins=[e]"]) == []
    assert GROUPS == ("moesim.policies", "moesim.placements", "moesim.predictors",
                      "moesim.hw_profiles", "moesim.runtimes", "moesim.importers")


def test_the_docs_show_the_example_plugin_as_it_is() -> None:
    """Policies, "Adding a policy": its code block is the example's module, and its entry point
    lines are the example's pyproject's."""
    page = (ROOT / "experiments/docs/pages/policies.md").read_text()
    module = (EXAMPLE / "moesim_example_plugin" / "policies.py").read_text()
    assert f"```python\n{module}```" in page
    entry = '[project.entry-points."moesim.policies"]\nmy_random = "moesim_example_plugin.policies"'
    assert entry in page and entry in (EXAMPLE / "pyproject.toml").read_text()


FAKE_IMPORTER = '''
from moesim.traces.importers import ImportResult, register
from moesim.traces.store import load_trace, write_trace


@register("copy_of_moesim")
def copy_of_moesim(src, out):
    """A trace importer from a plugin: copies a moesim trace."""
    trace = load_trace(src)
    write_trace(out, trace.meta, trace.requests)
    return ImportResult(out, trace.meta, len(trace), trace.num_tokens, trace.num_rows)
'''


def test_importer_and_runtime_plugins_load_by_entry_point(tmp_path: Path) -> None:
    """A distribution (its dist-info written by hand) whose ``moesim.importers`` entry point
    adds a trace format and whose ``moesim.runtimes`` package holds a runtime profile."""
    site = tmp_path / "site"
    (site / "fake_runtimes").mkdir(parents=True)
    (site / "fake_runtimes" / "__init__.py").write_text("")
    none = (ROOT / "hw_profiles" / "runtimes" / "none.yaml").read_text()
    (site / "fake_runtimes" / "plugin_rt.yaml").write_text(
        none.replace("name: none", "name: plugin_rt"))
    (site / "fake_importer.py").write_text(FAKE_IMPORTER)
    info = site / "moesim_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moesim-fake-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[moesim.importers]\nfake = fake_importer\n\n"
                                           "[moesim.runtimes]\nfake = fake_runtimes\n")
    code = (
        "import sys\n"
        "from moesim.traces.collect.embedded import shipped_path\n"
        "from moesim.traces import import_trace, load_trace\n"
        "from moesim.hw_profiles.runtime import list_runtimes, load_runtime\n"
        "res = import_trace('copy_of_moesim', shipped_path(), sys.argv[1])\n"
        "print(res.requests, len(load_trace(sys.argv[1])))\n"
        "print('plugin_rt' in list_runtimes(), load_runtime('plugin_rt').name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.parquet")],
                          env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["64", "64", "True", "plugin_rt"]
