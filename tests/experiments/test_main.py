"""``python -m moesim``: every console script as a subcommand, ``--version`` and a short help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import moesim
from moesim.__main__ import COMMANDS, main, usage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moesim", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def test_commands_are_the_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {f"moesim-{name}": target for name, (target, _) in COMMANDS.items()} == scripts


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == usage()
    for name, (_, doc) in COMMANDS.items():
        assert f"  {name} " in out and doc in out
    assert len(out.splitlines()) < 20


@pytest.mark.parametrize("argv", [[], ["nope"]])
def test_no_or_unknown_command_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("unknown command 'nope'" in err) if argv else ("commands:" in err)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"moesim {moesim.__version__}"


def test_subcommands_run_their_scripts(tmp_path: Path) -> None:
    """The command sees its console script's argv (``python -m moesim sim`` itself is what
    test_api, test_paths and test_submitit run, exit codes and error lines included)."""
    traces = _run("traces", "--help", cwd=tmp_path)
    assert traces.returncode == 0 and traces.stdout.startswith("usage: moesim-traces")
    bad = _run("traces", "info", str(tmp_path / "missing.parquet"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
