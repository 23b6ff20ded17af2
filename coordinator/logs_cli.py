"""``fleetlora coordinator logs ...``: search the coordinator host's structured logs.

``coordinator up`` and the ServerApp write JSON lines into the host's ``log_dir`` (state-dir/logs),
rotated daily and kept 90 days (:mod:`fleetlora.common.logs`); this reads them, rotated files included.
"""

from __future__ import annotations

from fleetlora.common.host_config import load_host_config
from fleetlora.common.log_view import (
    ComponentOption,
    DeviceOption,
    JsonOption,
    SinceOption,
    TextArgument,
    search_command,
)
from fleetlora.common.terminal import command_group
from fleetlora.coordinator.deploy_cli import ConfigOption

logs_app = command_group("The coordinator host's structured logs (JSON lines, kept 90 days).")


@logs_app.command("search")
def search(
    text: TextArgument = "",
    since: SinceOption = None,
    device: DeviceOption = None,
    component: ComponentOption = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Find log entries, oldest first, in the current and the rotated log files (coordinator, rounds)."""
    search_command(load_host_config(config).coordinator.log_dir, text, since, device, component, as_json)
