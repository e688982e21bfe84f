"""The warnings policy of pyproject.toml: moesim's own warnings fail tests; a library's
deprecation does not, even when (stacklevel=2) it blames moesim's calling line."""

import sys
import types
import warnings

import pytest


def test_own_warning_is_an_error() -> None:
    with pytest.raises(RuntimeWarning):
        warnings.warn("moesim computed nonsense", RuntimeWarning, stacklevel=1)


def _library(monkeypatch: pytest.MonkeyPatch, stacklevel: int) -> types.ModuleType:
    lib = types.ModuleType("some_library")
    exec("import warnings\ndef f():\n    warnings.warn('moved', FutureWarning, "
         f"stacklevel={stacklevel})\n", lib.__dict__)
    monkeypatch.setitem(sys.modules, "some_library", lib)
    return lib


@pytest.mark.parametrize("stacklevel", [1, 2])
def test_library_deprecation_is_not_a_failure(monkeypatch: pytest.MonkeyPatch,
                                              stacklevel: int) -> None:
    lib = _library(monkeypatch, stacklevel)
    with pytest.warns(FutureWarning, match="moved"):  # it is a warning ...
        lib.f()
    # ... and under the project's filters it does not raise, even where stacklevel=2 blames
    # this test module, as it would blame moesim's calling line.
    lib.f()
