"""Ctrl-C on `fleetlora device up`: the SuperNode and the warm runner stop, quietly and soon.

A terminal's Ctrl-C reaches the whole process group; `device up` used to forward a second SIGINT,
which could arrive inside Flower's own shutdown and wedge the SuperNode, and the runner printed a
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetlora.simulations.local_deployment import fleetlora

pytestmark = pytest.mark.slow


def test_ctrl_c_stops_the_device_agent_cleanly(tmp_path: Path):
    port = 19400 + os.getpid() % 400
    fleetlora("device", "enroll", "--state-dir", "dev", "--device-id", "d1", cwd=tmp_path)
    fleetlora("coordinator", "certs", "init", "--dir", "certs", cwd=tmp_path)
    fleetlora("coordinator", "keys", "init", "--dir", "keys", cwd=tmp_path)
    (tmp_path / "device.toml").write_text(
        f'[device]\ncoordinator = "127.0.0.1:{port}"\ndevice-id = "d1"\nstate-dir = "dev"\n'
        f'ca-cert = "certs/ca.crt"\ncoordinator-keys = "keys"\nruntime-port = {port + 1}\n'
    )  # no coordinator listens: the SuperNode keeps retrying, as it would while one restarts
    agent = subprocess.Popen(
        [sys.executable, "-m", "fleetlora", "device", "up", "--config", "device.toml"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    time.sleep(15)  # the SuperNode up and the runner's imports (torch, flwr) done
    assert agent.poll() is None
    os.killpg(agent.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    try:
        output, _ = agent.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"`device up` still running 30 s after Ctrl-C:\n{agent.communicate()[0][-3000:]}")
    assert agent.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "SuperNode terminated gracefully" in output
