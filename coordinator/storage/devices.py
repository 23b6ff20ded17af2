"""Devices: who is enrolled with which key, and what each last reported about its version.

An enrolled device's Ed25519 public key is what every sealed upload from it must verify against;
its SuperNode's Flower node id, once registered, is the only node its uploads may come from. The
update reports (``device_updates``) hold the version each device last said it holds, how its last
package offer went, whether its new records drifted so that it wants to train, whether its gates let
it train (closed since it declined a train message, until its next status reply), where it trains, and
the last round it declined. Anomaly flags
(``device_flags``) and the quarantine (``quarantine``) keep a repeatedly flagged device out of sampling
until an operator releases it (coordinator/quarantine.py); both tables are append-only but for the
release, which is written on the quarantine's own row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import ColumnElement, Select, SQLColumnExpression, func, select, true
from sqlalchemy.orm import Session

from fleetlora.common.errors import FleetloraError
from fleetlora.common.keys import load_public_key, public_pem
from fleetlora.common.terminal import printable
from fleetlora.coordinator.models import DeviceFlag, DeviceUpdate, EnrolledDevice, QuarantineEntry, utcnow
from fleetlora.coordinator.storage import audit
from fleetlora.coordinator.storage.rows import TenantScoped, info_of

REASON_CHARS = 500  # the column's width: longer reasons are cut


def stored_reason(reason: str | None) -> str | None:
    """A device's reason as a column keeps it: control characters escaped (PostgreSQL's text refuses
    NUL, which protobuf strings allow: one device's reason must not abort the round's write for all),
    and cut to the column's width."""
    return printable(reason)[:REASON_CHARS] if reason else None


@dataclass(frozen=True)
class DeviceInfo:
    """An enrolled device (without its key: see :meth:`DeviceStore.key`)."""

    device_id: str
    tenant: str
    node_id: str | None  # its SuperNode's Flower node id; None until registered (simulated devices)
    enrolled_at: datetime


@dataclass(frozen=True)
class DeviceKey:
    """What an upload from an enrolled device is checked against."""

    public_key: Ed25519PublicKey
    node_id: str | None  # the only node its uploads may come from; None: any


@dataclass(frozen=True)
class DeviceUpdateInfo:
    """What a device last reported: the version it holds and how its last package offer went."""

    device_id: str
    tenant: str
    node_id: str
    version_id: int | None
    sequence: int
    status: str  # "applied" | "current" | "rejected" | "failed"
    wants_train: bool  # its new records drifted (client/corpus/drift.py)
    reason: str | None
    reported_at: datetime
    eligible: bool  # its gates were open when it last said, and it has not declined since
    eligibility_reason: str | None  # why not, when not eligible
    accelerator: str | None  # "cuda" | "mps" | "xpu" | "cpu"; None: not said (a device before contract 6)
    memory_bytes: int | None  # the memory its training may use; None: not said
    declined_round: int | None  # the last round it declined to train in
    declined_reason: str | None  # and why


@dataclass(frozen=True)
class StatusReport:
    """A status reply's word on a device beyond its version, read as untrusted input
    (coordinator/distribution.py): a device from before contract 6 says only ``wants_train``."""

    wants_train: bool = False
    eligible: bool = True
    eligibility_reason: str | None = None
    accelerator: str | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Decline:
    """A train reply that declined: the node the SuperLink proved it came from, the device id it
    claims (a label, proving nothing), and the device's reason."""

    node_id: int
    device_id: str | None
    reason: str


@dataclass(frozen=True)
class QuarantineInfo:
    """A device's quarantine: why, since when, and its release once an operator made it."""

    id: int
    device_id: str
    reason: str
    quarantined_at: datetime
    released_at: datetime | None
    release_reason: str | None


