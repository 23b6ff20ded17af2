"""``fleetlora coordinator ...``: what an operator runs on the coordinator host."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleetlora.coordinator.db import Database
from fleetlora.coordinator.registry import Registry
from fleetlora.coordinator.settings import DEFAULT_DB

app = typer.Typer(help="Operate the coordinator: inspect stored versions.", no_args_is_help=True)
versions_app = typer.Typer(help="Global adapter versions stored in SQL.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")

DbOption = Annotated[str, typer.Option(help="SQLAlchemy URL of the coordinator database.")]


@versions_app.command("list")
def list_versions(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List every stored version with its lineage, participants, size and metrics."""
    versions = Registry(Database(db).initialize()).versions()
    if as_json:
        typer.echo(json.dumps([{**v.__dict__, "label": v.label} for v in versions], default=str, indent=2))
        return
    table = Table(title=f"versions in {db}", title_justify="left")
    for header in ("version", "parent", "round", "devices", "examples", "adapter", "sha256", "metrics"):
        table.add_column(header)
    for v in versions:
        metrics = ", ".join(f"{k}={val:.3f}" for k, val in sorted(v.metrics.items()) if "central" in k)
        table.add_row(
            v.label,
            f"v{v.parent_id}" if v.parent_id else "-",
            str(v.round),
            str(len(v.participants)),
            str(sum(v.participants.values())),
            f"{v.adapter_bytes / 1024:.0f} KiB",
            v.adapter_sha256[:12],
            metrics or "-",
        )
    Console().print(table)
