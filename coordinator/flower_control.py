"""The SuperLink's Control API through Flower's ``flwr`` CLI: register devices, start, list and stop runs.

Every call runs ``flwr ... fleet --format json`` with this host's Flower home (whose ``config.toml``
:func:`fleetlora.coordinator.superlink.write_connection` wrote) and checks the JSON's ``success``:
Flower exits 0 even when it reports an error in JSON.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from fleetlora.common.errors import FleetloraError
from fleetlora.common.flower_env import flower_command, flower_env
from fleetlora.common.host_config import CoordinatorHost
from fleetlora.coordinator.superlink import CONNECTION

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]
TIMEOUT = 120.0


class ControlError(FleetloraError):
    """The SuperLink refused a request, or could not be reached."""


def flwr(host: CoordinatorHost, *args: str) -> dict[str, Any]:
    """Run one ``flwr`` command against this host's SuperLink; its JSON answer, or ControlError."""
    command = [flower_command("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(
            command,
            env=flower_env(host.flwr_home),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ControlError(f"`flwr {' '.join(args)}` got no answer within {TIMEOUT:.0f} s.") from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ControlError(f"`flwr {' '.join(args)}` failed: {detail[0]}") from None
    if not answer.get("success", False):
        raise ControlError(f"The SuperLink refused `flwr {args[0]}`: {answer.get('error-message', answer)}")
    return answer


def register_node(host: CoordinatorHost, public_key: Path, name: str) -> int:
    """Register a SuperNode's auth key; Flower assigns and returns its node id."""
    answer = flwr(host, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    return int(answer["node-id"])


def list_nodes(host: CoordinatorHost) -> list[dict[str, Any]]:
    return list(flwr(host, "supernode", "list", CONNECTION)["nodes"])


def start_run(host: CoordinatorHost, run_config: dict[str, Any]) -> int:
    """Start a run of fleetlora's Flower app with ``run_config`` overrides; return its run id."""
    overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
    args = ["run", str(APP_DIR), CONNECTION]
    if overrides:
        args += ["--run-config", overrides]
    return int(flwr(host, *args)["run-id"])


def list_runs(host: CoordinatorHost, run_id: int | None = None) -> list[dict[str, Any]]:
    args = ["ls", CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
    return list(flwr(host, *args)["runs"])


def stop_run(host: CoordinatorHost, run_id: int) -> None:
    flwr(host, "stop", str(run_id), CONNECTION)
