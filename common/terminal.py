"""What the command line prints: untrusted text made safe, tables that fit, durations, help text.

Text a device, a peer or a file supplied (a quarantined record, a device id, a drop reason, an error
that quotes them) reaches an operator's terminal through Rich. Rich reads ``[...]`` as markup, and a
terminal obeys escape sequences (ESC, CSI and the other C0/C1 controls), which can rewrite what the
operator sees or the window title. :func:`shown` turns both into visible text; a table cell given to
:func:`fitted_table` is plain text, never markup.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import PurePath
from typing import Any

import typer
from rich.cells import cell_len
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table
from rich.text import Text

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls, DEL; tab and newline kept


def shown(text: object) -> str:
    """``text`` as Rich should print it: markup escaped, control characters as ``\\xNN``."""
    return escape(printable(text))


def printable(text: object) -> str:
    """``text`` with control characters as ``\\xNN`` and undecodable ones escaped (no markup meaning)."""
    plain = str(text).encode("utf-8", "backslashreplace").decode()
    return _CONTROLS.sub(_visible, plain)


def command_group(help: str, **options: Any) -> typer.Typer:
    """A Typer app whose help shows brackets as written (``[device]``, ``[default: the config's]``).

    Typer's default Rich markup would read them as style tags and drop them; Markdown keeps them, and
    the help panels. Set on every app, since a sub-app run on its own (tests) does not inherit it.
    """
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode="markdown", **options)


# ---- what every command prints: a console sized once, tables that fit it, durations people read

DEFAULT_WIDTH = 100  # a pipe or a log file without COLUMNS: what a review or a CI log shows whole
_WIDTHS = range(20, 1001)  # a COLUMNS outside this is a mistake, not a terminal


def console_width(environ: Mapping[str, str] | None = None, *, tty: bool | None = None) -> int | None:
    """``COLUMNS`` when it is a sane number (a pipe honours it too), else the terminal's own width
    (None lets Rich ask it), else :data:`DEFAULT_WIDTH` when stdout is not a terminal."""
    columns = (os.environ if environ is None else environ).get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) in _WIDTHS:
        return int(columns)
    return None if (sys.stdout.isatty() if tty is None else tty) else DEFAULT_WIDTH


def console() -> Console:
    """The Console every command prints tables and reports through (see :func:`console_width`)."""
    return Console(width=console_width(), highlight=False)


@dataclass(frozen=True)
class Column:
    """A table column. ``drop``: 0 never dropped; the highest goes first when the table is too wide.
    ``wrap``: its text may fold over lines (free text); otherwise each value shows whole (ids)."""

    header: str
    drop: int = 0
    wrap: bool = False
    justify: JustifyMethod = "left"


Cell = str | Text  # a str is untrusted plain text (never markup); a Text carries its own style
_BORDERS = 1  # a table's left edge; each column adds its padding (2) and its right border (1)
_MIN_WRAPPED = 12  # a wrapped column narrower than this reads as noise: drop columns first


def fitted_table(
    columns: Sequence[Column], rows: Iterable[Sequence[Cell]], width: int, title: str | None = None
) -> Table:
    """A table no wider than ``width``: unwrapped columns keep every value whole, wrapped ones fold,
    and the columns with the highest ``drop`` are left out until the rest fit.

    Every row must have one value per column (a table whose headers and values disagree is a bug).
    """
    body = [[_as_text(cell) for cell in row] for row in rows]
    for row in body:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} values under {len(columns)} headers")
    natural = [max([cell_len(c.header), *(row[i].cell_len for row in body)]) for i, c in enumerate(columns)]
    kept = list(range(len(columns)))
    while _least_width([columns[i] for i in kept], [natural[i] for i in kept]) > width:
        droppable = [i for i in kept if columns[i].drop > 0]
        if not droppable:
            break  # only never-dropped columns left: the terminal is narrower than what must show
        kept.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
    widths = _wrapped_widths([columns[i] for i in kept], [natural[i] for i in kept], width)
    table = Table(title=_as_text(title) if title else None, title_justify="left")  # a title may quote a URL
    for i, fixed in zip(kept, widths, strict=True):
        column = columns[i]
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=not column.wrap,
            overflow="fold",
            width=fixed,
        )
    for row in body:
        table.add_row(*(row[i] for i in kept))
    return table


def _least_width(columns: Sequence[Column], natural: Sequence[int]) -> int:
    """The narrowest these columns can be drawn with nothing cut off."""
    content = sum(min(n, _MIN_WRAPPED) if c.wrap else n for c, n in zip(columns, natural, strict=True))
    return _BORDERS + 3 * len(columns) + content


def _wrapped_widths(columns: Sequence[Column], natural: Sequence[int], width: int) -> list[int | None]:
    """Widths for the wrapped columns (None: as wide as its text), narrowing the widest first."""
    room = (
        width
        - _BORDERS
        - 3 * len(columns)
        - sum(n for c, n in zip(columns, natural, strict=True) if not c.wrap)
    )
    wrapped = [n for c, n in zip(columns, natural, strict=True) if c.wrap]
    if sum(wrapped) <= room:
        return [None] * len(columns)
    cap = max(_MIN_WRAPPED, room)
    while cap > _MIN_WRAPPED and sum(min(n, cap) for n in wrapped) > room:
        cap -= 1
    return [min(n, cap) if c.wrap and n > cap else None for c, n in zip(columns, natural, strict=True)]


def _as_text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(printable(cell))


def _visible(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def duration(seconds: float | None) -> str:
    """``52.7 s``, ``3 min 12 s``, ``2 h 5 min``: how long, as a person reads it (``-`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def json_text(document: object) -> str:
    """``document`` as the JSON a ``--json`` option prints: times in ISO 8601, paths as text."""
    return json.dumps(document, indent=2, default=_jsonable)


def _jsonable(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} has no JSON form")


def print_table(columns: Sequence[Column], rows: Iterable[Sequence[Cell]], title: str | None = None) -> None:
    """Print a listing through :func:`console`, fitted to its width."""
    out = console()
    out.print(fitted_table(columns, rows, out.width, title))
