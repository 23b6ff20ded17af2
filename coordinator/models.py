"""SQL tables of the coordinator (SQLAlchemy 2 ORM).

``model_versions`` holds every global adapter with its lineage; ``version_participants`` which
devices contributed how many examples; ``rounds`` what happened in each round, failed ones
included; ``round_phases`` each round's phases while it runs; ``optimizer_states`` the server
optimizer's moments after each version; ``privacy_ledger`` each DP device's cumulative ε after each
round it trained; ``devices`` the enrolled devices' public signing keys; ``lineages`` each lineage's
model; ``update_packages`` the signed packages built; ``device_updates`` the version each device
last reported, its eligibility and capability, and its last decline; ``key_sets`` each tenant's
key-knowledge sets, ``version_key_scores`` each version's score on them and ``version_holds`` the
versions the retention gate held back (coordinator/retention.py).
Rows carry the schema version that wrote them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and read back timezone-aware (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class SchemaStamped:
    """Every row but a version's participants says which schema version wrote it (as models.py describes)."""

    schema_version: Mapped[int] = mapped_column(default=SCHEMA_VERSION)


class ModelVersion(SchemaStamped, Base):
    """One global adapter. Round 0 is the seeded initial adapter, with no parent."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("lineage", "round", name="uq_version_lineage_round"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    lineage: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int]
    base_model_sha256: Mapped[str] = mapped_column(String(64))
    # safetensors bytes; loaded only when read (listings and the console never pull them in)
    adapter: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    adapter_sha256: Mapped[str] = mapped_column(String(64))
    adapter_bytes: Mapped[int]
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    participants: Mapped[list[Participant]] = relationship(
        back_populates="version", cascade="all, delete-orphan", lazy="selectin"
    )
    key_scores: Mapped[list[VersionKeyScore]] = relationship(
        lazy="selectin", order_by="VersionKeyScore.scored_at"
    )
    hold: Mapped[VersionHold | None] = relationship(lazy="selectin")


class Participant(Base):
    """A device whose delta went into a version, weighted by its example count."""

    __tablename__ = "version_participants"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(20), primary_key=True)  # Flower ids are uint64
    num_examples: Mapped[int]

    version: Mapped[ModelVersion] = relationship(back_populates="participants")


class KeySet(SchemaStamped, Base):
    """A tenant's key-knowledge set: labelled examples every new version is scored on. The tenant's
    newest set is the pinned one; older ones stay, for the record and the scores made on them."""

    __tablename__ = "key_sets"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200))
    # canonical JSON [[text, label], ...]; operator data, sealed at rest when a key is set; loaded when read
    examples: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    examples_sha256: Mapped[str] = mapped_column(String(64))
    example_count: Mapped[int]
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)  # the distinct labels, sorted
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    added_by: Mapped[str] = mapped_column(String(200))


class VersionKeyScore(SchemaStamped, Base):
    """A version's key-knowledge score on one key set (higher is better; coordinator/retention.py)."""

    __tablename__ = "version_key_scores"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    key_set_id: Mapped[int] = mapped_column(ForeignKey("key_sets.id"), primary_key=True)
    score: Mapped[float]
    scored_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VersionHold(SchemaStamped, Base):
    """A version the retention gate held back: never packaged or distributed until an operator
    releases it (the release is written on this row; both are kept)."""

    __tablename__ = "version_holds"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    reason: Mapped[str] = mapped_column(String(500))
    held_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    release_reason: Mapped[str | None] = mapped_column(String(500))
    released_by: Mapped[str | None] = mapped_column(String(200))


