"""Relative input paths mean the directory the command was started in, never the run folder,
and ``$MOESIM_TRACES`` says where the named real traces are."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import moesim
from moesim.experiments.paths import TRACES_ENV, original_cwd, resolve_path, traces_dir
from tests.helpers import write_deepseek_shaped


def _ds_trace(path: Path) -> Path:
    return write_deepseek_shaped(path, requests=2, tokens=4, seed=2)


def _sim(*args: str, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moesim", "sim", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300, check=False)


def test_resolve_path_outside_an_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert original_cwd() == tmp_path
    assert resolve_path("a/b.parquet") == tmp_path / "a" / "b.parquet"
    assert resolve_path("/abs/x") == Path("/abs/x")
    assert resolve_path("~/x") == Path.home() / "x"
    monkeypatch.setenv(TRACES_ENV, "data")
    assert traces_dir() == tmp_path / "data"
    monkeypatch.delenv(TRACES_ENV)
    assert traces_dir() == tmp_path / ".." / "shared" / "traces"


def test_relative_trace_path_survives_chdir_into_the_run_folder(tmp_path: Path) -> None:
    """``hydra.job.chdir=true`` runs inside the run folder; the trace is still found from where
    the command started."""
    _ds_trace(tmp_path / "data" / "t.parquet")
    proc = _sim("trace=file", "trace.path=data/t.parquet", "engine=python", "progress=false",
                "hydra.job.chdir=true", "hydra.run.dir=out/run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_parquet(tmp_path / "out" / "run" / "summary.parquet").loc[0]
    assert row["trace.path"] == "data/t.parquet" and row["trace.requests"] == 2


def _fake_moe_beyond_test_set(root: Path) -> None:
    """One prompt in MoE-Beyond's formatted CSV layout: every token of layer 1, then layer 2, ..."""
    folder = root / "deepseek_v2_lite_moe-beyond" / "formatted_csvs"
    folder.mkdir(parents=True)
    with (folder / "prompt_1_data_formatted.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Layer ID", "Batch Number", "Token", "Activated Expert IDs"])
        for layer in range(1, 27):
            for t, token in enumerate(("What", "Ġis", "Ġit")):
                experts = [(layer + t + 7 * j) % 64 for j in range(6)]
                out.writerow([layer, 0, token, str(experts)])


def test_named_trace_from_a_relative_moesim_traces(tmp_path: Path) -> None:
    """``trace=deepseek_v2_lite_test`` with ``MOESIM_TRACES=mine`` (relative) reads
    ``<start dir>/mine/...``, also when the run changes into its folder."""
    _fake_moe_beyond_test_set(tmp_path / "mine")
    proc = _sim("trace=deepseek_v2_lite_test", "engine=python", "progress=false",
                "hydra.job.chdir=true", "hydra.run.dir=out/run", cwd=tmp_path,
                env={TRACES_ENV: "mine"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_parquet(tmp_path / "out" / "run" / "summary.parquet").loc[0]
    assert row["trace.requests"] == 1 and row["trace.tokens"] == 3


def test_missing_named_trace_names_moesim_traces(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(TRACES_ENV, "nowhere")
    with pytest.raises(moesim.InputError) as info:
        moesim.simulate("deepseek_v2_lite_test")
    assert str(info.value) == (
        f"trace.path: {tmp_path}/nowhere/deepseek_v2_lite_moe-beyond/formatted_csvs does not "
        f"exist (named traces are read from $MOESIM_TRACES, now {tmp_path}/nowhere)")


def test_help_documents_moesim_traces(tmp_path: Path) -> None:
    from moesim.experiments.configs import _help_node

    text = _help_node()["template"]
    assert "MOESIM_TRACES" in text and "starting directory" in text
