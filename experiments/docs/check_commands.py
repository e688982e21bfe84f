"""Run the shell commands of the README and the docs pages, so the documentation cannot drift.

    python experiments/docs/check_commands.py            # run every block marked run
    python experiments/docs/check_commands.py --list     # every shell block and its status

Every fenced block labelled ``bash``, ``sh``, ``shell`` or ``console`` must carry a marker, an
HTML comment on the line before it (blank lines allowed in between)::

    <!-- docs-check: run -->                       run it; it must exit 0
    <!-- docs-check: run expect="4 done" -->      ... and print this text (stdout or stderr)
    <!-- docs-check: run slow -->                  run by this script in CI, left out by --fast
    <!-- docs-check: skip reason="needs a GPU" --> not run in CI, and why
    <!-- docs-check: same-as page="PATH" -->      the same text is a run block of PATH (the
                                                   README's tour repeats Getting started's)

A fence with no label is an error too (label it ``text``, ``yaml``, ...), so that no command
hides in one. ``python`` blocks may be marked ``run`` as well. Blocks run in document order, one
file at a time, each file in its own empty folder (later blocks of a page see what earlier ones
wrote), all with one fresh ``$MOESIM_CACHE`` (or ``--cache DIR``). A ``console`` block runs its
``$ `` lines. ``--fast`` leaves out blocks marked ``slow`` (the test suite runs the rest; CI
runs everything). The script needs only the standard library and the installed commands.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHELL = {"bash", "sh", "shell", "console"}
RUNNABLE = SHELL | {"python"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*docs-check:\s*(?P<body>.*?)\s*-->\s*$")
ATTR = re.compile(r'(\w+)="([^"]*)"|(\w+)=(\S+)')


@dataclass
class Block:
    """One fenced block of a Markdown file and what its marker says about it."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    action: str | None = None  # "run", "skip" or None (unmarked)
    expect: str | None = None
    reason: str | None = None
    timeout: float = 300.0
    same_as: str | None = None  # a file (relative to the repository) holding it as a run block
    slow: bool = False  # left out by --fast (the test suite), run by CI's full pass

    @property
    def where(self) -> str:
        try:
            rel = self.path.relative_to(ROOT)
        except ValueError:
            rel = self.path
        return f"{rel}:{self.line}"

    def script(self) -> str:
        """The text to execute (a console block: its ``$`` lines only)."""
        if self.lang != "console":
            return self.code
        lines = []
        for ln in self.code.splitlines():
            if ln.startswith("$ "):
                lines.append(ln[2:])
            elif lines and lines[-1].endswith("\\"):  # continuation of a command
                lines.append(ln)
        return "\n".join(lines) + "\n"