class RoundRecord(SchemaStamped, Base):
    """The outcome of one round: completed (with its version) or failed (with the reason)."""

    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))  # "completed" | "failed"
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    sampled: Mapped[int]
    received: Mapped[int]
    dropped: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    upload_bytes: Mapped[int] = mapped_column(default=0)
    seconds: Mapped[float]
    error: Mapped[str | None] = mapped_column(String(500))
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RoundPhase(SchemaStamped, Base):
    """One phase of a round as it runs (sampling, training n/m answered, ... distributing k/m applied),
    written while the round goes on so an operator can follow it; the round's last row is ``completed``
    (detail: the version) or ``failed`` (detail: why)."""

    __tablename__ = "round_phases"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int]
    # Flower's run id, a 64-bit unsigned number (over SQLite's and PostgreSQL's signed range): as text
    run_id: Mapped[str | None] = mapped_column(String(20), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    done: Mapped[int] = mapped_column(default=0)
    total: Mapped[int | None]
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    detail: Mapped[str | None] = mapped_column(String(500))


class OptimizerState(SchemaStamped, Base):
    """The server optimizer's state after a version was made, so a restart continues it."""

    __tablename__ = "optimizer_states"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    optimizer: Mapped[str] = mapped_column(String(32))  # fedavgm, fedadam, ...
    state: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # safetensors bytes, loaded when read
    state_sha256: Mapped[str] = mapped_column(String(64))


class PrivacyEntry(SchemaStamped, Base):
    """A DP device's cumulative ε after a round, as it reported it: the privacy ledger.

    Written for every device that trained, whether or not its delta was used or the round reached
    quorum, because the device spent its budget either way.
    """

    __tablename__ = "privacy_ledger"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int]
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    epsilon: Mapped[float]
    delta: Mapped[float]
    noise_multiplier: Mapped[float]
    sample_rate: Mapped[float]
    steps: Mapped[int]
    records_retired: Mapped[int] = mapped_column(default=0, server_default="0")
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class EnrolledDevice(SchemaStamped, Base):
    """A device allowed to upload: its Ed25519 public key, which every sealed upload must verify against."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    public_key_pem: Mapped[str] = mapped_column(String(400))
    node_id: Mapped[str | None] = mapped_column(String(20))  # its SuperNode's Flower node id, once registered
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Lineage(SchemaStamped, Base):
    """A lineage's model: what a package manifest names, and the base size the package cap is taken of."""

    __tablename__ = "lineages"

    lineage: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[dict[str, Any]] = mapped_column(JSON)  # the ModelSpec as config entries
    base_model_sha256: Mapped[str] = mapped_column(String(64))
    base_model_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UpdatePackage(SchemaStamped, Base):
    """A signed update package, stored whole: the exact bytes devices receive."""

    __tablename__ = "update_packages"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(ForeignKey("lineages.lineage"), index=True)
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    sequence: Mapped[int]
    codec: Mapped[str] = mapped_column(String(32))
    package: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # loaded only when read
    package_bytes: Mapped[int]
    package_sha256: Mapped[str] = mapped_column(String(64))
    base_model_bytes: Mapped[int] = mapped_column(BigInteger)
    cap: Mapped[float]
    reconstruction_error: Mapped[float]
    build_seconds: Mapped[float]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeviceUpdate(SchemaStamped, Base):
    """The version a device last reported holding, how its last package offer went, whether it may train
    now and on what, and the last round it declined."""

    __tablename__ = "device_updates"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    node_id: Mapped[str] = mapped_column(String(20))
    version_id: Mapped[int | None]
    sequence: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16))  # "applied" | "current" | "rejected" | "failed"
    wants_train: Mapped[bool] = mapped_column(
        default=False
    )  # its new records drifted (client/corpus/drift.py)
    reason: Mapped[str | None] = mapped_column(String(500))
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Its gates as its last status reply said (a device from before contract 6 says nothing: eligible),
    # or not eligible since it declined a train message; and where it trains (client/accelerator.py).
    eligible: Mapped[bool] = mapped_column(default=True, server_default=true())
    eligibility_reason: Mapped[str | None] = mapped_column(String(500))  # why not, when not eligible
    accelerator: Mapped[str | None] = mapped_column(String(16))  # "cuda" | "mps" | "xpu" | "cpu"
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the memory its training may use
    declined_round: Mapped[int | None]  # the last round it declined to train in, and why
    declined_reason: Mapped[str | None] = mapped_column(String(500))


class DeviceFlag(SchemaStamped, Base):
    """An anomaly in one device's reply (a delta outside the round's bounds, an inflated count, a broken
    delta): the evidence a quarantine is decided on (coordinator/quarantine.py)."""

    __tablename__ = "device_flags"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    lineage: Mapped[str] = mapped_column(String(64))
    round: Mapped[int]
    reason: Mapped[str] = mapped_column(String(500))
    flagged_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class QuarantineEntry(SchemaStamped, Base):
    """A device kept out of sampling, from its quarantine until an operator releases it (both kept)."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    reason: Mapped[str] = mapped_column(String(500))
    quarantined_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    release_reason: Mapped[str | None] = mapped_column(String(500))
    flags_until: Mapped[int | None]  # the device's last flag id at the release: later ones count anew


class AuditEntry(Base):
    """One change to parameters or settings, chained to the one before by its hash (storage/audit.py).

    ``at`` and ``details`` are stored as the exact text that was hashed, so verification never depends
    on how a database round-trips a timestamp or a JSON document.
    """

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # 1, 2, 3, ... no gaps
    at: Mapped[str] = mapped_column(String(40))  # ISO 8601, UTC
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    previous_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The newest audit entry's number and hash, one row: appenders lock it, so entries never collide."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # always 1
    seq: Mapped[int]
    entry_hash: Mapped[str] = mapped_column(String(64))


class OperatorRow(SchemaStamped, Base):
    """Someone allowed to change parameters or settings: their public key and TOTP secret (operators.py)."""

    __tablename__ = "operators"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key_pem: Mapped[str] = mapped_column(String(400))
    totp_secret: Mapped[bytes] = mapped_column(LargeBinary)  # base32 text, sealed at rest when a key is set
    last_counter: Mapped[int] = mapped_column(default=0)  # the newest TOTP time step accepted: no replays
    failures: Mapped[int] = mapped_column(default=0)  # since failed_since
    failed_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
