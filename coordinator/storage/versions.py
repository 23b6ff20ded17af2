"""Versions of the global adapter: store, find the latest, walk the lineage, load verified.

A *lineage* is every version that can follow from one another: same base model, same adapter
layout, same labels. A restarted coordinator resumes from the latest version of its lineage. Each
lineage's model record (what a package manifest names, and the base size the package cap is
taken of) is kept here too, as is the server optimizer's state after each version, each version's
key-knowledge scores, and the hold the retention gate put on it until an operator's release
(coordinator/retention.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetlora.common.errors import CorruptVersionError, FleetloraError
from fleetlora.coordinator.models import (
    Lineage,
    ModelVersion,
    OptimizerState,
    Participant,
    VersionHold,
    VersionKeyScore,
    utcnow,
)
from fleetlora.coordinator.storage import audit
from fleetlora.coordinator.storage.ledgers import RoundReport, round_row
from fleetlora.coordinator.storage.rows import TenantScoped, checked_blob, info_of

if TYPE_CHECKING:  # torch loads where adapters are (de)serialized: listings read rows without it
    from fleetlora.common.delta import State

REVERTED_TO, REVERT_REASON = "reverted_to", "revert_reason"  # a revert's metrics (VersionStore.revert)
REASON_CHARS = 500  # the holds' reason columns: longer reasons are cut


@dataclass(frozen=True)
class HoldInfo:
    """The retention gate's hold on a version, and the operator's release once made."""

    reason: str
    held_at: datetime
    released_at: datetime | None
    release_reason: str | None
    released_by: str | None


@dataclass(frozen=True)
class VersionInfo:
    """A stored version without its adapter bytes (load those with :meth:`VersionStore.adapter`)."""

    id: int
    parent_id: int | None
    lineage: str
    round: int
    base_model_sha256: str
    adapter_sha256: str
    adapter_bytes: int
    metrics: dict[str, Any]
    participants: dict[str, int]  # node id → examples it trained on
    created_at: datetime
    key_score: float | None  # its newest key-knowledge score (higher is better), None if never scored
    key_set_id: int | None  # the key set that score was made on
    hold: HoldInfo | None  # None: never held

    @property
    def label(self) -> str:
        return f"v{self.id}"

    @property
    def held(self) -> bool:
        """Held back by the retention gate and not released: never packaged or distributed."""
        return self.hold is not None and self.hold.released_at is None


@dataclass(frozen=True)
class ServerOptimizerState:
    """The server optimizer's name and its moments after a version, so a restart continues them."""

    name: str  # fedavgm, fedadam, ...
    state: State


@dataclass(frozen=True)
class NewVersion:
    """A version to store: where it comes from, its adapter, who trained it and how it scored."""

    lineage: str
    round: int  # 0: the seeded initial adapter, with no parent
    parent_id: int | None
    base_model_sha256: str
    adapter: State
    participants: Mapping[str, int]  # node id → examples it trained on
    metrics: Mapping[str, Any]
    optimizer: ServerOptimizerState | None = None  # None, or an empty state: nothing to continue
    key_set_id: int | None = None  # the key set ``key_score`` was made on; None: not scored
    key_score: float | None = None
    hold: str | None = None  # why the retention gate holds it back; None: distributable


@dataclass(frozen=True)
class LineageInfo:
    """A lineage's model: what its packages' manifests name."""

    lineage: str
    tenant: str
    model: dict[str, Any]  # the ModelSpec as config entries
    base_model_sha256: str
    base_model_bytes: int
    created_at: datetime


def _version_info(row: ModelVersion) -> VersionInfo:
    newest = row.key_scores[-1] if row.key_scores else None
    return info_of(
        VersionInfo,
        row,
        metrics=dict(row.metrics or {}),
        participants={p.node_id: p.num_examples for p in row.participants},
        key_score=newest.score if newest else None,
        key_set_id=newest.key_set_id if newest else None,
        hold=info_of(HoldInfo, row.hold) if row.hold else None,
    )


