"""Versions of the global adapter in SQL: store, find the latest, walk the lineage, load verified.

A *lineage* is every version that can follow from one another: same base model, same adapter
layout, same labels. A restarted coordinator resumes from the latest version of its lineage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from fleetlora.common.delta import State, deserialize, nbytes, serialize, sha256_hex
from fleetlora.common.errors import CorruptVersionError, FleetloraError
from fleetlora.common.keys import load_public_key, public_pem
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.models import (
    EnrolledDevice,
    ModelVersion,
    OptimizerState,
    Participant,
    PrivacyEntry,
    RoundRecord,
    utcnow,
)
from fleetlora.coordinator.uploads import PrivacySpend


@dataclass(frozen=True)
class VersionInfo:
    """A stored version without its adapter bytes (load those with :meth:`Registry.load_adapter`)."""

    id: int
    parent_id: int | None
    lineage: str
    round: int
    base_model_sha256: str
    adapter_sha256: str
    adapter_bytes: int
    metrics: dict[str, Any]
    participants: dict[str, int]
    created_at: datetime

    @property
    def label(self) -> str:
        return f"v{self.id}"


def _info(row: ModelVersion) -> VersionInfo:
    return VersionInfo(
        id=row.id,
        parent_id=row.parent_id,
        lineage=row.lineage,
        round=row.round,
        base_model_sha256=row.base_model_sha256,
        adapter_sha256=row.adapter_sha256,
        adapter_bytes=row.adapter_bytes,
        metrics=dict(row.metrics or {}),
        participants={p.node_id: p.num_examples for p in row.participants},
        created_at=row.created_at,
    )


class Registry:
    """Read and write versions and round records."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add_version(
        self,
        *,
        lineage: str,
        parent_id: int | None,
        round_number: int,
        base_model_sha256: str,
        adapter: State,
        participants: Mapping[str, int],
        metrics: Mapping[str, Any],
        optimizer: tuple[str, State] | None = None,
    ) -> VersionInfo:
        """Store a new version, its participants and the server optimizer's state in one transaction."""
        blob = serialize(adapter)
        with self.db.session() as session:
            row = ModelVersion(
                parent_id=parent_id,
                lineage=lineage,
                round=round_number,
                base_model_sha256=base_model_sha256,
                adapter=blob,
                adapter_sha256=sha256_hex(blob),
                adapter_bytes=nbytes(adapter),
                metrics=dict(metrics),
                participants=[Participant(node_id=str(n), num_examples=c) for n, c in participants.items()],
            )
            session.add(row)
            session.flush()
            if optimizer is not None and optimizer[1]:
                state_blob = serialize(optimizer[1])
                session.add(
                    OptimizerState(
                        version_id=row.id,
                        optimizer=optimizer[0],
                        state=state_blob,
                        state_sha256=sha256_hex(state_blob),
                    )
                )
            return _info(row)

    def load_optimizer(self, version_id: int) -> tuple[str, State] | None:
        """The server optimizer state stored with a version (checked against its sha256), if any."""
        with self.db.session() as session:
            row = session.get(OptimizerState, version_id)
            if row is None:
                return None
            name, blob, expected = row.optimizer, row.state, row.state_sha256
        if sha256_hex(blob) != expected:
            raise CorruptVersionError(f"Version v{version_id}: optimizer state does not match its sha256.")
        return name, deserialize(blob)

    def finish_round(self, record: RoundRecord, metrics: Mapping[str, Any]) -> VersionInfo:
        """Merge a completed round's evaluation into its version and store the round record, together."""
        if record.version_id is None:
            raise ValueError("finish_round needs a completed round's version_id.")
        with self.db.session() as session:
            row = self._row(session, record.version_id)
            row.metrics = {**(row.metrics or {}), **metrics}
            session.add(record)
            session.flush()
            return _info(row)

    def get(self, version_id: int) -> VersionInfo:
        with self.db.session() as session:
            return _info(self._row(session, version_id))

    def latest(self, lineage: str) -> VersionInfo | None:
        """The version of ``lineage`` with the highest round, or None for a new lineage."""
        with self.db.session() as session:
            row = session.scalars(
                select(ModelVersion)
                .where(ModelVersion.lineage == lineage)
                .order_by(ModelVersion.round.desc())
                .limit(1)
            ).first()
            return _info(row) if row else None

    def versions(self, lineage: str | None = None) -> list[VersionInfo]:
        """All versions (of one lineage if given), oldest first."""
        query = select(ModelVersion).order_by(ModelVersion.id)
        if lineage is not None:
            query = query.where(ModelVersion.lineage == lineage)
        with self.db.session() as session:
            return [_info(row) for row in session.scalars(query)]

    def chain(self, version_id: int) -> list[VersionInfo]:
        """The version and its ancestors, newest first, back to round 0."""
        chain: list[VersionInfo] = []
        next_id: int | None = version_id
        while next_id is not None:
            info = self.get(next_id)
            chain.append(info)
            next_id = info.parent_id
        return chain

    def load_adapter(self, version_id: int) -> State:
        """The stored adapter, after checking its bytes against the recorded sha256."""
        with self.db.session() as session:
            row = self._row(session, version_id)
            blob, expected = row.adapter, row.adapter_sha256
        if sha256_hex(blob) != expected:
            raise CorruptVersionError(
                f"Version v{version_id}: stored adapter bytes do not match their sha256; "
                "restore the database from a backup."
            )
        return deserialize(blob)

    def record_privacy(self, lineage: str, round_number: int, spends: Iterable[PrivacySpend]) -> None:
        """Append ledger rows for the devices that trained in a round."""
        with self.db.session() as session:
            session.add_all(
                PrivacyEntry(lineage=lineage, round=round_number, **dataclasses.asdict(spend))
                for spend in spends
            )

    def privacy_ledger(self, lineage: str | None = None) -> list[PrivacyEntry]:
        """Every ledger row (of one lineage if given), oldest first."""
        query = select(PrivacyEntry).order_by(PrivacyEntry.id)
        if lineage is not None:
            query = query.where(PrivacyEntry.lineage == lineage)
        with self.db.session() as session:
            return list(session.scalars(query))

    def enroll_device(
        self, device_id: str, tenant: str, public_key: Ed25519PublicKey, node_id: int | None = None
    ) -> None:
        """Register (or re-key) a device; its uploads verify against this key from now on.

        ``node_id`` is its SuperNode's Flower node id when the device was registered with the SuperLink.
        """
        pem = public_pem(public_key).decode()
        node = str(node_id) if node_id is not None else None
        with self.db.session() as session:
            row = session.get(EnrolledDevice, device_id)
            if row is None:
                row = EnrolledDevice(device_id=device_id, tenant=tenant, public_key_pem=pem, node_id=node)
                session.add(row)
            else:
                row.tenant, row.public_key_pem, row.enrolled_at = tenant, pem, utcnow()
                row.node_id = node or row.node_id

    def enrolled_devices(self) -> list[EnrolledDevice]:
        with self.db.session() as session:
            return list(session.scalars(select(EnrolledDevice).order_by(EnrolledDevice.device_id)))

    def device_key(self, device_id: str, tenant: str) -> tuple[Ed25519PublicKey, str | None] | None:
        """The enrolled key of ``device_id`` in ``tenant`` and its SuperNode's node id (None when it was
        enrolled without one, as simulated devices are); None if it is not enrolled there."""
        with self.db.session() as session:
            row = session.get(EnrolledDevice, device_id)
            if row is None or row.tenant != tenant:
                return None
            pem, node_id = row.public_key_pem, row.node_id
        return load_public_key(pem.encode(), Ed25519PublicKey, f"device {device_id}'s enrolled key"), node_id

    def record_round(self, record: RoundRecord) -> None:
        with self.db.session() as session:
            session.add(record)

    def rounds(self, lineage: str) -> list[RoundRecord]:
        with self.db.session() as session:
            query = select(RoundRecord).where(RoundRecord.lineage == lineage).order_by(RoundRecord.id)
            return list(session.scalars(query))

    @staticmethod
    def _row(session: Any, version_id: int) -> ModelVersion:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise FleetloraError(f"No version v{version_id} in the database.")
        return row
