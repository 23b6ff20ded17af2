"""What happened, append-only: the privacy ledger, the round records and the rounds' phases.

The privacy ledger holds each DP device's cumulative ε after every round it trained in (written
whether or not its delta was used, because the device spent its budget either way); the round
records say what each round did, failed rounds included. A completed round's record is written
with its version, in one transaction (``VersionStore.commit_round``). A round's phases are written
while it runs (:data:`PHASES`, then one of :data:`ENDED`), so an operator can follow it live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from fleetlora.coordinator.models import PrivacyEntry, RoundPhase, RoundRecord, utcnow
from fleetlora.coordinator.storage.rows import TenantScoped, info_of

COMPLETED = "completed"
FAILED = "failed"
# A round's phases in order; training counts devices answered, distributing devices brought up to date.
PHASES = ("sampling", "training", "aggregating", "evaluating", "publishing", "distributing")
ENDED = (COMPLETED, FAILED)  # a round's last phase row: its detail holds the version or the error


@dataclass(frozen=True)
class RoundReport:
    """What one round did, as the round loop reports it: a round record before it is stored."""

    sampled: int
    received: int
    dropped: list[dict[str, Any]]  # each dropped device's node id and reason
    upload_bytes: int
    seconds: float
    error: str | None = None  # why a failed round failed


@dataclass(frozen=True)
class RoundInfo:
    """A stored round record: completed (with its version) or failed (with the reason)."""

    id: int
    lineage: str
    round: int
    status: str  # COMPLETED | FAILED
    version_id: int | None
    sampled: int
    received: int
    dropped: list[dict[str, Any]]
    upload_bytes: int
    seconds: float
    error: str | None
    finished_at: datetime


@dataclass(frozen=True)
class PrivacySpend:
    """A DP device's cumulative spend as it reported it after a round (a privacy-ledger entry).

    Defined here, beside the ledger that stores it, so reading the ledger needs neither torch nor
    Flower; coordinator/uploads.py reads it from a device's reply.
    """

    device_id: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    records_retired: int  # records whose per-record budget is spent (they no longer train with DP)


@dataclass(frozen=True)
class PrivacyEntryInfo(PrivacySpend):
    """A DP device's cumulative spend after a round of a lineage, as it reported it."""

    id: int
    lineage: str
    round: int
    recorded_at: datetime


@dataclass(frozen=True)
class PhaseInfo:
    """One phase of a round: when it began and ended, and how far it got (``done`` of ``total``)."""

    id: int
    lineage: str
    round: int
    run_id: int | None
    phase: str
    done: int
    total: int | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    detail: str | None

    @property
    def seconds(self) -> float:
        """How long the phase took, or has taken so far."""
        return ((self.finished_at or self.updated_at) - self.started_at).total_seconds()


def round_row(lineage: str, round_number: int, report: RoundReport, version_id: int | None) -> RoundRecord:
    """The row of ``report``: completed when the round made ``version_id``, failed otherwise."""
    return RoundRecord(
        lineage=lineage,
        round=round_number,
        status=COMPLETED if version_id is not None else FAILED,
        version_id=version_id,
        **dataclasses.asdict(report),
    )


def phase_info(row: RoundPhase) -> PhaseInfo:
    return info_of(PhaseInfo, row, run_id=None if row.run_id is None else int(row.run_id))


def round_info(row: RoundRecord) -> RoundInfo:
    return info_of(RoundInfo, row, dropped=list(row.dropped or []))


