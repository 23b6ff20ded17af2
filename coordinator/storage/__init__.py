"""The coordinator's storage: every SQL query it runs, behind one small store per concern.

- :class:`VersionStore` (``versions``): global adapter versions, their optimizer states, lineages;
- :class:`PackageStore` (``packages``): the signed update packages built from them;
- :class:`DeviceStore` (``devices``): enrolled devices, their keys, update reports, flags and quarantine;
- :class:`LedgerStore` (``ledgers``): the privacy ledger and the round records;
- :class:`KeySetStore` (``key_sets``): each tenant's key-knowledge sets, the newest one pinned;
- :class:`AuditStore` (``audit``): the hash-chained audit log of every change to parameters or settings.

Each method runs in one transaction (:meth:`Database.session` commits on success and rolls back on
any error) and returns frozen dataclasses, never ORM rows. :meth:`Storage.open` brings the schema to
the newest migration and hands out the six stores over one database.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlora.coordinator.db import Database
from fleetlora.coordinator.storage.audit import AuditStore
from fleetlora.coordinator.storage.devices import (
    Decline,
    DeviceInfo,
    DeviceKey,
    DeviceStore,
    DeviceUpdateInfo,
    QuarantineInfo,
    StatusReport,
)
from fleetlora.coordinator.storage.key_sets import KeySetInfo, KeySetStore
from fleetlora.coordinator.storage.ledgers import (
    LedgerStore,
    PhaseInfo,
    PrivacyEntryInfo,
    RoundInfo,
    RoundReport,
)
from fleetlora.coordinator.storage.packages import PackageInfo, PackageStore
from fleetlora.coordinator.storage.versions import (
    HoldInfo,
    LineageInfo,
    NewVersion,
    ServerOptimizerState,
    VersionInfo,
    VersionStore,
)

__all__ = [
    "AuditStore",
    "Decline",
    "DeviceInfo",
    "DeviceKey",
    "DeviceStore",
    "DeviceUpdateInfo",
    "HoldInfo",
    "KeySetInfo",
    "KeySetStore",
    "LedgerStore",
    "LineageInfo",
    "NewVersion",
    "PackageInfo",
    "PackageStore",
    "PhaseInfo",
    "PrivacyEntryInfo",
    "QuarantineInfo",
    "RoundInfo",
    "RoundReport",
    "ServerOptimizerState",
    "StatusReport",
    "Storage",
    "VersionInfo",
    "VersionStore",
]


@dataclass(frozen=True)
class Storage:
    """The six stores over one coordinator database."""

    db: Database
    versions: VersionStore
    packages: PackageStore
    devices: DeviceStore
    ledgers: LedgerStore
    key_sets: KeySetStore
    audit: AuditStore

    @classmethod
    def open(
        cls, url: str, tenant: str | None = None, *, create: bool = True, reader: bool = False
    ) -> Storage:
        """The stores over the database at ``url``, its schema migrated to the newest revision, seeing
        only ``tenant``'s rows (every tenant's when None: maintenance; rows.TenantScoped says how).
        ``create=False`` (read commands): a database that does not exist yet is a ConfigError, not made.
        ``reader=True`` (the console, metrics, ``status``): on SQLite, never take the write lock.

        The audit log is the coordinator's own, across tenants: it records who changed what for all.
        """
        db = Database(url, create=create, reader=reader).initialize()
        return cls(
            db,
            VersionStore(db, tenant),
            PackageStore(db, tenant),
            DeviceStore(db, tenant),
            LedgerStore(db, tenant),
            KeySetStore(db, tenant),
            AuditStore(db),
        )

    def close(self) -> None:
        self.db.close()
