"""``logs search`` for the coordinator's and the device's command lines: its options, the search, the output.

Both CLIs call :func:`search_command` with their own log folder; the output is a table, or JSON lines.

Entries come from log files, which anyone able to write the state folder could have written: table
cells are plain text to Rich (:func:`fleetlora.common.terminal.print_table`, control characters shown as
``\\xNN``), and JSON lines are ASCII-escaped, so neither can steer the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetlora.common.logs import CORE_FIELDS, parse_since, search_logs
from fleetlora.common.terminal import Column, print_table

MAX_FIELD_CHARS = 80  # of one extra field's value in the table (--json has it whole)

TextArgument = Annotated[
    str, typer.Argument(help="Text to find in the message or any field (case-insensitive); '' for all.")
]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", help="Only entries this recent: 30m, 2h, 3d, or a time, 2026-11-30T10:00 (UTC)."),
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="Only entries about this device id.")]
ComponentOption = Annotated[
    str | None, typer.Option("--component", help="Only this component's entries (a log file's name).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON lines for scripts.")]


def search_command(
    directory: Path, text: str, since: str | None, device: str | None, component: str | None, as_json: bool
) -> None:
    """Search ``directory``'s logs as the options say and print what matches."""
    moment = parse_since(since) if since is not None else None
    entries = search_logs(directory, text, since=moment, device=device, component=component)
    echo_entries(entries, as_json=as_json)


def echo_entries(entries: Iterable[dict[str, Any]], *, as_json: bool) -> None:
    """Print ``entries``: JSON lines, or a table (time, component, level, message, the other fields)."""
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
        return
    rows = [
        (
            _time(entry.get("ts")),
            *(str(entry.get(key, "")) for key in ("component", "level", "message")),
            _fields(entry),
        )
        for entry in entries
    ]
    if rows:
        print_table(COLUMNS, rows)
    else:
        typer.echo("no log entries match")


COLUMNS = (
    Column("time (UTC)"),
    Column("component", drop=2),
    Column("level", drop=1),
    Column("message", wrap=True),
    Column("fields", wrap=True, drop=3),
)


def _time(ts: Any) -> str:
    """``2026-11-30T10:00:00.123+00:00`` as ``2026-11-30 10:00:00``."""
    return str(ts)[:19].replace("T", " ")


def _fields(entry: dict[str, Any]) -> str:
    """The fields beyond the core ones, ``key=value`` each, long values cut."""
    parts = []
    for key, value in entry.items():
        if key in CORE_FIELDS:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        parts.append(f"{key}={text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + '…'}")
    return " ".join(parts)