class LedgerStore(TenantScoped):
    """Privacy-ledger entries and round records in the coordinator's database."""

    def record_privacy(self, lineage: str, round_number: int, spends: Iterable[PrivacySpend]) -> None:
        """Append ledger rows for the devices that trained in a round."""
        with self.db.session() as session:
            self.check_lineage(session, lineage)
            session.add_all(
                PrivacyEntry(lineage=lineage, round=round_number, **dataclasses.asdict(spend))
                for spend in spends
            )

    def privacy_ledger(self, lineage: str | None = None) -> list[PrivacyEntryInfo]:
        """Every ledger entry (of one lineage if given), oldest first."""
        with self.db.session() as session:
            return [
                info_of(PrivacyEntryInfo, row)
                for row in session.scalars(self.oldest_first(PrivacyEntry, lineage))
            ]

    def epsilon_spent(self) -> dict[str, float]:
        """Each DP device's largest reported ε (its spend so far, the spend being cumulative)."""
        query = (
            select(PrivacyEntry.device_id, func.max(PrivacyEntry.epsilon))
            .where(self.in_tenant(PrivacyEntry.lineage))
            .group_by(PrivacyEntry.device_id)
        )
        with self.db.session() as session:
            return {device: float(epsilon) for device, epsilon in session.execute(query).all()}

    def record_failed_round(self, lineage: str, round_number: int, report: RoundReport) -> RoundInfo:
        """Store the record of a round that made no version."""
        with self.db.session() as session:
            self.check_lineage(session, lineage)
            row = round_row(lineage, round_number, report, version_id=None)
            session.add(row)
            session.flush()
            return round_info(row)

    def rounds(self, lineage: str | None = None, *, last: int | None = None) -> list[RoundInfo]:
        """Round records (of one lineage if given; only the ``last`` ones if given), oldest first."""
        query = (
            select(RoundRecord)
            .where(self.in_tenant(RoundRecord.lineage))
            .order_by(RoundRecord.id.desc())
            .limit(last)
        )
        if lineage is not None:
            query = query.where(RoundRecord.lineage == lineage)
        with self.db.session() as session:
            return [round_info(row) for row in reversed(session.scalars(query).all())]

    def enter_phase(
        self,
        lineage: str,
        round_number: int,
        phase: str,
        *,
        run_id: int | None = None,
        total: int | None = None,
        detail: str | None = None,
    ) -> PhaseInfo:
        """Finish the round's phase in progress and begin ``phase`` (an ended one is finished at once)."""
        if phase not in PHASES and phase not in ENDED:
            raise ValueError(f"unknown round phase {phase!r}")
        now = utcnow()
        with self.db.session() as session:
            self.check_lineage(session, lineage)
            session.execute(
                update(RoundPhase)
                .where(
                    RoundPhase.lineage == lineage,
                    RoundPhase.round == round_number,
                    RoundPhase.finished_at.is_(None),
                )
                .values(finished_at=now, updated_at=now)
            )
            row = RoundPhase(
                lineage=lineage,
                round=round_number,
                run_id=None if run_id is None else str(run_id),
                phase=phase,
                done=0,
                total=total,
                started_at=now,
                updated_at=now,
                finished_at=now if phase in ENDED else None,
                detail=detail[:500] if detail else None,
            )
            session.add(row)
            session.flush()
            return phase_info(row)

    def advance_phase(self, phase_id: int, done: int) -> None:
        """Record how far a phase in progress has got (devices answered, devices brought up)."""
        with self.db.session() as session:
            session.execute(
                update(RoundPhase)
                .where(RoundPhase.id == phase_id, self.in_tenant(RoundPhase.lineage))
                .values(done=done, updated_at=utcnow())
            )

    def phases(
        self, lineage: str | None = None, *, run_id: int | None = None, last_rounds: int | None = None
    ) -> list[PhaseInfo]:
        """Phase rows, oldest first: of one lineage or run if given, of the ``last_rounds`` newest rounds
        begun (each begins with ``sampling``; a round retried after a restart counts again) if given."""
        query = self.oldest_first(RoundPhase, lineage)
        if run_id is not None:
            query = query.where(RoundPhase.run_id == str(run_id))
        if last_rounds is not None and last_rounds <= 0:
            return []
        with self.db.session() as session:
            if last_rounds is not None:
                first = session.scalar(  # the id that begins the last_rounds-th newest round
                    query.with_only_columns(RoundPhase.id)
                    .where(RoundPhase.phase == PHASES[0])
                    .order_by(None)
                    .order_by(RoundPhase.id.desc())
                    .offset(last_rounds - 1)
                    .limit(1)
                )
                if first is not None:  # else fewer rounds have begun: all of them
                    query = query.where(RoundPhase.id >= first)
            return [phase_info(row) for row in session.scalars(query)]
