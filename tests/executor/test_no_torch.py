"""The simulator proper never imports torch; the executor package imports it only to run."""

from __future__ import annotations

import subprocess
import sys


def test_simulator_and_executor_package_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import moesim.sim, moesim.sim.engine, moesim.sim.run, moesim.policies.registry\n"
        "moesim.policies.registry.discover()\n"
        "import moesim.sim.executor, moesim.sim.executor.run, moesim.sim.executor.storage\n"
        "import moesim.sim.executor.cuda, moesim.sim.executor.compute\n"
        "import moesim.sim.executor.copier, moesim.sim.executor.slots\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
