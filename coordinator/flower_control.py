"""The SuperLink's Control API through Flower's ``flwr`` CLI: register devices, start, list and stop runs.

Every call runs ``flwr ... fleet --format json`` with this host's Flower home (whose ``config.toml``
:func:`fleetlora.coordinator.superlink.write_connection` wrote) and checks the JSON's ``success``:
Flower exits 0 even when it reports an error in JSON.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from fleetlora.common.errors import FleetloraError
from fleetlora.common.flower_env import flower_command, flower_env
from fleetlora.common.host_config import CoordinatorHost
from fleetlora.coordinator.superlink import CONNECTION

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]
TIMEOUT = 120.0
START_HINT = "is the coordinator running? Start it with `fleetlora coordinator up --config FILE`"


class ControlError(FleetloraError):
    """The SuperLink refused a request, or could not be reached."""


def flwr(host: CoordinatorHost, *args: str) -> dict[str, Any]:
    """Run one ``flwr`` command against this host's SuperLink; its JSON answer, or ControlError."""
    if not (host.flwr_home / "config.toml").is_file():  # `up` writes it; never let flwr make its own
        raise ControlError(
            f"No SuperLink connection in {host.flwr_home}: {START_HINT}, "
            "and give this command the same --config."
        )
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
        raise ControlError(f"`flwr {' '.join(args)}` failed: {detail[0]}; {START_HINT}.") from None
    if not answer.get("success", False):
        message = " ".join(str(answer.get("error-message", answer)).split())
        if _unreachable(message):
            raise ControlError(f"Cannot reach the SuperLink for `flwr {args[0]}` ({message}); {START_HINT}.")
        raise ControlError(f"The SuperLink refused `flwr {args[0]}`: {message}")
    return answer


def _unreachable(message: str) -> bool:
    """Whether Flower's error says nothing answered (rather than that the SuperLink said no)."""
    return any(
        word in message.lower() for word in ("unavailable", "refused", "failed to connect", "deadline")
    )


def register_node(host: CoordinatorHost, public_key: Path, name: str) -> int:
    """Register a SuperNode's auth key; Flower assigns and returns its node id."""
    answer = flwr(host, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    return int(answer["node-id"])


def list_nodes(host: CoordinatorHost) -> list[dict[str, Any]]:
    return list(flwr(host, "supernode", "list", CONNECTION)["nodes"])


class OnlineNodes:
    """The SuperLink's online node ids, refreshed every ``max_age`` seconds by one background thread:
    what ``coordinator up``'s metrics and console read. Each ask is a ``flwr`` call (a second, or up to
    :data:`TIMEOUT` from a hung SuperLink), so no request ever waits on one: a caller gets the last
    answer, or :class:`ControlError` while there is none or the last ask failed."""

    def __init__(self, host: CoordinatorHost, max_age: float = 15.0) -> None:
        self.host, self.max_age = host, max_age
        self._online: set[str] | None = None
        self._error = ControlError("The SuperLink has not been asked yet.")

    def start(self) -> OnlineNodes:
        threading.Thread(target=self._refresh_forever, name="online-nodes", daemon=True).start()
        return self

    def refresh(self) -> None:
        """Ask the SuperLink once; keep its answer, or why there is none."""
        try:
            nodes = list_nodes(self.host)
        except ControlError as exc:
            self._online, self._error = None, exc
            return
        self._online = {str(n.get("node-id")) for n in nodes if n.get("status") == "online"}

    def __call__(self) -> set[str]:
        online = self._online  # one read: the refresher replaces it whole
        if online is None:
            raise self._error
        return set(online)

    def _refresh_forever(self) -> None:
        while True:
            started = time.monotonic()
            self.refresh()
            time.sleep(max(0.0, self.max_age - (time.monotonic() - started)))


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
