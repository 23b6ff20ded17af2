"""``fleetlora``: one command line for researchers (simulate, report), operators (coordinator), devices."""

from __future__ import annotations

import sys

from rich.console import Console

from fleetlora.client.cli import app as device_app
from fleetlora.common.errors import FleetloraError
from fleetlora.common.terminal import command_group, shown
from fleetlora.coordinator.cli import app as coordinator_app
from fleetlora.simulations.cli import simulate
from fleetlora.simulations.run_report import report

app = command_group(
    "Federated LoRA for edge fleets: devices adapt a language model on their own text; "
    "only adapter deltas leave them.",
    pretty_exceptions_enable=False,
)
app.command()(simulate)
app.command()(report)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(device_app, name="device")


def main() -> None:
    """Entry point: user mistakes print one line and exit 2; bugs keep their traceback."""
    try:
        app()
    except FleetloraError as exc:
        # The message may quote what a device or a file said: shown as text, never read as markup.
        Console(stderr=True).print(f"[bold red]error:[/] {shown(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
