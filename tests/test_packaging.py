"""The repository's folders install as one package, ``moesim``, and nothing else.

The layout is fixed (the folders stay at the top level), so pyproject.toml maps each folder to a
subpackage by hand; these tests catch a folder added without its mapping and a module that still
imports a bare top-level name (which would load a second copy of that module in a checkout and
fail outright in an installed copy).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("sim", "traces", "policies", "predictors", "hw_profiles", "experiments")
# The package's own folder (mapped to ``moesim`` itself) and repository tooling that is not
# installed: the docs site's build hooks and command checker.
# experiments/moesim is the package's own folder (mapped to moesim itself); the docs and the
# committed results (CSVs, the profiles a validation run wrote) are the repository's, not the
# package's
NOT_SHIPPED = ("experiments/moesim/", "experiments/docs/", "experiments/results/")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_every_folder_with_code_or_data_is_a_listed_package() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    wanted = {"moesim"}
    for f in _tracked():
        parts = Path(f).parts
        if parts[0] not in FOLDERS or f.startswith(NOT_SHIPPED):
            continue
        if Path(f).suffix in (".py", ".yaml") or "assets" in parts:
            wanted.add("moesim." + ".".join(parts[:-1]))
    assert listed == wanted, (sorted(wanted - listed), sorted(listed - wanted))


def test_package_dirs_map_each_folder() -> None:
    dirs = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert dirs == {"moesim": "experiments/moesim", **{f"moesim.{f}": f for f in FOLDERS}}


def test_no_module_imports_a_bare_top_level_name() -> None:
    bare = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s|$)", re.M)
    offenders = [f for f in _tracked() if f.endswith(".py") and bare.search((ROOT / f).read_text())]
    assert not offenders


def test_import_moesim_loads_no_top_level_folder_module(tmp_path: Path) -> None:
    code = (
        "import sys, moesim, moesim.experiments.sim_app, moesim.policies.registry as r\n"
        "r.discover()\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FOLDERS!r}]\n"
        "assert not bad, bad\n"
        "print(moesim.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() and out.stdout.strip() != "0+unknown"


def test_the_embedded_trace_ships_for_the_current_assets() -> None:
    """``trace=embedded`` replays package data, not a torch run: the shipped routing file is
    named by the current assets' key (a retrained model or new prompts need a new file:
    ``python -m moesim.traces.collect.embedded --write``), is tracked, and is small."""
    from moesim.traces.collect.embedded import (
        ASSETS,
        MODEL_NAME,
        SHIPPED_SUFFIX,
        embedded_key,
        embedded_routing,
        shipped_path,
    )
    from moesim.traces.store import load_trace

    shipped = shipped_path()
    assert sorted(ASSETS.glob(f"{MODEL_NAME}-*{SHIPPED_SUFFIX}")) == [shipped]
    assert str(shipped.resolve().relative_to(ROOT)) in _tracked()
    assert shipped.stat().st_size < 2 * 2**20
    assert embedded_routing() == shipped
    trace = load_trace(shipped)
    assert len(trace) == 64 and trace.meta.notes["embedded_key"] == embedded_key()
    assert "/" not in trace.meta.notes.get("model_path", "")  # no machine's paths


def test_the_shipped_embedded_trace_is_what_the_generator_gives(tmp_path: Path,
                                                                monkeypatch) -> None:
    """A fresh collection of the first prompts (the collector runs each prompt alone), put
    through the shipped file's generator, has the same routing as the shipped file's first
    requests (``python -m moesim.traces.collect.embedded`` compares all 64; CI runs it)."""
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moesim.traces.collect.embedded import (
        ensure_embedded_trace,
        same_routing,
        shipped_path,
        write_shipped,
    )

    monkeypatch.setenv("MOESIM_CACHE", str(tmp_path / "cache"))
    fresh = write_shipped(ensure_embedded_trace(limit=3), tmp_path / "fresh.parquet")
    assert same_routing(shipped_path(), fresh, max_requests=3) == []


def test_a_development_install_is_a_current_link_tree() -> None:
    """``pip install -e`` makes a link tree (setup.cfg: ``[editable_wheel] mode = strict``)
    that IDEs and type checkers follow, instead of an import hook they cannot.
    A link tree holds the files that existed at install time: one added since (a new policy
    module, a new profile) is missing until the install command is rerun, which this says."""
    import moesim

    tree = Path(moesim.__file__).parent.parent
    if not tree.is_relative_to(ROOT / "build"):
        import pytest

        pytest.skip(f"moesim is not a strict editable install of this checkout ({tree})")
    missing = []
    for f in _tracked():
        parts = Path(f).parts
        if parts[0] not in FOLDERS or f.startswith(NOT_SHIPPED[1:]) or not f.endswith(
                (".py", ".yaml")):
            continue
        rel = parts[2:] if f.startswith("experiments/moesim/") else parts
        if not (tree / "moesim" / Path(*rel)).exists():
            missing.append(f)
    assert not missing, ("rerun `pip install -c constraints.txt -e '.[dev]'`: the development "
                         f"install predates {missing[:5]} ({len(missing)} files)")


def test_a_missing_extra_is_one_line_naming_it() -> None:
    from moesim.extras import MissingExtra, as_missing_extra, require

    err = as_missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch"), "x")
    assert isinstance(err, MissingExtra)
    assert str(err) == "x needs torch, which is not installed: pip install 'moesim[predictors]'"
    other = ModuleNotFoundError("No module named 'nope'", name="nope")
    assert as_missing_extra(other) is other  # not an extra's: left as it is
    import pytest

    with pytest.raises(MissingExtra, match=r"moesim\[collect\]"):
        require(("no_such_module_for_moesim",), "collect", "y")


# Imported only inside a function that turns its absence into one clear error line.
OPTIONAL_UNDECLARED = {"datasets": "traces/collect/prompts.py: hf prompt sets"}


def test_every_imported_package_is_a_declared_dependency() -> None:
    """Every third-party module the package imports, at module level or inside a function, is
    a declared dependency or extra, not one that happens to be installed here or arrives only
    through another package (a function-level ``import scipy`` once passed every test on this
    machine and failed in a fresh environment from the lock)."""
    import ast
    from importlib.metadata import packages_distributions

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = _pyproject()["project"]
    reqs = list(project.get("dependencies", [])) + [
        r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    declared = {norm(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in reqs}
    dists = packages_distributions()
    found: dict[str, str] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(NOT_SHIPPED) and not rel.startswith("experiments/moesim/"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    found.setdefault(mod.split(".")[0], rel)
    bad = []
    for name, where in sorted(found.items()):
        if name in sys.stdlib_module_names or name in ("moesim", "__future__"):
            continue
        if name in OPTIONAL_UNDECLARED:
            continue
        owners = dists.get(name) or []
        if not any(norm(d) in declared for d in owners):
            bad.append(f"{name} (first in {where}; installed from {owners or 'nothing'})")
    assert bad == [], "imported but not declared in pyproject.toml: " + "; ".join(bad)
