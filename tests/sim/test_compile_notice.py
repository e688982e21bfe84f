"""The compiled engine's compile notice (``sim.compiled.stamp``): one stderr line when a call
is about to compile (cold numba cache), nothing when the cache is warm or the code is loaded."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from moesim.sim.compiled.stamp import NOTICE, compile_notice, refresh_cache, will_compile

_SRC = """
import numba

@numba.njit(cache=True)
def twice(x):
    return {factor} * x
"""


def _module(folder: Path, factor: int = 2):
    path = folder / "nbmod.py"
    path.write_text(textwrap.dedent(_SRC.format(factor=factor)))
    spec = importlib.util.spec_from_file_location(f"nbmod_{factor}_{id(folder)}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notice_once_when_cold_then_silent(tmp_path):
    mod = _module(tmp_path)
    out = io.StringIO()
    assert will_compile(mod.twice)
    assert compile_notice(mod.twice, out)
    assert out.getvalue() == NOTICE + "\n"
    assert mod.twice(3) == 6
    out = io.StringIO()
    assert not compile_notice(mod.twice, out)  # loaded in this process
    assert out.getvalue() == ""


def test_warm_cache_in_a_new_process_is_silent_and_an_edit_is_cold(tmp_path):
    _module(tmp_path).twice(1)  # compiles and writes the cache
    src = str(tmp_path / "nbmod.py")
    code = ("import importlib.util, sys\n"
            "from moesim.sim.compiled.stamp import compile_notice\n"
            f"spec = importlib.util.spec_from_file_location('nbmod', {src!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(compile_notice(m.twice))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert run.stdout.strip() == "False" and NOTICE not in run.stderr
    mod = _module(tmp_path, factor=3)  # new source: numba's index is stale for it
    assert will_compile(mod.twice)


def test_refresh_cache_drops_files_when_the_sources_change(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    refresh_cache(src, cache)
    (cache / "k.f-1.py311.nbi").write_text("")
    assert not refresh_cache(src, cache)  # same sources: kept
    assert (cache / "k.f-1.py311.nbi").exists()
    (src / "a.py").write_text("x = 2\n")
    assert refresh_cache(src, cache)
    assert not (cache / "k.f-1.py311.nbi").exists()


def test_a_plain_function_never_compiles():
    """``NUMBA_DISABLE_JIT=1`` leaves the kernels plain functions: no notice."""
    out = io.StringIO()
    assert not compile_notice(lambda x: x, out)
    assert out.getvalue() == ""
