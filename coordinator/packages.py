"""Build, sign, store and find update packages (format: :mod:`fleetlora.common.package`).

A package takes a device from a stored version to a later one of the same lineage: the delta
between the two adapters, or the whole adapter for a device that has none. The builder walks the
codec ladder (:data:`fleetlora.common.codec.LADDER`) from lossless down and keeps the first codec
whose whole package fits under ``cap × base-model bytes`` with a reconstruction error within
``max_error``; if none does it refuses, naming each codec's size and error. Every package is
stored whole in SQL, so what a device received can always be shown again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from fleetlora.common.codec import LADDER, Codec, decode, encode, inflated_bound, relative_error
from fleetlora.common.delta import apply_delta, diff, sha256_hex
from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.package import MAX_CAP, Manifest, sign, utc_iso
from fleetlora.coordinator.models import Lineage, UpdatePackage, utcnow
from fleetlora.coordinator.registry import Registry

DEFAULT_TTL = timedelta(days=7)
DEFAULT_MAX_ERROR = 0.10


class PackageTooLarge(FleetloraError):
    """No codec brings the package under the cap."""


@dataclass(frozen=True)
class PackagePolicy:
    """How packages are built: the size cap (share of the base model's bytes) and how long they live."""

    cap: float = MAX_CAP
    ttl: timedelta = DEFAULT_TTL
    # A lossier codec is used only while the rebuilt adapter stays this close to the real one
    # (relative L2): past it, the package would not be the version it names.
    max_error: float = DEFAULT_MAX_ERROR

    def __post_init__(self) -> None:
        if not self.max_error > 0:
            raise ConfigError(f"package max error must be > 0, got {self.max_error}.")
        if not 0 < self.cap <= MAX_CAP:
            raise ConfigError(f"package cap must be in (0, {MAX_CAP}], got {self.cap}.")
        if self.ttl <= timedelta(0):
            raise ConfigError(f"package lifetime must be positive, got {self.ttl}.")


@dataclass(frozen=True)
class PackageInfo:
    """A stored package without its bytes."""

    id: int
    lineage: str
    from_version: int | None
    to_version: int
    sequence: int
    codec: str
    package_bytes: int
    base_model_bytes: int
    cap: float
    reconstruction_error: float
    build_seconds: float
    created_at: datetime
    expires_at: datetime

    @property
    def ratio(self) -> float:
        return self.package_bytes / self.base_model_bytes


def _info(row: UpdatePackage) -> PackageInfo:
    return PackageInfo(
        id=row.id,
        lineage=row.lineage,
        from_version=row.from_version_id,
        to_version=row.to_version_id,
        sequence=row.sequence,
        codec=row.codec,
        package_bytes=row.package_bytes,
        base_model_bytes=row.base_model_bytes,
        cap=row.cap,
        reconstruction_error=row.reconstruction_error,
        build_seconds=row.build_seconds,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


class PackageStore:
    """Packages and lineages in the coordinator's database."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.db = registry.db

    def register_lineage(
        self, lineage: str, tenant: str, model: dict[str, Any], base_sha256: str, base_bytes: int
    ) -> None:
        """Record what a lineage's packages name (idempotent)."""
        with self.db.session() as session:
            if session.get(Lineage, lineage) is None:
                session.add(
                    Lineage(
                        lineage=lineage,
                        tenant=tenant,
                        model=model,
                        base_model_sha256=base_sha256,
                        base_model_bytes=base_bytes,
                    )
                )

    def build(
        self,
        to_version: int,
        from_version: int | None,
        key: Ed25519PrivateKey,
        policy: PackagePolicy,
        *,
        now: datetime | None = None,
    ) -> PackageInfo:
        """Build, sign and store the package ``from_version`` → ``to_version`` (None: full adapter)."""
        started = time.perf_counter()
        target = self.registry.get(to_version)
        lineage = self._lineage(target.lineage)
        if from_version is not None:
            source = self.registry.get(from_version)
            if source.lineage != target.lineage or source.id >= target.id:
                raise ConfigError(
                    f"v{from_version} cannot be updated to v{to_version}: the target must be a later "
                    "version of the same lineage."
                )
        adapter = self.registry.load_adapter(to_version)
        base = self.registry.load_adapter(from_version) if from_version is not None else None
        payload_state = diff(adapter, base) if base is not None else adapter
        limit = int(policy.cap * lineage.base_model_bytes)
        created = now or utcnow()
        sizes: list[str] = []
        for codec in LADDER:
            payload = encode(payload_state, codec)
            decoded = decode(payload, codec, max_bytes=inflated_bound(payload_state))
            rebuilt = apply_delta(base, decoded) if base is not None else decoded
            manifest = Manifest(
                tenant=lineage.tenant,
                lineage=lineage.lineage,
                model=lineage.model,
                base_sha256=lineage.base_model_sha256,
                base_bytes=lineage.base_model_bytes,
                from_version=from_version,
                to_version=to_version,
                sequence=to_version,
                created=utc_iso(created),
                expires=utc_iso(created + policy.ttl),
                payload_sha256=sha256_hex(payload),
                payload_length=len(payload),
                codec=codec.name,
                reconstruction_error=relative_error(adapter, rebuilt),
            )
            blob = sign(manifest, payload, key).to_bytes()
            error = manifest.reconstruction_error
            sizes.append(f"{codec.name} {len(blob)} bytes, error {error:.2g}")
            if len(blob) <= limit and math.isfinite(error) and error <= policy.max_error:
                return self._store(manifest, codec, blob, policy, time.perf_counter() - started)
        raise PackageTooLarge(
            f"No codec fits v{from_version or 'none'} → v{to_version} under the cap of {limit} bytes "
            f"({policy.cap:.1%} of {lineage.base_model_bytes} base-model bytes) with reconstruction error "
            f"<= {policy.max_error:g}; by codec: {'; '.join(sizes)}. Raise the cap (at most {MAX_CAP:.0%}) "
            "or the allowed error, or train a smaller adapter."
        )

    def find(
        self, to_version: int, from_version: int | None, *, now: datetime | None = None
    ) -> PackageInfo | None:
        """The newest unexpired stored package for this step, if any."""
        query = (
            select(UpdatePackage)
            .where(UpdatePackage.to_version_id == to_version)
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
            return _info(row) if row else None

    def bytes_of(self, package_id: int) -> bytes:
        """The stored package, checked against its recorded sha256."""
        with self.db.session() as session:
            row = session.get(UpdatePackage, package_id)
            if row is None:
                raise FleetloraError(f"No package {package_id} in the database.")
            blob, expected = row.package, row.package_sha256
        if sha256_hex(blob) != expected:
            raise FleetloraError(f"Stored package {package_id} does not match its sha256: rebuild it.")
        return blob

    def list(self, lineage: str | None = None) -> list[PackageInfo]:
        query = select(UpdatePackage).order_by(UpdatePackage.id)
        if lineage is not None:
            query = query.where(UpdatePackage.lineage == lineage)
        with self.db.session() as session:
            return [_info(row) for row in session.scalars(query)]

    def _lineage(self, lineage: str) -> Lineage:
        with self.db.session() as session:
            row = session.get(Lineage, lineage)
        if row is None:
            raise FleetloraError(
                f"Lineage {lineage[:12]} has no model record: run a round with this fleetlora first."
            )
        return row

    def _store(
        self, manifest: Manifest, codec: Codec, blob: bytes, policy: PackagePolicy, seconds: float
    ) -> PackageInfo:
        with self.db.session() as session:
            row = UpdatePackage(
                lineage=manifest.lineage,
                from_version_id=manifest.from_version,
                to_version_id=manifest.to_version,
                sequence=manifest.sequence,
                codec=codec.name,
                package=blob,
                package_bytes=len(blob),
                package_sha256=sha256_hex(blob),
                base_model_bytes=manifest.base_bytes,
                cap=policy.cap,
                reconstruction_error=manifest.reconstruction_error,
                build_seconds=seconds,
                created_at=datetime.fromisoformat(manifest.created),
                expires_at=manifest.expires_at,
            )
            session.add(row)
            session.flush()
            return _info(row)