class DeviceStore(TenantScoped):
    """Enrolled devices and their update reports in the coordinator's database."""

    # ---- enrolment ------------------------------------------------------------------------

    def enroll(
        self, device_id: str, tenant: str, public_key: Ed25519PublicKey, node_id: int | None = None
    ) -> None:
        """Register (or re-key) a device; its uploads verify against this key from now on.

        ``node_id`` is its SuperNode's Flower node id when the device was registered with the SuperLink;
        re-enrolling without one keeps the node id it had.
        """
        pem = public_pem(public_key).decode()
        node = str(node_id) if node_id is not None else None
        if self.tenant is not None and tenant != self.tenant:
            raise FleetloraError(f"This store enrols into tenant {self.tenant}, not {tenant}.")
        with self.db.session() as session:
            row = session.get(EnrolledDevice, device_id)
            if row is not None and row.tenant != tenant:
                raise FleetloraError(
                    f"{device_id} is enrolled in another tenant: a device id belongs to one tenant; "
                    "pick another id."
                )
            if row is None:
                session.add(
                    EnrolledDevice(device_id=device_id, tenant=tenant, public_key_pem=pem, node_id=node)
                )
            else:
                row.tenant, row.public_key_pem, row.enrolled_at = tenant, pem, utcnow()
                row.node_id = node or row.node_id
            details = {
                "tenant": tenant,
                "key_sha256": hashlib.sha256(pem.encode()).hexdigest(),
                "node": node,
                "again": row is not None,
            }
            audit.append(session, "device.enrolled", device_id, details)

    def enrolled(self) -> list[DeviceInfo]:
        """Every enrolled device, by id."""
        with self.db.session() as session:
            rows = session.scalars(
                select(EnrolledDevice)
                .where(self.is_tenant(EnrolledDevice.tenant))
                .order_by(EnrolledDevice.device_id)
            )
            return [info_of(DeviceInfo, row) for row in rows]

    def enrolment(self, device_id: str) -> DeviceInfo | None:
        """The device's enrolment; None if it is not enrolled (in this tenant, when the store has one)."""
        with self.db.session() as session:
            row = session.get(EnrolledDevice, device_id)
            return info_of(DeviceInfo, row) if row and self.tenant in (None, row.tenant) else None

    def key(self, device_id: str, tenant: str) -> DeviceKey | None:
        """The enrolled key of ``device_id`` in ``tenant``; None if it is not enrolled there."""
        with self.db.session() as session:
            row = session.get(EnrolledDevice, device_id)
            if row is None or row.tenant != tenant:
                return None
            pem, node_id = row.public_key_pem, row.node_id
        what = f"device {device_id}'s enrolled key"
        return DeviceKey(load_public_key(pem.encode(), Ed25519PublicKey, what), node_id)

    # ---- update reports -------------------------------------------------------------------

    def record_update(
        self,
        device_id: str,
        *,
        tenant: str,
        node_id: int,
        status: str,
        reason: str | None,
        version_id: int | None = None,
        sequence: int = 0,
    ) -> None:
        """Upsert the device's report; ``version_id`` and ``sequence`` (what it holds) when it said,
        else the last ones it said are kept."""
        with self.db.session() as session:
            row = session.get(DeviceUpdate, device_id) or DeviceUpdate(device_id=device_id)
            row.tenant, row.node_id, row.status = tenant, str(node_id), status
            row.reason = stored_reason(reason)
            row.reported_at = utcnow()
            if version_id is not None:
                row.version_id, row.sequence = version_id, sequence
            session.add(row)

    def record_status_reports(self, reports: Mapping[str, StatusReport]) -> None:
        """Store what each reporting device said of its drift, gates and capability (its word on its
        gates replaces a decline's mark); devices never reported on are skipped."""
        with self.db.session() as session:
            for device_id, report in reports.items():
                row = session.get(DeviceUpdate, device_id)
                if row is None or self.tenant not in (None, row.tenant):
                    continue
                row.wants_train, row.eligible = report.wants_train, report.eligible
                reason = report.eligibility_reason if not report.eligible else None
                row.eligibility_reason = stored_reason(reason)
                row.accelerator, row.memory_bytes = report.accelerator, report.memory_bytes

    def record_declines(self, round_number: int, declines: Sequence[Decline]) -> None:
        """Keep each decline on its device's row and mark the device not eligible, with the device's
        reason, until its next status reply says otherwise.

        By the node the SuperLink proved, as :meth:`wanting_nodes` reads: a decline lands only on rows
        a status reply from that node wrote, and when it names a device, only on that device's row
        (so no node can mark another node's device); a device with no row yet is not recorded.
        """
        if not declines:
            return  # most rounds: no write transaction taken
        with self.db.session() as session:
            for decline in declines:
                query = select(DeviceUpdate).where(
                    DeviceUpdate.node_id == str(decline.node_id), self.is_tenant(DeviceUpdate.tenant)
                )
                if decline.device_id is not None:
                    query = query.where(DeviceUpdate.device_id == decline.device_id)
                reason = stored_reason(decline.reason)
                for row in session.scalars(query):
                    row.declined_round, row.declined_reason = round_number, reason
                    row.eligible, row.eligibility_reason = False, reason

    def wanting_nodes(self) -> set[int]:
        """Nodes whose device last said its new records drifted: sampled first in the next round."""
        return self._nodes_where(DeviceUpdate.wants_train.is_(True))

    def ineligible_nodes(self) -> set[int]:
        """Nodes whose device last said a gate is closed, or declined since: sampled last."""
        return self._nodes_where(DeviceUpdate.eligible.is_(False))

    def _nodes_where(self, condition: ColumnElement[bool]) -> set[int]:
        query = select(DeviceUpdate.node_id).where(condition, self.is_tenant(DeviceUpdate.tenant))
        with self.db.session() as session:
            return {int(node) for node in session.scalars(query)}

    def updates(self) -> list[DeviceUpdateInfo]:
        """Every device's last report, by device id."""
        with self.db.session() as session:
            rows = session.scalars(
                select(DeviceUpdate)
                .where(self.is_tenant(DeviceUpdate.tenant))
                .order_by(DeviceUpdate.device_id)
            )
            return [info_of(DeviceUpdateInfo, row) for row in rows]

    # ---- anomalies and quarantine ---------------------------------------------------------

    def flag(
        self, lineage: str, round_number: int, flags: Sequence[tuple[str, str]], *, quarantine_after: int
    ) -> list[str]:
        """Record ``(device id, reason)`` flags; quarantine each device that now has ``quarantine_after``
        flags since its last release (0: never). Returns the devices quarantined by this call."""
        quarantined: list[str] = []
        with self.db.session() as session:
            self.check_lineage(session, lineage)
            for device_id, reason in flags:
                session.add(
                    DeviceFlag(
                        device_id=device_id, lineage=lineage, round=round_number, reason=reason[:REASON_CHARS]
                    )
                )
            session.flush()
            for device_id in sorted({device for device, _ in flags}):
                if not quarantine_after or _current(session, device_id) is not None:
                    continue
                # Flags after the last release: by flag id, which no host's clock can skew.
                released = select(func.max(QuarantineEntry.flags_until)).where(
                    QuarantineEntry.device_id == device_id
                )
                since = session.scalar(released) or 0
                count = select(func.count()).where(DeviceFlag.device_id == device_id, DeviceFlag.id > since)
                flagged = session.scalar(count) or 0
                if flagged >= quarantine_after:
                    reason = f"{flagged} anomalies, the last in round {round_number} of {lineage[:8]}"
                    session.add(QuarantineEntry(device_id=device_id, reason=reason))
                    audit.append(session, "device.quarantined", device_id, {"reason": reason})
                    quarantined.append(device_id)
        return quarantined

    def quarantined(self, *, released: bool = False) -> list[QuarantineInfo]:
        """The devices in quarantine now, oldest first (with ``released``, every entry ever)."""
        query = (
            select(QuarantineEntry)
            .where(self._flagged_in_tenant(QuarantineEntry.device_id))
            .order_by(QuarantineEntry.id)
        )
        if not released:
            query = query.where(QuarantineEntry.released_at.is_(None))
        with self.db.session() as session:
            return [info_of(QuarantineInfo, row) for row in session.scalars(query)]

    def release(self, device_id: str, reason: str) -> QuarantineInfo:
        """End a device's quarantine, recording why; its flags before now no longer count."""
        if not reason.strip():
            raise FleetloraError("Say why the device is released (--reason): it is kept with the quarantine.")
        with self.db.session() as session:
            open_rows = list(
                session.scalars(_open(device_id).where(self._flagged_in_tenant(QuarantineEntry.device_id)))
            )  # two coordinators may each have held it
            if not open_rows:
                raise FleetloraError(
                    f"{device_id} is not in quarantine: `coordinator devices quarantined` lists who is."
                )
            last_flag = session.scalar(
                select(func.max(DeviceFlag.id)).where(DeviceFlag.device_id == device_id)
            )
            for row in open_rows:
                row.released_at, row.release_reason = utcnow(), reason[:REASON_CHARS]
                row.flags_until = last_flag or 0
            audit.append(session, "device.released", device_id, {"reason": reason[:REASON_CHARS]})
            session.flush()
            return info_of(QuarantineInfo, open_rows[0])

    def _flagged_in_tenant(self, device_id: SQLColumnExpression[str]) -> ColumnElement[bool]:
        """A quarantine belongs to the tenant whose lineages its device's flags came from (a simulated
        fleet's devices need not be enrolled)."""
        if self.tenant is None:
            return true()
        return device_id.in_(select(DeviceFlag.device_id).where(self.in_tenant(DeviceFlag.lineage)))

    def flags(self, device_id: str) -> list[tuple[int, str]]:
        """A device's flags as (round, reason), oldest first."""
        query = (
            select(DeviceFlag)
            .where(DeviceFlag.device_id == device_id, self.in_tenant(DeviceFlag.lineage))
            .order_by(DeviceFlag.id)
        )
        with self.db.session() as session:
            return [(row.round, row.reason) for row in session.scalars(query)]


def _open(device_id: str) -> Select[QuarantineEntry]:
    return select(QuarantineEntry).where(
        QuarantineEntry.device_id == device_id, QuarantineEntry.released_at.is_(None)
    )


def _current(session: Session, device_id: str) -> QuarantineEntry | None:
    return session.scalars(_open(device_id)).first()
