"""What importing the simulator and the trace package costs: names load on first use.

Each check runs in a fresh interpreter (``sys.modules`` of this test process already holds
everything), so it sees exactly what one import pulls in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import moesim.sim
import moesim.traces

ROOT = Path(__file__).resolve().parents[2]  # tests.helpers imports from here
HEAVY_SIM = ["moesim.sim.compiled.kernel", "moesim.sim.engine", "simpy", "pandas"]


def _loaded(code: str, names: list[str]) -> dict[str, bool]:
    """Which of ``names`` are in ``sys.modules`` after ``code`` ran in a fresh process."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps({{n: n in sys.modules for n in {names!r}}}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_simulator_loads_no_engine_or_kernel() -> None:
    got = _loaded("import moesim.sim, moesim.sim.workload, moesim.sim.compiled", HEAVY_SIM)
    assert not any(got.values()), got


def test_importing_traces_loads_no_importer() -> None:
    names = ["moesim.traces.importers", "moesim.traces.store", "moesim.traces.predictions"]
    got = _loaded("import moesim.traces\nfrom moesim.traces import TraceError", names)
    assert not any(got.values()), got
    got = _loaded("from moesim.traces import import_trace", names[:1])
    assert got == {"moesim.traces.importers": True}


def test_a_simpy_run_loads_no_kernel_and_a_compiled_run_does() -> None:
    run = ("from tests.helpers import random_trace\nfrom moesim.sim import simulate\n"
           "t = random_trace(num_requests=2, tokens=4, layers=2, experts=4, top_k=1, seed=0)\n"
           "r = simulate(t, 'lru', capacity=4, mode='zero_latency', engine='{}')\n"
           "assert r.summary['sim_engine'] == '{}'")
    kernel = ["moesim.sim.compiled.kernel"]
    assert _loaded(run.format("python", "python"), kernel) == {kernel[0]: False}
    assert _loaded(run.format("compiled", "compiled"), kernel) == {kernel[0]: True}


def test_every_public_name_resolves() -> None:
    for pkg in (moesim.sim, moesim.traces):
        assert sorted(pkg.__all__) == sorted(pkg._WHERE)  # one list, no name forgotten
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, (pkg.__name__, name)
        assert set(pkg.__all__) <= set(dir(pkg))
    from moesim.sim import compiled

    assert compiled.kernel.replay is compiled._kernel().replay
    try:
        moesim.sim.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
