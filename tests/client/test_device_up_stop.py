"""Ctrl-C on `fleetlora device up`: the SuperNode and the warm runner stop, quietly and soon.

A terminal's Ctrl-C reaches the whole process group; `device up` used to forward a second SIGINT,
which could arrive inside Flower's own shutdown and wedge the SuperNode, and the runner printed a
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from fleetlora.simulations.local_deployment import fleetlora, free_ports, wait_for

pytestmark = pytest.mark.slow


def test_ctrl_c_stops_the_device_agent_cleanly(tmp_path: Path):
    port = free_ports(2)  # the coordinator nobody runs, and the runtime port
    fleetlora("device", "enroll", "--state-dir", "dev", "--device-id", "d1", cwd=tmp_path)
    fleetlora("coordinator", "certs", "init", "--dir", "certs", cwd=tmp_path)
    fleetlora("coordinator", "keys", "init", "--dir", "keys", cwd=tmp_path)
    (tmp_path / "device.toml").write_text(
        f'[device]\ncoordinator = "127.0.0.1:{port}"\ndevice-id = "d1"\nstate-dir = "dev"\n'
        f'ca-cert = "certs/ca.crt"\ncoordinator-keys = "keys"\nruntime-port = {port + 1}\n'
    )  # no coordinator listens: the SuperNode keeps retrying, as it would while one restarts
    agent = psutil.Popen(
        [sys.executable, "-m", "fleetlora", "device", "up", "--config", "device.toml"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        for line in agent.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The SuperNode up (retrying its coordinator) and the runner's imports (torch, flwr) done.
    wait_for(lambda: any("Connection attempt failed" in line for line in lines), 120, "the SuperNode")
    wait_for(lambda: _runner_polls(agent, port + 1), 120, "the warm runner's imports", poll=0.2)
    assert agent.poll() is None
    os.killpg(agent.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    try:
        agent.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        reader.join(timeout=10)
        pytest.fail(f"`device up` still running 30 s after Ctrl-C:\n{''.join(lines)[-3000:]}")
    reader.join(timeout=10)
    output = "".join(lines)
    assert agent.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "SuperNode terminated gracefully" in output


def _runner_polls(agent: psutil.Popen, runtime_port: int) -> bool:
    """The warm runner asks the SuperNode's runtime API for work (over a kept-alive connection), which
    it does once its imports are done."""
    for child in agent.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "fleetlora.client.warm_clientapp" in child.cmdline() and any(
                c.raddr and c.raddr.port == runtime_port for c in child.net_connections()
            ):
                return True
    return False
