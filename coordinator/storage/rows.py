"""Rows become frozen dataclasses here: no ORM object leaves the storage layer.

An ORM row stays bound to the session that loaded it (lazy attributes, identity map, writes on
flush); a frozen copy can cross threads, be compared in tests and be cached without surprises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import ColumnElement, Select, SQLColumnExpression, literal, select, true
from sqlalchemy.orm import Session

from fleetlora.common.errors import FleetloraError
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.models import Lineage

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Info = TypeVar("Info", bound=DataclassInstance)
else:
    Info = TypeVar("Info")


def info_of(cls: type[Info], row: object, **overrides: Any) -> Info:
    """``cls`` filled from ``row``'s attributes of the same names; ``overrides`` give the rest."""
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


class TenantScoped:
    """A store that sees one tenant's rows and no other's (every tenant's when ``tenant`` is None: the
    coordinator's own maintenance, such as key rotation, and single-fleet tests).

    Versions, packages, rounds, ledger entries and device flags belong to a tenant through their
    lineage (registered by one tenant and never shared: its id hashes the tenant); devices and their
    update reports by their own tenant column; a quarantine through its device's flags. Every read of
    a scoped store filters by one of these conditions, so a query for one tenant cannot return
    another's rows, and every write into a lineage checks it is the tenant's.
    """

    def __init__(self, db: Database, tenant: str | None = None) -> None:
        self.db = db
        self.tenant = tenant

    def in_tenant(self, lineage: SQLColumnExpression[str]) -> ColumnElement[bool]:
        """The condition that ``lineage`` (a column naming one) is a lineage of this store's tenant."""
        if self.tenant is None:
            return true()
        return lineage.in_(select(Lineage.lineage).where(Lineage.tenant == self.tenant))

    def is_tenant(self, tenant: SQLColumnExpression[str]) -> ColumnElement[bool]:
        """The condition that ``tenant`` (a row's own tenant column) is this store's tenant."""
        return true() if self.tenant is None else tenant == self.tenant

    def check_lineage(self, session: Session, lineage: str) -> None:
        """Refuse to write a row into a lineage that is not this tenant's."""
        if not session.scalar(select(self.in_tenant(literal(lineage)))):
            raise FleetloraError(f"Lineage {lineage[:12]} is not one of tenant {self.tenant}'s.")

    def oldest_first(self, table: Any, lineage: str | None) -> Select[Any]:
        """This tenant's rows of ``table`` (a mapped class with ``id`` and ``lineage``; of one lineage if
        given), in the order they were written."""
        query = select(table).where(self.in_tenant(table.lineage)).order_by(table.id)
        return query if lineage is None else query.where(table.lineage == lineage)


def checked_blob(blob: bytes, sha256: str, corrupt: Callable[[], FleetloraError]) -> bytes:
    """``blob`` if it still hashes to the ``sha256`` recorded when it was stored; else raise ``corrupt()``.

    Every stored blob (adapter, optimizer state, package) is read through this, so a row damaged on
    disk or edited by hand is never served as if it were what was stored.
    """
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise corrupt()
    return blob
