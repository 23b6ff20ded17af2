"""LocalFleet's hosts do not outlive what started them: a killed test run or benchmark leaves no fleet."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's prctl"),
]

STARTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fleetlora.simulations.local_deployment import LocalFleet

    fleet = LocalFleet(Path(sys.argv[1]), devices=0)
    fleet.start_coordinator()
    print(fleet.hosts["coordinator"].process.pid, flush=True)
    time.sleep(600)  # killed before this ends: its cleanup never runs
    """
)


def test_a_killed_starter_takes_its_coordinator_host_and_superlink_with_it(tmp_path: Path):
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path / "fleet")], stdout=subprocess.PIPE, text=True
    )
    try:
        host = psutil.Process(int(starter.stdout.readline()))
        family = [host, *host.children(recursive=True)]
        assert any("flower-superlink" in " ".join(p.cmdline()) for p in family)

        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(timeout=10)

        _, alive = psutil.wait_procs(family, timeout=45)
        assert alive == [], f"still running after the starter died: {[p.cmdline()[:3] for p in alive]}"
    finally:
        if starter.poll() is None:
            starter.kill()
        for process in psutil.process_iter(["cmdline"]):  # nothing of this test's fleet is left either way
            if str(tmp_path) in " ".join(process.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
