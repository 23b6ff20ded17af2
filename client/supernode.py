"""Run a device's SuperNode: TLS to the coordinator, its auth key, and the node config the ClientApp reads.

``fleetlora device up`` checks that the device is enrolled and holds the coordinator's CA and public
keys, then runs ``flower-supernode`` in the foreground. The node config carries the device's id,
state folder, data, consent and the coordinator keys' paths; the ClientApp reads nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from types import FrameType

from fleetlora.client.enroll import SUPERNODE_AUTH_KEY
from fleetlora.client.privacy_floor import DP_MAX_DELTA, DP_MAX_EPSILON
from fleetlora.common.errors import ConfigError
from fleetlora.common.flower_env import flower_command, flower_env
from fleetlora.common.host_config import DeviceHost
from fleetlora.common.keys import COORDINATOR_HPKE_PUB, COORDINATOR_SIGNING_PUB, DEVICE_SIGNING_KEY

log = logging.getLogger(__name__)


def node_config(device: DeviceHost) -> str:
    """The ``--node-config`` string: TOML values, space separated."""
    values: dict[str, str | bool | int | float] = {
        "device-id": device.device_id,
        "state-dir": str(device.state_dir.resolve()),
        "data-path": device.data,
        "upload-consent": device.upload_consent,
        "coordinator-key": str((device.coordinator_keys / COORDINATOR_HPKE_PUB).resolve()),
        "coordinator-signing-key": str((device.coordinator_keys / COORDINATOR_SIGNING_PUB).resolve()),
        **device.settings.to_node_config(),  # accelerator, memory, priority, gates
    }
    if math.isfinite(device.dp_max_epsilon):  # the owner's privacy floor (client/privacy_floor.py)
        values[DP_MAX_EPSILON] = device.dp_max_epsilon
        values[DP_MAX_DELTA] = device.dp_max_delta
    return " ".join(
        f"{key}={'true' if value is True else 'false' if value is False else json.dumps(value)}"
        for key, value in values.items()
    )


def supernode_command(device: DeviceHost) -> list[str]:
    missing = [
        p
        for p in (
            device.state_dir / SUPERNODE_AUTH_KEY,
            device.state_dir / DEVICE_SIGNING_KEY,
            device.ca_cert,
            device.coordinator_keys / COORDINATOR_HPKE_PUB,
            device.coordinator_keys / COORDINATOR_SIGNING_PUB,
        )
        if not p.is_file()
    ]
    if missing:
        raise ConfigError(
            f"This device is not set up: {', '.join(map(str, missing))} missing. Run `fleetlora device "
            "enroll` and copy the coordinator's ca.crt and public keys here (docs/device.md)."
        )
    return [
        flower_command("flower-supernode"),
        "--superlink", device.coordinator,
        "--root-certificates", str(device.ca_cert),
        "--auth-supernode-private-key", str(device.state_dir / SUPERNODE_AUTH_KEY),
        "--node-config", node_config(device),
        "--port", str(device.runtime_port),
        *(["--isolation", "process"] if device.warm_clientapp else []),
    ]  # fmt: skip


GRACE_SECONDS = 2.0  # for the SuperNode and runner to stop on the signal they got themselves
KILL_SECONDS = 15.0


def _hurry(processes: tuple[subprocess.Popen[bytes] | None, ...], waited: float, termed: set[int]) -> None:
    """SIGTERM (once: ``termed`` holds who got it), then SIGKILL, to those still running that long
    after the stop was asked."""
    for process in processes:
        if process is None or process.poll() is not None:
            continue
        if waited >= KILL_SECONDS:
            process.kill()
        elif waited >= GRACE_SECONDS and process.pid not in termed:
            process.terminate()
            termed.add(process.pid)


def run_foreground(device: DeviceHost) -> int:
    """Run the SuperNode (and, when warm, the ClientApp runner beside it) until the SuperNode exits.

    SIGINT/SIGTERM stop both. A terminal's Ctrl-C (or a supervisor's signal to the process group)
    already reached them, and a second signal during Flower's own shutdown can wedge it, so they are
    sent SIGTERM only if still running after :data:`GRACE_SECONDS`, and killed after
    :data:`KILL_SECONDS`. A runner that dies is started again: the SuperNode keeps its messages queued
    meanwhile, so the device goes on unattended.
    """
    env = flower_env(device.state_dir / "flwr")
    supernode = subprocess.Popen(supernode_command(device), env=env, cwd=device.state_dir)
    about = {"device": device.device_id}
    log.info(
        "SuperNode started, joining %s", device.coordinator, extra={"event": "supernode_started", **about}
    )
    runner: subprocess.Popen[bytes] | None = None
    stop_asked: list[float] = []  # when the first stop signal came
    termed: set[int] = set()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        if not stop_asked:
            stop_asked.append(time.monotonic())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while supernode.poll() is None:
        stopping = bool(stop_asked)
        if stopping:
            _hurry((supernode, runner), time.monotonic() - stop_asked[0], termed)
        if device.warm_clientapp and not stopping and (runner is None or runner.poll() is not None):
            if runner is not None:
                log.warning(
                    "ClientApp runner exited with code %s; starting it again",
                    runner.returncode,
                    extra={"event": "runner_restarted", **about},
                )
            runner = subprocess.Popen(
                [sys.executable, "-m", "fleetlora.client.warm_clientapp",
                 f"127.0.0.1:{device.runtime_port}", str(supernode.pid)],
                env=env,
                cwd=device.state_dir,
            )  # fmt: skip
        time.sleep(0.5)
    if runner is not None and runner.poll() is None:
        runner.terminate()
        runner.wait(timeout=10)
    code = supernode.returncode
    stopping = bool(stop_asked)
    log.log(
        logging.INFO if stopping else logging.ERROR,
        "SuperNode stopped (code %s)" if stopping else "SuperNode exited unasked with code %s",
        code,
        extra={"event": "supernode_exited", "code": code, **about},
    )
    return code
