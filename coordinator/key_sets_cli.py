"""``fleetlora coordinator key-set ...``: pin the key knowledge every new version is scored on.

The retention gate (coordinator/retention.py) holds back a version that scores below
``retention-threshold`` × the best earlier score on the tenant's pinned set; ``versions release``
lets one through.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from fleetlora.common.terminal import Column, command_group, json_text, print_table, printable
from fleetlora.coordinator.cli_options import (
    ConfigOption,
    DbOption,
    JsonOption,
    OperatorKey,
    OperatorName,
    OtpCode,
    Target,
    TenantOption,
    as_operator,
)
from fleetlora.coordinator.key_sets import MAX_BYTES, read_key_set

app = command_group("Key knowledge: the labelled examples every new version is scored on, one set pinned.")


@app.command("add")
def add_key_set(
    file: Annotated[
        Path,
        typer.Argument(
            help=f"A CSV (text,label columns) or JSONL file (text and label keys), at most "
            f"{MAX_BYTES // 2**20} MiB."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="The name it is listed under [default: the file's name].")
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """Store FILE's examples and pin them for the tenant: every new version is scored on them, and one
    scoring below retention-threshold × the best earlier score is held until released. Older sets stay."""
    read = read_key_set(file, name)  # every check of the file before the database is opened
    target = Target.of(db, config, tenant)
    storage = target.open(create=True)
    with as_operator(storage.db, "key-set add", operator, operator_key, otp):
        added = storage.key_sets.add(read.name, read.examples)
    typer.echo(
        f"key set {added.id} ({printable(added.name)}): {added.example_count} examples, "
        f"{len(added.labels)} labels, sha256 {added.examples_sha256[:12]}; pinned for {target.tenant}, "
        "scored from the next version on"
    )


@app.command("list")
def list_key_sets(
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """The tenant's key sets, oldest first; the newest is pinned (versions are scored on it)."""
    key_sets = Target.of(db, config, tenant).open().key_sets.all()
    if as_json:
        typer.echo(json_text([dataclasses.asdict(k) for k in key_sets]))
        return
    if not key_sets:
        typer.echo("No key set is pinned: `fleetlora coordinator key-set add FILE` pins one.")
        return
    rows = [
        (
            str(k.id),
            "pinned" if k.pinned else "-",
            k.name,
            str(k.example_count),
            str(len(k.labels)),
            k.examples_sha256[:12],
            f"{k.added_at:%Y-%m-%d %H:%M}",
            k.added_by,
        )
        for k in key_sets
    ]
    print_table(KEY_SET_COLUMNS, rows, "key sets")


KEY_SET_COLUMNS = (
    Column("id", justify="right"),
    Column("pinned"),
    Column("name", wrap=True),
    Column("examples", justify="right", drop=3),
    Column("labels", justify="right", drop=4),
    Column("sha256", drop=2),
    Column("added", drop=1),
    Column("by", wrap=True, drop=5),
)