class VersionStore(TenantScoped):
    """Versions, their optimizer states and lineage records in the coordinator's database."""

    # ---- write ----------------------------------------------------------------------------

    def add(self, version: NewVersion) -> VersionInfo:
        """Store a version, its participants and the server optimizer's state in one transaction."""
        with self.db.session() as session:
            return _version_info(self._insert(session, version))

    def commit_round(self, version: NewVersion, report: RoundReport) -> VersionInfo:
        """Store a completed round whole, in one transaction: its new version, the participants, the
        metrics, the server optimizer's state and the round record.

        A crash leaves either all of it or none: never a version without its round, or the reverse.
        """
        with self.db.session() as session:
            row = self._insert(session, version)
            session.add(round_row(version.lineage, version.round, report, version_id=row.id))
            session.flush()
            return _version_info(row)

    def register_lineage(
        self, lineage: str, tenant: str, model: dict[str, Any], base_sha256: str, base_bytes: int
    ) -> None:
        """Record what a lineage's packages name (idempotent); a lineage of another tenant is refused."""
        with self.db.session() as session:
            existing = session.get(Lineage, lineage)
            if existing is not None and existing.tenant != tenant:
                raise FleetloraError(
                    f"Lineage {lineage[:12]} belongs to another tenant: a tenant never writes into "
                    "another's lineage."
                )
            if existing is None:
                session.add(
                    Lineage(
                        lineage=lineage,
                        tenant=tenant,
                        model=model,
                        base_model_sha256=base_sha256,
                        base_model_bytes=base_bytes,
                    )
                )
                audit.append(
                    session,
                    "lineage.registered",
                    lineage,
                    {"tenant": tenant, "model": model, "base_sha256": base_sha256},
                )

    # ---- read -----------------------------------------------------------------------------

    def get(self, version_id: int) -> VersionInfo:
        with self.db.session() as session:
            return _version_info(self._row(session, version_id))

    def latest(self, lineage: str, *, distributable: bool = False) -> VersionInfo | None:
        """The version of ``lineage`` with the highest round, or None for a new lineage; with
        ``distributable``, the highest that is not held (what devices may be brought to)."""
        query = (
            select(ModelVersion)
            .where(ModelVersion.lineage == lineage, self.in_tenant(ModelVersion.lineage))
            .order_by(ModelVersion.round.desc())
            .limit(1)
        )
        if distributable:
            query = query.where(~ModelVersion.hold.has(VersionHold.released_at.is_(None)))
        with self.db.session() as session:
            row = session.scalars(query).first()
            return _version_info(row) if row else None

    def all(self, lineage: str | None = None) -> list[VersionInfo]:
        """All versions (of one lineage if given), oldest first."""
        with self.db.session() as session:
            return [_version_info(row) for row in session.scalars(self.oldest_first(ModelVersion, lineage))]

    def revert(self, version_id: int, reason: str) -> VersionInfo:
        """Make version ``version_id``'s adapter the newest of its lineage again, as a new version one
        round after the latest (parent: the latest), recording the version it reverts to and why.

        Nothing is deleted: the bad versions stay, for the record, and the next round trains from this one.
        A version the retention gate holds is refused until released: its copy would not be held. The
        server optimizer starts fresh (its moments belong to the path that is being left).
        """
        if not reason.strip():
            raise FleetloraError("Give the reason for the revert (--reason): it is stored with the version.")
        target = self.get(version_id)
        if target.held:
            raise FleetloraError(
                f"{target.label} is held by the retention gate: release it first (`fleetlora coordinator "
                f"versions release {target.label} --reason ...`), or revert to a version not held."
            )
        latest = self.latest(target.lineage)
        assert latest is not None  # the target itself is in the lineage
        if latest.id == target.id:
            raise FleetloraError(
                f"{target.label} is already the newest version of its lineage: nothing to revert."
            )
        metrics = {k: v for k, v in target.metrics.items() if k.startswith("central_")}
        return self.add(
            NewVersion(
                lineage=target.lineage,
                round=latest.round + 1,
                parent_id=latest.id,
                base_model_sha256=target.base_model_sha256,
                adapter=self.adapter(target.id),
                participants={},
                metrics={**metrics, REVERTED_TO: target.id, REVERT_REASON: reason.strip()},
            )
        )

    # ---- key knowledge and the retention gate ----------------------------------------------

    def score(self, version_id: int, key_set_id: int, score: float) -> None:
        """Record version ``version_id``'s key-knowledge score on key set ``key_set_id`` (a version
        stored before the set was pinned is scored when a run starts from it)."""
        with self.db.session() as session:
            self._row(session, version_id)  # of this tenant
            row = session.get(VersionKeyScore, (version_id, key_set_id))
            if row is None:
                session.add(VersionKeyScore(version_id=version_id, key_set_id=key_set_id, score=score))
            else:
                row.score, row.scored_at = score, utcnow()

    def best_key_score(self, lineage: str, key_set_id: int) -> tuple[int, float] | None:
        """The highest key score on ``key_set_id`` among ``lineage``'s versions, with the version that
        made it (the oldest of a tie); None when none was scored on it."""
        query = (
            select(VersionKeyScore.version_id, VersionKeyScore.score)
            .join(ModelVersion, ModelVersion.id == VersionKeyScore.version_id)
            .where(
                ModelVersion.lineage == lineage,
                self.in_tenant(ModelVersion.lineage),
                VersionKeyScore.key_set_id == key_set_id,
            )
            .order_by(VersionKeyScore.score.desc(), VersionKeyScore.version_id)
            .limit(1)
        )
        with self.db.session() as session:
            best = session.execute(query).first()
            return (int(best[0]), float(best[1])) if best else None

    def release(self, version_id: int, reason: str) -> VersionInfo:
        """Release a version the retention gate held, recording when, why and by whom (the audit
        log's actor): it may be packaged and distributed from now on."""
        if not reason.strip():
            raise FleetloraError("Say why the version is released (--reason): it is kept with the hold.")
        with self.db.session() as session:
            row = self._row(session, version_id)
            if row.hold is None or row.hold.released_at is not None:
                state = "was released already" if row.hold is not None else "was never held"
                raise FleetloraError(
                    f"v{version_id} is not held (it {state}): only a held version can be released; "
                    "`versions list` shows which are."
                )
            actor = audit.default_actor()
            row.hold.released_at, row.hold.released_by = utcnow(), actor
            row.hold.release_reason = reason.strip()[:REASON_CHARS]
            audit.append(
                session,
                "version.released",
                f"v{row.id}",
                {"lineage": row.lineage, "round": row.round, "reason": row.hold.release_reason},
                actor=actor,
            )
            session.flush()
            return _version_info(row)

    def chain(self, version_id: int) -> list[VersionInfo]:
        """The version and its ancestors, newest first, back to round 0.

        A damaged database whose parents form a cycle, or point to a newer version, is refused rather
        than walked forever: a parent is always older (a smaller id) than its child.
        """
        chain: list[VersionInfo] = []
        next_id: int | None = version_id
        while next_id is not None:
            info = self.get(next_id)
            chain.append(info)
            if info.parent_id is not None and info.parent_id >= info.id:
                raise CorruptVersionError(
                    f"Version v{info.id} names v{info.parent_id} as its parent, which is not older: the "
                    "database is damaged; restore it from a backup."
                )
            next_id = info.parent_id
        return chain

    def adapter(self, version_id: int) -> State:
        """The stored adapter, after checking its bytes against the recorded sha256."""
        from fleetlora.common.delta import deserialize

        with self.db.session() as session:
            row = self._row(session, version_id)
            blob, expected = self.db.cipher.open(row.adapter, adapter_binding(row)), row.adapter_sha256
        return deserialize(
            checked_blob(
                blob,
                expected,
                lambda: CorruptVersionError(
                    f"Version v{version_id}: stored adapter bytes do not match their sha256; "
                    "restore the database from a backup."
                ),
            )
        )

    def optimizer_state(self, version_id: int) -> ServerOptimizerState | None:
        """The server optimizer state stored with a version (checked against its sha256), if any."""
        from fleetlora.common.delta import deserialize

        with self.db.session() as session:
            self._row(session, version_id)  # of this tenant
            row = session.get(OptimizerState, version_id)
            if row is None:
                return None
            name, expected = row.optimizer, row.state_sha256
            blob = self.db.cipher.open(row.state, optimizer_binding(row.version_id, row.optimizer))
        corrupt = f"Version v{version_id}: optimizer state does not match its sha256."
        return ServerOptimizerState(
            name, deserialize(checked_blob(blob, expected, lambda: CorruptVersionError(corrupt)))
        )

    def lineage(self, lineage: str) -> LineageInfo:
        """The model record of ``lineage``; a lineage without one cannot be packaged."""
        with self.db.session() as session:
            row = session.get(Lineage, lineage)
            if row is None or (self.tenant is not None and row.tenant != self.tenant):
                raise FleetloraError(
                    f"Lineage {lineage[:12]} has no model record: run a round with this fleetlora first."
                )
            return info_of(LineageInfo, row)

    # ---- rows -----------------------------------------------------------------------------

    def _insert(self, session: Session, version: NewVersion) -> ModelVersion:
        from fleetlora.common.delta import nbytes, serialize, sha256_hex

        self.check_lineage(session, version.lineage)
        blob = serialize(version.adapter)
        row = ModelVersion(
            **{
                name: getattr(version, name)
                for name in ("lineage", "round", "parent_id", "base_model_sha256")
            },
            adapter=b"",  # the sealed blob is bound to the row's id: written once the id is known
            adapter_sha256=sha256_hex(blob),
            adapter_bytes=nbytes(version.adapter),
            metrics=dict(version.metrics),
            participants=[
                Participant(node_id=str(n), num_examples=c) for n, c in version.participants.items()
            ],
        )
        session.add(row)
        session.flush()  # assigns row.id, which the sealed blob is bound to
        row.adapter = self.db.cipher.seal(blob, adapter_binding(row))
        reverted = REVERTED_TO in version.metrics
        audit.append(
            session,
            "version.reverted" if reverted else "version.created",
            f"v{row.id}",
            {
                "lineage": row.lineage,
                "round": row.round,
                "parent": row.parent_id,
                "adapter_sha256": row.adapter_sha256,
                "participants": len(version.participants),
                **(
                    {"reverted_to": version.metrics[REVERTED_TO], "reason": version.metrics[REVERT_REASON]}
                    if reverted
                    else {}
                ),
            },
        )
        if version.key_set_id is not None and version.key_score is not None:
            row.key_scores.append(VersionKeyScore(key_set_id=version.key_set_id, score=version.key_score))
        if version.hold is not None:
            row.hold = VersionHold(reason=version.hold[:REASON_CHARS])
            details = {"lineage": row.lineage, "round": row.round, "reason": row.hold.reason}
            audit.append(session, "version.held", f"v{row.id}", details)
        optimizer = version.optimizer
        if optimizer is not None and optimizer.state:
            state = serialize(optimizer.state)
            sealed = self.db.cipher.seal(state, optimizer_binding(row.id, optimizer.name))
            session.add(
                OptimizerState(
                    version_id=row.id, optimizer=optimizer.name, state=sealed, state_sha256=sha256_hex(state)
                )
            )
        session.flush()  # the hold's and the score's defaults, read back into the version's info
        return row

    def _row(self, session: Session, version_id: int) -> ModelVersion:
        """Version ``version_id`` if it is this tenant's; another tenant's is as absent as a missing one."""
        row = session.scalars(
            select(ModelVersion).where(ModelVersion.id == version_id, self.in_tenant(ModelVersion.lineage))
        ).first()
        if row is None:
            raise FleetloraError(f"No version v{version_id} in the database.")
        return row


def adapter_binding(row: ModelVersion) -> dict[str, object]:
    """What a sealed adapter is bound to (coordinator/at_rest.py): it opens in this row only."""
    return {"kind": "adapter", "version": row.id, "lineage": row.lineage, "round": row.round}


def optimizer_binding(version_id: int, optimizer: str) -> dict[str, object]:
    return {"kind": "optimizer-state", "version": version_id, "optimizer": optimizer}
