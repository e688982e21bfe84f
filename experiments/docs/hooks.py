"""MkDocs hooks for the moesim site (``experiments/docs/mkdocs.yml`` loads this file).

Two things the repository's fixed layout needs:

* **API sources.** Installed, the folders ``sim``, ``traces``, ... are the subpackages of one
  package ``moesim`` whose own files live in ``experiments/moesim``; an editable install maps
  them with an import hook that griffe (mkdocstrings' loader) does not follow. So before the
  build this hook lays the package out as one tree of symlinks under ``build/api/moesim`` (the
  handler's ``paths``), asking the import system where each subpackage lives.
* **Figures outside the pages folder.** Pages link figures by their path in the repository
  (``../../figures/x.png``), so the same Markdown renders on GitHub; MkDocs only publishes files
  inside ``docs_dir``, so every such link to a repository file is rewritten to a copy under
  ``_repo/`` in the built site.

And one griffe extension (:class:`SphinxRoles`, named in mkdocs.yml): the docstrings use
Sphinx roles (``:func:`simulate```), which Markdown would print literally.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any

import griffe
from mkdocs.structure.files import File, Files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SUBPACKAGES = ("sim", "traces", "policies", "predictors", "hw_profiles", "experiments")
# Folders of moesim.experiments that hold no API (or would loop back into this tree).
SKIP_IN_EXPERIMENTS = {"moesim", "docs", "conf", "figures", "results", "__pycache__"}
ASSET_SUFFIXES = {".png", ".pdf", ".svg", ".csv", ".json", ".jpg", ".gif"}
# :func:`x`, :class:`~a.b.C` (Sphinx roles; ~ shows the last component only).
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
# ![alt](target) and [text](target); the target stops at whitespace or ')'.
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot find package {name}: is moesim installed (pip install -e .)?")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def build_api_tree(dest: Path) -> Path:
    """``dest/moesim`` as one package tree of symlinks to where each subpackage lives."""
    top = dest / "moesim"
    if top.is_symlink() or top.is_file():
        top.unlink()
    elif top.exists():
        shutil.rmtree(top)
    top.mkdir(parents=True)
    own = _package_dir("moesim")
    for f in own.glob("*.py"):
        (top / f.name).symlink_to(f)
    for sub in SUBPACKAGES:
        src = _package_dir(f"moesim.{sub}")
        if sub != "experiments":
            (top / sub).symlink_to(src, target_is_directory=True)
            continue
        (top / sub).mkdir()
        for entry in src.iterdir():
            if entry.name in SKIP_IN_EXPERIMENTS or entry.name.startswith("."):
                continue
            if entry.is_dir() or entry.suffix == ".py":
                (top / sub / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return top


def on_startup(command: str, dirty: bool) -> None:
    # Before mkdocstrings' on_config, which reads the handler's ``paths`` (build/api, relative
    # to mkdocs.yml, which lives next to this file).
    build_api_tree(HERE / "build" / "api")


def _repo_target(page_src: Path, target: str) -> Path | None:
    """The repository file a relative link points at, when it lies outside the pages folder."""
    if "://" in target or target.startswith(("#", "/", "mailto:")):
        return None
    path = target.split("#", 1)[0]
    if Path(path).suffix.lower() not in ASSET_SUFFIXES:
        return None
    resolved = (page_src.parent / path).resolve()
    try:
        resolved.relative_to(ROOT)
    except ValueError:
        return None
    return resolved if resolved.is_file() else None


def on_files(files: Files, config: Any) -> Files:
    docs = Path(config.docs_dir).resolve()
    wanted: set[Path] = set()
    for f in files.documentation_pages():
        src = Path(f.abs_src_path)
        for m in LINK.finditer(src.read_text(encoding="utf-8")):
            target = _repo_target(src, m.group(2))
            if target is not None and docs not in target.parents:
                wanted.add(target)
    for target in sorted(wanted):
        uri = "_repo/" + target.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(target)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src = Path(page.file.abs_src_path)
    docs = Path(config.docs_dir).resolve()
    depth = posixpath.dirname(page.file.src_uri)

    def fix(m: re.Match[str]) -> str:
        target = _repo_target(src, m.group(2))
        if target is None or docs in target.parents:
            return m.group(0)
        uri = "_repo/" + target.relative_to(ROOT).as_posix()
        return m.group(1) + posixpath.relpath(uri, depth or ".") + m.group(3)

    return LINK.sub(fix, markdown)


def _role(m: re.Match[str]) -> str:
    name = m.group(2).split(".")[-1] if m.group(1) else m.group(2)
    return f"`{name}`"


class SphinxRoles(griffe.Extension):
    """Sphinx roles in docstrings become Markdown code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_role, obj.docstring.value)
