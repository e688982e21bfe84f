"""What a reader of the docs site sees: code that fits the column, tables that end where they
should, no references to the project's internal issue numbers, every hardware-profile source id
resolvable in the repository, and an API reference that covers every shipped policy."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "experiments" / "docs" / "pages"
# Characters of a code line the site shows without scrolling: Material's content column holds
# about 88 monospace characters at a common desktop width (the issue counted 99 cut lines, which
# is the count for lines over 88); 86 leaves the copy button its corner.
CODE_WIDTH = 86
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})")
ISSUE = re.compile(r"\bissues?\s+\d+", re.I)  # "rmm issue #451" is a citation
SOURCE_ID = re.compile(r"\bS\d{1,3}\b")


def pages() -> list[Path]:
    found = sorted(PAGES.rglob("*.md"))
    assert len(found) > 10
    return found


def fenced_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text without the fence's indentation) of every line inside a fence."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    indent = 0
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, indent = m.group("fence"), len(m.group("indent"))
            continue
        if m and m.group("fence").startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
            continue
        out.append((no, line[indent:] if line[:indent].isspace() else line.lstrip()))
    return out


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced code."""
    inside = {no for no, _ in fenced_lines(path)}
    return [(no, line) for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if no not in inside and not FENCE.match(line)]


def test_fenced_code_fits_the_page_width() -> None:
    long = [f"{p.relative_to(ROOT)}:{no}: {len(text)} chars"
            for p in pages() for no, text in fenced_lines(p) if len(text) > CODE_WIDTH]
    assert long == [], (f"{len(long)} code lines wider than {CODE_WIDTH} characters (wrap "
                        "them with a \\ continuation or move the comment above):\n"
                        + "\n".join(long))


def test_fence_reader_sees_long_and_indented_code(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("text " + "x" * 200 + "\n\n```bash\nls\n" + "y" * 90 + "\n```\n\n"
                    "1. step\n\n    ```yaml\n    a: 1\n    ```\n")
    assert [(no, len(t)) for no, t in fenced_lines(page)] == [(4, 2), (5, 90), (11, 4)]


def test_no_paragraph_is_glued_to_a_table() -> None:
    """A line of text right under a table becomes one more (bogus) table row."""
    glued = []
    for p in pages():
        prev = ""
        for no, line in prose_lines(p):
            if prev.lstrip().startswith("|") and line.strip() and not line.lstrip().startswith(
                    ("|", "<!--")):
                glued.append(f"{p.relative_to(ROOT)}:{no}: {line[:60]}")
            prev = line
    assert glued == [], "text right below a table (add a blank line):\n" + "\n".join(glued)


def _documented_modules() -> list[str]:
    """Modules the API reference renders (``::: moesim.x.y``)."""
    names = []
    for page in sorted((PAGES / "api").glob("*.md")):
        names += re.findall(r"^:::\s*([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    return names


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def test_no_issue_numbers_a_reader_cannot_see() -> None:
    """The docs, the README and the docstrings the API reference shows never say "issue 12":
    readers of the site have no issue tracker to look it up in."""
    files = [ROOT / "README.md", *pages()]
    files += [f for n in _documented_modules() if (f := _module_file(n)) is not None]
    hits = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        for m in ISSUE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{f}:{line}: {m.group(0)!r}")
    assert hits == [], "\n".join(hits)


def test_issue_pattern_spans_a_line_break() -> None:
    assert ISSUE.search("as in issue\n12's definitions") and not ISSUE.search("rmm issue #451")


def _source_table() -> dict[str, str]:
    text = (ROOT / "hw_profiles" / "SOURCES.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\|\s*(S\d+)\s*\|\s*(.+?)\s*\|\s*$", text, re.M))


def test_every_source_id_of_a_shipped_profile_resolves() -> None:
    """Profiles, runtime profiles and model cards cite ids of hw_profiles/SOURCES.md (a source
    may also be given in full inline, which needs no id)."""
    table = _source_table()
    assert table and all(re.search(r"\w{3}", v) for v in table.values())
    files = [*sorted((ROOT / "hw_profiles").rglob("*.yaml")),
             *sorted((ROOT / "traces" / "models").glob("*.yaml"))]
    assert len(files) > 10
    missing = {}
    for f in files:
        for sid in SOURCE_ID.findall(f.read_text(encoding="utf-8")):
            if sid not in table:
                missing.setdefault(str(f.relative_to(ROOT)), []).append(sid)
    assert missing == {}, f"source ids not in hw_profiles/SOURCES.md: {missing}"


def test_sources_table_is_a_docs_page_linked_from_hardware_profiles() -> None:
    page = PAGES / "sources.md"
    assert page.resolve() == (ROOT / "hw_profiles" / "SOURCES.md").resolve()
    assert "](sources.md)" in (PAGES / "hardware-profiles.md").read_text(encoding="utf-8")


def test_api_reference_covers_every_shipped_policy_and_placement() -> None:
    """Each registered eviction, prefetch and placement class of the package is rendered: its
    module (all public members) or the class itself is named by a ``:::`` line."""
    registry = pytest.importorskip("moesim.policies.registry")
    registry.discover()
    documented = set(_documented_modules())
    classes = {c for table in (registry.EVICTION, registry.PREFETCH, registry.PLACEMENT)
               for c in table.values() if c.__module__.startswith("moesim.policies.")}
    assert len(classes) >= 15
    missing = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes
                     if c.__module__ not in documented
                     and f"{c.__module__}.{c.__qualname__}" not in documented)
    assert missing == [], (f"not in experiments/docs/pages/api/*.md: {missing}; add a line "
                           "'::: moesim.policies.<module>' under its kind in api/policies.md")
