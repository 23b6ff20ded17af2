"""Stored update packages: the exact signed bytes devices receive, found by the step they make.

Building a package (choosing the codec, signing) is :mod:`fleetlora.coordinator.packages`; this
module only stores what was built and serves it back, checked against its recorded sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from fleetlora.common.errors import FleetloraError
from fleetlora.common.package import Manifest
from fleetlora.coordinator.models import UpdatePackage, utcnow
from fleetlora.coordinator.storage import audit
from fleetlora.coordinator.storage.rows import TenantScoped, checked_blob, info_of


@dataclass(frozen=True)
class PackageInfo:
    """A stored package without its bytes."""

    id: int
    lineage: str
    from_version: int | None  # None: the full adapter
    to_version: int
    sequence: int
    codec: str
    package_bytes: int
    base_model_bytes: int
    cap: float  # the share of the base model's bytes it was built to fit under
    reconstruction_error: float
    build_seconds: float
    created_at: datetime
    expires_at: datetime

    @property
    def ratio(self) -> float:
        return self.package_bytes / self.base_model_bytes


# The manifest's fields that a package row keeps as columns, by column name.
_MANIFEST_COLUMNS = {
    "lineage": "lineage",
    "from_version_id": "from_version",
    "to_version_id": "to_version",
    "sequence": "sequence",
    "codec": "codec",
    "base_model_bytes": "base_bytes",
    "reconstruction_error": "reconstruction_error",
    "expires_at": "expires_at",
}


def _package_info(row: UpdatePackage) -> PackageInfo:
    return info_of(PackageInfo, row, from_version=row.from_version_id, to_version=row.to_version_id)


class PackageStore(TenantScoped):
    """Signed update packages in the coordinator's database."""

    def add(self, manifest: Manifest, blob: bytes, *, cap: float, build_seconds: float) -> PackageInfo:
        """Store the signed package ``blob`` whose manifest is ``manifest``."""
        with self.db.session() as session:
            self.check_lineage(session, manifest.lineage)
            row = UpdatePackage(
                **{column: getattr(manifest, field) for column, field in _MANIFEST_COLUMNS.items()},
                package=b"",  # the sealed blob is bound to the row's id: written once the id is known
                package_bytes=len(blob),
                package_sha256=hashlib.sha256(blob).hexdigest(),
                cap=cap,
                build_seconds=build_seconds,
                created_at=datetime.fromisoformat(manifest.created),
            )
            session.add(row)
            session.flush()  # assigns row.id, which the sealed blob is bound to
            row.package = self.db.cipher.seal(blob, package_binding(row))
            audit.append(
                session,
                "package.built",
                f"package {row.id}",
                {
                    "lineage": manifest.lineage,
                    "from": manifest.from_version,
                    "to": manifest.to_version,
                    "sequence": manifest.sequence,
                    "codec": manifest.codec,
                    "sha256": row.package_sha256,
                },
            )
            return _package_info(row)

    def find(
        self, to_version: int, from_version: int | None, *, now: datetime | None = None
    ) -> PackageInfo | None:
        """The newest unexpired stored package for this step (None: from nothing, the full adapter)."""
        query = (
            select(UpdatePackage)
            .where(UpdatePackage.to_version_id == to_version, self.in_tenant(UpdatePackage.lineage))
            .where(
                UpdatePackage.from_version_id.is_(None)
                if from_version is None
                else UpdatePackage.from_version_id == from_version
            )
            .where(UpdatePackage.expires_at > (now or utcnow()))
            .order_by(UpdatePackage.id.desc())
            .limit(1)
        )
        with self.db.session() as session:
            row = session.scalars(query).first()
            return _package_info(row) if row else None

    def blob(self, package_id: int) -> bytes:
        """The stored package, checked against its recorded sha256."""
        with self.db.session() as session:
            row = session.scalars(
                select(UpdatePackage).where(
                    UpdatePackage.id == package_id, self.in_tenant(UpdatePackage.lineage)
                )
            ).first()
            if row is None:
                raise FleetloraError(f"No package {package_id} in the database.")
            blob, expected = self.db.cipher.open(row.package, package_binding(row)), row.package_sha256
        corrupt = f"Stored package {package_id} does not match its sha256: rebuild it."
        return checked_blob(blob, expected, lambda: FleetloraError(corrupt))

    def latest(self) -> PackageInfo | None:
        """The newest stored package (its bytes, deferred, left unread: metrics ask at every scrape)."""
        query = (
            select(UpdatePackage)
            .where(self.in_tenant(UpdatePackage.lineage))
            .order_by(UpdatePackage.id.desc())
            .limit(1)
        )
        with self.db.session() as session:
            row = session.scalars(query).first()
            return _package_info(row) if row else None

    def all(self, lineage: str | None = None) -> list[PackageInfo]:
        """Every stored package (of one lineage if given), oldest first."""
        with self.db.session() as session:
            return [_package_info(row) for row in session.scalars(self.oldest_first(UpdatePackage, lineage))]


def package_binding(row: UpdatePackage) -> dict[str, object]:
    """What a sealed package is bound to (coordinator/at_rest.py): it opens in this row only."""
    return {"kind": "package", "id": row.id, "lineage": row.lineage, "to_version": row.to_version_id}
