"""The warnings policy of pyproject.toml: moesim's own warnings fail tests, a third-party
library's deprecations do not."""

import sys
import types
import warnings

import pytest


def test_own_deprecation_is_an_error() -> None:
    with pytest.raises(FutureWarning):
        warnings.warn("moesim's own API moved", FutureWarning, stacklevel=1)


def test_third_party_deprecation_is_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = types.ModuleType("some_library")
    exec("import warnings\ndef f():\n    warnings.warn('moved', FutureWarning)\n", lib.__dict__)
    monkeypatch.setitem(sys.modules, "some_library", lib)
    with pytest.warns(FutureWarning, match="moved"):
        lib.f()
    lib.f()  # outside pytest.warns: shown in the summary, not raised
