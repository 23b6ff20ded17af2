"""``fleetlora coordinator ...``: what an operator runs on the coordinator host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.table import Table

from fleetlora.common.keys import COORDINATOR_HPKE_PUB, read_public_key
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.keys import init_keys
from fleetlora.coordinator.registry import Registry
from fleetlora.coordinator.settings import DEFAULT_DB

app = typer.Typer(
    help="Operate the coordinator: keys, enrolled devices, stored versions.", no_args_is_help=True
)
versions_app = typer.Typer(help="Global adapter versions stored in SQL.", no_args_is_help=True)
keys_app = typer.Typer(help="The coordinator's key pairs.", no_args_is_help=True)
devices_app = typer.Typer(help="Devices allowed to upload (the device registry).", no_args_is_help=True)
app.add_typer(versions_app, name="versions")
app.add_typer(keys_app, name="keys")
app.add_typer(devices_app, name="devices")

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


@keys_app.command("init")
def init_keys_command(
    folder: Annotated[
        Path, typer.Option("--dir", help="Folder for the key files (created, 0600 keys).")
    ] = Path("keys"),
) -> None:
    """Make the HPKE (X25519) key pair devices seal uploads to, and the Ed25519 package-signing key."""
    written = init_keys(folder)
    for path in written:
        typer.echo(str(path))
    typer.echo(f"Give devices {folder / COORDINATOR_HPKE_PUB}; keep the .key files on this host only.")


@devices_app.command("enroll")
def enroll_device(
    device_id: Annotated[str, typer.Option(help="The device's id, as its node config `device-id` says.")],
    public_key: Annotated[Path, typer.Option(help="The device's device-signing.pub (from `device enroll`).")],
    tenant: Annotated[str, typer.Option(help="The fleet the device belongs to.")] = "default",
    db: DbOption = DEFAULT_DB,
) -> None:
    """Register a device's public signing key; its sealed uploads verify against it from now on."""
    key = read_public_key(public_key, Ed25519PublicKey)
    Registry(Database(db).initialize()).enroll_device(device_id, tenant, key)
    typer.echo(f"enrolled {device_id} in {tenant}")
