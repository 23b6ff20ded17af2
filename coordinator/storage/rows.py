"""Rows become frozen dataclasses here: no ORM object leaves the storage layer.

An ORM row stays bound to the session that loaded it (lazy attributes, identity map, writes on
flush); a frozen copy can cross threads, be compared in tests and be cached without surprises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Select, select

from fleetlora.common.delta import sha256_hex
from fleetlora.common.errors import FleetloraError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Info = TypeVar("Info", bound=DataclassInstance)
else:
    Info = TypeVar("Info")


def info_of(cls: type[Info], row: object, **overrides: Any) -> Info:
    """``cls`` filled from ``row``'s attributes of the same names; ``overrides`` give the rest."""
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


def oldest_first(table: Any, lineage: str | None) -> Select[Any]:
    """Every row of ``table`` (a mapped class with ``id`` and ``lineage``; of one lineage if given), in
    the order they were written."""
    query = select(table).order_by(table.id)
    return query if lineage is None else query.where(table.lineage == lineage)


def checked_blob(blob: bytes, sha256: str, corrupt: Callable[[], FleetloraError]) -> bytes:
    """``blob`` if it still hashes to the ``sha256`` recorded when it was stored; else raise ``corrupt()``.

    Every stored blob (adapter, optimizer state, package) is read through this, so a row damaged on
    disk or edited by hand is never served as if it were what was stored.
    """
    if sha256_hex(blob) != sha256:
        raise corrupt()
    return blob
