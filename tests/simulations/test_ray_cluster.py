"""``fleetlora simulate --ray-address``: a researcher's existing Ray cluster runs the devices.

The cluster is a real one, ``ray start --head`` on 127.0.0.1 with its own temp folder (so no other Ray on
the machine is touched, and no other test's simulation finds it); ``--block`` keeps it in the foreground,
so stopping that one process takes the cluster down.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simulations.test_simulate_cli import _error_line, fleetlora

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A head node's address and its session logs; the cluster goes away after the test."""
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert head.poll() is None, head.stderr.read() if head.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ray start --head did not listen within 90 s")
        yield f"127.0.0.1:{port}", temp / "session_latest" / "logs"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_simulation_runs_its_devices_on_an_existing_ray_cluster(tmp_path: Path, ray_head: tuple[str, Path]):
    address, logs = ray_head
    out = tmp_path / "run"
    done = fleetlora(
        "simulate", "--model", "tiny", "--devices", "3", "--rounds", "1", "--partition", "iid",
        "--ray-address", address, "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["rounds"][0]["version"] is not None and results["rounds"][0]["participants"] == 3
    # The simulation was the cluster's first driver (job 01000000); its devices ran in the cluster's workers.
    assert list(logs.glob("python-core-driver-01000000*")), sorted(p.name for p in logs.iterdir())
    assert list(logs.glob("python-core-worker-*"))


def test_a_cluster_that_does_not_answer_is_a_one_line_error(tmp_path: Path):
    port = _free_port()  # nothing listens there
    done = fleetlora(
        "simulate", "--model", "tiny", "--devices", "2", "--rounds", "1",
        "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    line = _error_line(done)
    assert f"No Ray cluster answers at 127.0.0.1:{port}" in line and "ray start --head" in line


@pytest.mark.parametrize("address", ["localhost", "http://x:1", "a b:1", "1.2.3.4:port"])
def test_a_malformed_address_is_refused_before_anything_starts(tmp_path: Path, address: str):
    from fleetlora.common.errors import ConfigError
    from fleetlora.simulations.runner import SimulationConfig

    with pytest.raises(ConfigError, match="--ray-address must be HOST:PORT"):
        SimulationConfig(out=tmp_path, ray_address=address)
