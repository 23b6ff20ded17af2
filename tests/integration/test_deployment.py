"""The deployed fleet as an operator runs it: real processes on 127.0.0.1, TLS and SuperNode auth on.

One coordinator host (``fleetlora coordinator up``: flower-superlink) and two devices (``fleetlora
device up``: flower-supernode), set up with the same commands docs/operator.md and docs/device.md
give. The test walks the failure cases the issue names: a device that is not registered is
refused; a coordinator killed with SIGKILL in the middle of a run comes back and the next run
continues from the last stored version, nothing lost or repeated; a device killed mid-round leaves
the round to the survivors, within its deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlora.common.host_config import load_host_config
from fleetlora.coordinator import flower_control
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.registry import Registry

pytestmark = pytest.mark.slow
PORT = 19300 + os.getpid() % 500  # one SuperLink per test process, away from Flower's defaults
DEADLINE = 60.0


def fleetlora(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "fleetlora", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"fleetlora {' '.join(args)}: {done.stderr[-3000:]}"
    return done


class Host:
    """A long-running ``fleetlora ... up`` in its own process group, logging to a file."""

    def __init__(self, args: list[str], cwd: Path, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetlora", *args],
            cwd=cwd,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the host with everything it started, as one group
        )

    def kill(self) -> None:
        """SIGKILL the whole group, as a power cut would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def write_configs(folder: Path, devices: int) -> None:
    (folder / "fleetlora.toml").write_text(
        f"""[coordinator]
port = {PORT}
state-dir = "coordinator"

[federation]
model = "tiny"
data = "builtin"
eval-data = "builtin-test"
rounds = 1
devices-per-round = 2
min-devices = 2
round-deadline = {DEADLINE}
local-steps = 5
"""
    )
    for i in range(1, devices + 1):
        (folder / f"device-{i}.toml").write_text(
            f"""[device]
coordinator = "127.0.0.1:{PORT}"
device-id = "device-{i}"
state-dir = "device-{i}"
ca-cert = "coordinator/certs/ca.crt"
coordinator-keys = "coordinator/keys"
data = "builtin"
upload-consent = true
runtime-port = {PORT + 100 + i}
"""
        )


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict]:
    write_configs(tmp_path, devices=3)
    config = tmp_path / "fleetlora.toml"
    hosts: dict[str, Host] = {}
    try:
        hosts["coordinator"] = Host(
            ["coordinator", "up", "--config", str(config)], tmp_path, tmp_path / "coordinator.log"
        )
        host = load_host_config(config).coordinator
        wait_for(
            lambda: (host.certs_dir / "ca.crt").exists() and _runs(host) is not None, 60, "the SuperLink"
        )
        for i in (1, 2):
            fleetlora(
                "device", "enroll", "--state-dir", f"device-{i}", "--device-id", f"device-{i}", cwd=tmp_path
            )
            fleetlora(
                "coordinator", "devices", "enroll", "--device-id", f"device-{i}",
                "--public-key", f"device-{i}/device-signing.pub",
                "--auth-key", f"device-{i}/supernode-auth.pub",
                "--config", str(config), cwd=tmp_path,
            )  # fmt: skip
            hosts[f"device-{i}"] = Host(
                ["device", "up", "--config", f"device-{i}.toml"], tmp_path, tmp_path / f"device-{i}.log"
            )
        wait_for(lambda: _online(host) == 2, 60, "both devices online")
        yield {"folder": tmp_path, "config": config, "host": host, "hosts": hosts}
    finally:
        for process in hosts.values():
            process.stop()


def _runs(host):  # type: ignore[no-untyped-def]
    try:
        return flower_control.list_runs(host)
    except flower_control.ControlError:
        return None


def _online(host) -> int:  # type: ignore[no-untyped-def]
    try:
        return sum(n["status"] == "online" for n in flower_control.list_nodes(host))
    except flower_control.ControlError:
        return 0


def _status(host, run_id: int) -> str:  # type: ignore[no-untyped-def]
    return next((r["status"] for r in _runs(host) or [] if int(r["run-id"]) == run_id), "")


def _finished(host, run_id: int) -> str | None:  # type: ignore[no-untyped-def]
    status = _status(host, run_id)
    return status if status.startswith("finished") else None


def _start(fleet: dict, *args: str) -> int:
    done = fleetlora(
        "coordinator", "round", "start", "--config", str(fleet["config"]), *args, cwd=fleet["folder"]
    )
    return int(done.stdout.split("started run ")[1].split(";")[0])


def test_a_deployed_fleet_trains_refuses_strangers_and_survives_kills(fleet: dict):
    folder, config, host, hosts = fleet["folder"], fleet["config"], fleet["host"], fleet["hosts"]
    registry = Registry(Database(host.database_url).initialize())

    # 1. One round on two devices over TLS with authenticated SuperNodes stores a new version.
    run = _start(fleet)
    assert wait_for(lambda: _finished(host, run), 240, "the first run") == "finished:completed"
    versions = registry.versions()
    assert [v.round for v in versions] == [0, 1] and len(versions[1].participants) == 2
    status = json.loads(
        fleetlora("coordinator", "status", "--config", str(config), "--json", cwd=folder).stdout
    )
    assert {d["device"]: d["version"] for d in status["devices"]} == {"device-1": "v2", "device-2": "v2"}

    # 2. A device whose SuperNode key was never registered is turned away by the SuperLink.
    fleetlora("device", "enroll", "--state-dir", "device-3", "--device-id", "device-3", cwd=folder)
    stranger = subprocess.run(
        [sys.executable, "-m", "fleetlora", "device", "up", "--config", "device-3.toml"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stranger.returncode != 0
    assert "Failed to activate SuperNode" in stranger.stdout + stranger.stderr
    assert _online(host) == 2

    # 3. SIGKILL the coordinator host in the middle of a two-round run, then start it again.
    run = _start(fleet, "--rounds", "2")
    wait_for(lambda: len(registry.versions()) == 3, 240, "the interrupted run's first round")
    hosts["coordinator"].kill()
    restarted = time.monotonic()
    hosts["coordinator"] = Host(
        ["coordinator", "up", "--config", str(config)], folder, folder / "coordinator.log"
    )
    wait_for(lambda: _online(host) == 2, 60, "devices back after the restart", poll=0.5)
    assert time.monotonic() - restarted < 30  # SuperLink up and both devices reconnected
    run = _start(fleet)
    assert wait_for(lambda: _finished(host, run), 240, "the run after the restart") == "finished:completed"
    rounds = [v.round for v in registry.versions()]
    assert rounds == sorted(set(rounds)) and rounds[:3] == [0, 1, 2]  # nothing lost, nothing repeated
    last = registry.versions()[-1]
    assert last.parent_id == registry.versions()[-2].id

    # 4. Kill one device during a round: the survivor completes it before the deadline.
    run = _start(fleet, "--min-devices", "1")
    wait_for(lambda: _status(host, run) == "running", 60, "the run to start", poll=0.5)
    time.sleep(2)
    hosts["device-2"].kill()
    started = time.monotonic()
    assert wait_for(lambda: _finished(host, run), 240, "the run with a dead device") == "finished:completed"
    newest = registry.versions()[-1]
    assert newest.round == last.round + 1 and len(newest.participants) == 1
    assert time.monotonic() - started < 2 * DEADLINE + 60  # the train deadline and the evaluation one