def _parse_marker(body: str) -> dict[str, str]:
    """``run slow expect="x"`` -> {"action": "run", "slow": "", "expect": "x"}."""
    words = body.split(None, 1)
    out = {"action": words[0] if words else ""}
    rest = words[1] if len(words) > 1 else ""
    for m in ATTR.finditer(rest):
        key = m.group(1) or m.group(3)
        out[key] = m.group(2) if m.group(1) else m.group(4)
    for flag in ATTR.sub(" ", rest).split():
        out[flag] = ""
    return out


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """Every fenced block of ``path`` with its marker, and the problems found (one line each)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, lang = m.group("fence"), m.group("info").strip().split(" ")[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$",
                                              lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # past the closing fence
        block = Block(path, start + 1, lang, "\n".join(body) + "\n")
        where = block.where
        if not lang:
            problems.append(f"{where}: a fence without a language (label it text, yaml, ...)")
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = MARKER.match(lines[j]) if j >= 0 else None
        if marker is not None:
            attrs = _parse_marker(marker.group("body"))
            block.action = attrs.get("action")
            block.expect = attrs.get("expect")
            block.reason = attrs.get("reason")
            if "timeout" in attrs:
                block.timeout = float(attrs["timeout"])
            block.same_as = attrs.get("page")
            block.slow = "slow" in attrs
            unknown = set(attrs) - {"action", "expect", "reason", "timeout", "page", "slow"}
            if unknown:
                problems.append(f"{where}: unknown docs-check setting(s) {sorted(unknown)}")
            if block.action not in ("run", "skip", "same-as"):
                problems.append(f"{where}: docs-check marker must say run, skip or same-as, "
                                f"got {block.action!r}")
            elif block.action == "same-as" and not block.same_as:
                problems.append(f'{where}: same-as needs page="..."')
            elif block.action == "skip" and not block.reason:
                problems.append(f'{where}: a skipped block needs reason="..."')
            elif block.action == "run" and lang not in RUNNABLE:
                problems.append(f"{where}: cannot run a {lang or 'unlabelled'} block")
        elif lang in SHELL:
            problems.append(f"{where}: shell block without a docs-check marker "
                            '(<!-- docs-check: run --> or <!-- docs-check: skip reason="..." -->)')
        blocks.append(block)
    return blocks, problems


def doc_files() -> list[Path]:
    """The README, then every docs page (sorted)."""
    return [ROOT / "README.md", *sorted((HERE / "pages").rglob("*.md"))]


def collect(files: list[Path] | None = None) -> tuple[list[Block], list[str]]:
    """Every block of ``files`` (default: README and pages), and every problem: unmarked shell
    blocks, bad markers, a same-as block whose twin is not a run block of the page it names."""
    blocks: list[Block] = []
    problems: list[str] = []
    for path in files or doc_files():
        b, p = parse(path)
        blocks += b
        problems += p
    for block in blocks:
        if block.action != "same-as" or not block.same_as:
            continue
        page = ROOT / block.same_as
        twins = parse(page)[0] if page.is_file() else []
        if not any(t.action == "run" and t.code == block.code for t in twins):
            problems.append(f"{block.where}: no run block with the same text in {block.same_as}")
    return blocks, problems


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MOESIM_CACHE"] = str(cache)
    # The commands of the environment running this script come first (a venv not activated).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("NO_MKDOCS_2_WARNING", "1")
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> tuple[bool, str, float]:
    """Execute one block; returns (passed, output, seconds)."""
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.script()]
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=block.timeout, check=False)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return False, text + f"\ntimed out after {block.timeout:.0f} s", time.monotonic() - t0
    text = out.stdout + out.stderr
    ok = out.returncode == 0
    if ok and block.expect is not None and block.expect not in text:
        ok = False
        text += f"\n(expected to find {block.expect!r} in the output)"
    elif not ok:
        text += f"\n(exit status {out.returncode})"
    return ok, text, time.monotonic() - t0


def run_all(blocks: list[Block], workdir: Path, cache: Path, *, fast: bool = False,
            log: Callable[[str], object] = print) -> list[tuple[Block, bool, str, float]]:
    """Run every ``run`` block (with ``fast``: but the slow ones), each file in its own folder
    under ``workdir``, in document order."""
    env = _env(cache)
    results = []
    folders: dict[Path, Path] = {}
    for block in blocks:
        if block.action != "run" or (fast and block.slow):
            continue
        if block.path not in folders:
            name = re.sub(r"[^A-Za-z0-9]+", "_", str(block.where.split(":")[0])).strip("_")
            folders[block.path] = workdir / name
            folders[block.path].mkdir(parents=True, exist_ok=True)
        ok, text, secs = run_block(block, folders[block.path], env)
        log(f"{'ok  ' if ok else 'FAIL'} {block.where} ({secs:.1f} s)")
        if not ok:
            tail = "\n".join(text.rstrip().splitlines()[-40:])
            log(f"  $ {shlex.quote(block.script().strip())[:300]}\n{tail}")
        results.append((block, ok, text, secs))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/docs/check_commands.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list every block and its status")
    p.add_argument("--cache", type=Path, help="$MOESIM_CACHE for the commands "
                   "(default: a fresh temporary folder)")
    p.add_argument("--workdir", type=Path, help="run in folders below this one "
                   "(default: a fresh temporary folder, removed afterwards)")
    p.add_argument("--fast", action="store_true", help="leave out blocks marked slow")
    p.add_argument("files", nargs="*", type=Path, help="only these Markdown files")
    args = p.parse_args(argv)
    files = [f.resolve() for f in args.files] or None
    blocks, problems = collect(files)
    if args.list:
        for b in blocks:
            if b.lang in RUNNABLE or b.action:
                status = (b.action or ("UNMARKED" if b.lang in SHELL else "-")) + (
                    " slow" if b.slow else "")
                extra = b.reason if b.action == "skip" else (b.expect or "")
                print(f"{status:9} {b.lang:7} {b.where}  {extra}")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if args.list:
        return 1 if problems else 0
    with tempfile.TemporaryDirectory(prefix="moesim-docs-") as tmp:
        workdir = args.workdir or Path(tmp) / "work"
        cache = args.cache or Path(tmp) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        results = run_all(blocks, workdir, cache, fast=args.fast)
    failed = [b for b, ok, _, _ in results if not ok]
    skipped = sum(b.action == "skip" for b in blocks)
    left = sum(b.action == "run" and b.slow for b in blocks) if args.fast else 0
    print(f"docs commands: {len(results) - len(failed)} passed, {len(failed)} failed, "
          f"{left} slow left out, {skipped} blocks marked skip, {len(problems)} problems")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
