"""Every shell command of the README and the docs pages is run in CI or says why not
(experiments/docs/check_commands.py), and the fast ones run here."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checker() -> ModuleType:
    path = ROOT / "experiments" / "docs" / "check_commands.py"
    spec = importlib.util.spec_from_file_location("moesim_docs_check_commands", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


check = _checker()


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_every_shell_block_is_run_or_marked() -> None:
    blocks, problems = check.collect()
    assert problems == []
    shell = [b for b in blocks if b.lang in check.SHELL]
    assert shell and all(b.action in ("run", "skip", "same-as") for b in shell)
    assert all(b.reason for b in shell if b.action == "skip")
    readme = [b for b in shell if b.path.name == "README.md"]
    assert [b.action for b in readme].count("same-as") == 5  # the tour, run on its page


def test_the_readme_quickstart_is_the_one_ci_runs() -> None:
    """.ci/run installs and tests with the README's two commands; keep them in step."""
    blocks, _ = check.collect([ROOT / "README.md"])
    quick = blocks[0].code.splitlines()
    assert quick == ["pip install -c constraints.txt -e '.[dev]' && moesim-sim", "pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -c constraints.txt -e '.[dev]'" in ci and "\npytest\n" in ci


@pytest.mark.parametrize("text, problem", [
    ("```bash\nls\n```\n", "without a docs-check marker"),
    ("```\nls\n```\n", "without a language"),
    ("<!-- docs-check: skip -->\n```bash\nls\n```\n", "needs reason"),
    ("<!-- docs-check: maybe -->\n```bash\nls\n```\n", "must say run, skip or same-as"),
    ("<!-- docs-check: run colour=red -->\n```bash\nls\n```\n", "unknown docs-check setting"),
    ("<!-- docs-check: run -->\n```yaml\na: 1\n```\n", "cannot run a yaml block"),
    ("<!-- docs-check: same-as page=\"README.md\" -->\n```bash\nnot-in-readme\n```\n",
     "no run block with the same text"),
])
def test_bad_or_missing_markers_are_reported(tmp_path: Path, text: str, problem: str) -> None:
    _, problems = check.collect([_page(tmp_path, text)])
    assert len(problems) == 1 and problem in problems[0]
    assert problems[0].startswith(f"{tmp_path / 'page.md'}:")


def test_markers_parse_and_text_fences_hide_nothing(tmp_path: Path) -> None:
    page = _page(tmp_path, (
        '<!-- docs-check: run slow expect="4 done" timeout=9 -->\n\n'
        "```bash\nmoesim-sim -m a=1,2 \\\n    b=3\n```\n"
        "````text\n<!-- docs-check: run -->\n```bash\nhidden\n```\n````\n"
        "```python\nprint(1)\n```\n"
    ))
    blocks, problems = check.collect([page])
    assert problems == []
    assert [(b.lang, b.action) for b in blocks] == [("bash", "run"), ("text", None),
                                                    ("python", None)]
    first = blocks[0]
    assert (first.slow, first.expect, first.timeout, first.line) == (True, "4 done", 9.0, 3)
    assert first.code == "moesim-sim -m a=1,2 \\\n    b=3\n"


def test_a_console_block_runs_its_prompt_lines(tmp_path: Path) -> None:
    page = _page(tmp_path, ("<!-- docs-check: run -->\n```console\n$ echo a \\\n  b\na b\n"
                            "$ echo c\nc\n```\n"))
    (block,), _ = check.collect([page])
    assert block.script() == "echo a \\\n  b\necho c\n"


def test_exit_status_and_expected_output_are_checked(tmp_path: Path) -> None:
    page = _page(tmp_path, (
        '<!-- docs-check: run expect="hello" -->\n```bash\necho hello > f; cat f\n```\n'
        '<!-- docs-check: run expect="bye" -->\n```bash\necho hello\n```\n'
        "<!-- docs-check: run -->\n```bash\nfalse\necho not reached\n```\n"
        "<!-- docs-check: run -->\n```bash\ntest -f f  # same folder as the first block\n```\n"
        '<!-- docs-check: run expect="cache" -->\n```python\nimport os\n'
        'print(os.environ["MOESIM_CACHE"])\n```\n'
        "<!-- docs-check: run slow -->\n```bash\nfalse\n```\n"
    ))
    blocks, _ = check.collect([page])
    results = check.run_all(blocks, tmp_path / "work", tmp_path / "cache", fast=True,
                            log=lambda _: None)
    assert [ok for _, ok, _, _ in results] == [True, False, False, True, True]
    assert "expected to find 'bye'" in results[1][2]
    assert "not reached" not in results[2][2]


# .ci/run runs every block, the fast ones too, with check_commands.py right after the suite; a
# CI that exports this (=1) before ``pytest`` runs the fast blocks once there instead of twice
# (about 75 s of the suite on 2 cores). Anywhere else the suite runs them as before.
LATER = "MOESIM_DOCS_COMMANDS_LATER"


def test_ci_runs_every_block_after_the_suite() -> None:
    """.ci/run runs check_commands.py (every block, no ``--fast``) after the suite, which is
    what lets it set ``MOESIM_DOCS_COMMANDS_LATER=1`` before the suite: no block goes unrun."""
    ci = (ROOT / ".ci" / "run").read_text()
    before, after = ci.split("\npytest\n", 1)
    assert "\npython experiments/docs/check_commands.py\n" in after
    assert "check_commands.py" not in before


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(LATER) == "1",
                    reason=f"{LATER}=1: .ci/run runs every docs block after the suite")
def test_fast_docs_commands_run(tmp_path: Path, session_cache: Path) -> None:
    """The README tour and every fast block, as a new user would type them (about 40 s)."""
    blocks, problems = check.collect()
    assert problems == []
    lines: list[str] = []
    results = check.run_all(blocks, tmp_path, session_cache, fast=True, log=lines.append)
    assert results and all(ok for _, ok, _, _ in results), "\n".join(lines)
