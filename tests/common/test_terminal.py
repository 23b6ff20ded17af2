"""Untrusted text reaches a terminal as text: no markup, no escape sequences (common/terminal.py)."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from fleetlora.common.terminal import shown
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
