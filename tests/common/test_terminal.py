"""Untrusted text reaches a terminal as text: no markup, no escape sequences (common/terminal.py)."""

from __future__ import annotations

from io import StringIO

import pytest
from rich.cells import cell_len
from rich.console import Console

from fleetlora.common.terminal import DEFAULT_WIDTH, Column, console_width, duration, fitted_table, shown
from fleetlora.coordinator.db import without_password


def _printed(markup: str) -> str:
    out = StringIO()
    Console(file=out, force_terminal=True, highlight=False, width=200).print(markup)
    return out.getvalue()


def test_markup_and_escape_sequences_from_a_device_print_as_visible_text():
    hostile = "[bold red]fake[/] \x1b]0;owned\x07\x1b[2J\x9b1m tab\tkept"

    printed = _printed(f"reason: {shown(hostile)}")

    assert "[bold red]fake[/]" in printed  # the markup is shown, not applied
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b1m" in printed  # every control as \xNN
    assert not {"\x1b", "\x07", "\x9b"} & set(printed)  # nothing the terminal would obey
    assert "tab\tkept" in shown(hostile)  # tabs and newlines are kept


def test_undecodable_characters_are_shown_escaped():
    assert shown("a\udcffb") == "a\\udcffb"


def test_a_database_urls_password_is_never_shown():
    assert without_password("postgresql+psycopg://fleet:s3cret@db:5432/fleet") == (
        "postgresql+psycopg://fleet:***@db:5432/fleet"
    )
    assert without_password("sqlite:///runs/fleet.db") == "sqlite:///runs/fleet.db"
    assert "s3cret" not in without_password("not a url but user:s3cret@host")


# ---- the shared listing helpers: console width, fitted tables, durations


def _rendered(table: object, width: int = 100) -> list[str]:
    out = StringIO()
    Console(file=out, width=width, highlight=False).print(table)
    return out.getvalue().splitlines()


def test_columns_sets_the_width_even_when_piped_and_a_pipe_without_it_gets_100():
    assert console_width({"COLUMNS": "100"}, tty=False) == 100
    assert console_width({"COLUMNS": "132"}, tty=True) == 132
    assert console_width({}, tty=False) == DEFAULT_WIDTH == 100
    assert console_width({}, tty=True) is None  # Rich asks the terminal
    for hostile in ("0", "-5", "abc", "99999999", " "):
        assert console_width({"COLUMNS": hostile}, tty=False) == 100


def test_a_table_too_wide_drops_its_least_important_columns_first_and_keeps_ids_whole():
    ident = "3f2a9c41d0b84e6f9a1c2b3d4e5f6a7b"
    columns = [
        Column("id"),
        Column("source", drop=2),
        Column("reason", wrap=True),
        Column("hash", drop=1),
        Column("text", wrap=True),
    ]
    row = [ident, "inbox:" + "s" * 30, "too short " * 5, "h" * 20, "word " * 40]

    lines = _rendered(fitted_table(columns, [row], 100))

    assert all(cell_len(line) <= 100 for line in lines)
    assert any(ident in line for line in lines)  # never wrapped or cut
    header = next(line for line in lines if line.startswith("┃"))
    assert "source" not in header and "hash" in header  # drop=2 went before drop=1
    assert [h.strip() for h in header.strip("┃").split("┃")] == ["id", "reason", "hash", "text"]


def test_a_table_that_fits_keeps_every_column_and_value():
    lines = _rendered(fitted_table([Column("a", drop=1), Column("b")], [["x", "y"]], 100))
    assert "a" in lines[1] and "x" in lines[3] and "y" in lines[3]


def test_a_row_whose_values_do_not_match_the_headers_is_refused():
    with pytest.raises(ValueError, match="2 values under 3 headers"):
        fitted_table([Column("a"), Column("b"), Column("c")], [["1", "2"]], 100)


def test_cells_are_plain_text_never_markup_or_control_sequences():
    lines = _rendered(fitted_table([Column("reason", wrap=True)], [["[red]x[/] \x1b[2J"]], 100))
    assert "[red]x[/] \\x1b[2J" in "\n".join(lines)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(52.738902, "52.7 s"), (0.04, "0.0 s"), (192, "3 min 12 s"), (7501, "2 h 5 min"), (None, "-")],
)
def test_durations_read_as_a_person_says_them(seconds: float | None, text: str):
    assert duration(seconds) == text
