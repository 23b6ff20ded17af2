"""Run a device's SuperNode: TLS to the coordinator, its auth key, and the node config the ClientApp reads.

``fleetlora device up`` checks that the device is enrolled and holds the coordinator's CA and public
keys, then runs ``flower-supernode`` in the foreground. The node config carries the device's id,
state folder, data, consent and the coordinator keys' paths; the ClientApp reads nothing else.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from types import FrameType

from fleetlora.client.enroll import SUPERNODE_AUTH_KEY
from fleetlora.common.errors import ConfigError
from fleetlora.common.flower_env import flower_command, flower_env
from fleetlora.common.host_config import DeviceHost
from fleetlora.common.keys import COORDINATOR_HPKE_PUB, COORDINATOR_SIGNING_PUB, DEVICE_SIGNING_KEY


def node_config(device: DeviceHost) -> str:
    """The ``--node-config`` string: TOML values, space separated."""
    values: dict[str, str | bool] = {
        "device-id": device.device_id,
        "state-dir": str(device.state_dir.resolve()),
        "data-path": device.data,
        "upload-consent": device.upload_consent,
        "coordinator-key": str((device.coordinator_keys / COORDINATOR_HPKE_PUB).resolve()),
        "coordinator-signing-key": str((device.coordinator_keys / COORDINATOR_SIGNING_PUB).resolve()),
    }
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
    ]  # fmt: skip


def start(device: DeviceHost, log: Path | None = None) -> subprocess.Popen[bytes]:
    output = log.open("ab") if log else None
    return subprocess.Popen(
        supernode_command(device),
        env=flower_env(device.state_dir / "flwr"),
        cwd=device.state_dir,
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
    )


def run_foreground(device: DeviceHost) -> int:
    """Run the SuperNode until it exits; SIGINT/SIGTERM stop it cleanly."""
    process = start(device)

    def stop(signum: int, _frame: FrameType | None) -> None:
        process.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return process.wait()
