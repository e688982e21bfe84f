"""The simulator proper never imports torch; the executor package imports it only to run."""

from __future__ import annotations

import subprocess
import sys


def test_simulator_and_executor_package_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import sim, sim.engine, sim.run, policies, policies.registry\n"
        "policies.registry.discover()\n"
        "import sim.executor, sim.executor.run, sim.executor.storage, sim.executor.cuda\n"
        "import sim.executor.compute, sim.executor.copier, sim.executor.slots\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
