"""Initial schema: versions, rounds, optimizer states, privacy ledger, devices, lineages, packages.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 02:06:01.928343
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import fleetlora.coordinator.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_updates",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("reported_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("public_key_pem", sa.String(length=400), nullable=False),
        sa.Column("enrolled_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "lineages",
        sa.Column("lineage", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("model", sa.JSON(), nullable=False),
        sa.Column("base_model_sha256", sa.String(length=64), nullable=False),
        sa.Column("base_model_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("lineage"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("lineage", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("base_model_sha256", sa.String(length=64), nullable=False),
        sa.Column("adapter", sa.LargeBinary(), nullable=False),
        sa.Column("adapter_sha256", sa.String(length=64), nullable=False),
        sa.Column("adapter_bytes", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("lineage", "round", name="uq_version_lineage_round"),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_lineage"), ["lineage"], unique=False)

    op.create_table(
        "privacy_ledger",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("lineage", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("epsilon", sa.Double(), nullable=False),
        sa.Column("delta", sa.Double(), nullable=False),
        sa.Column("noise_multiplier", sa.Double(), nullable=False),
        sa.Column("sample_rate", sa.Double(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("recorded_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("privacy_ledger", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_privacy_ledger_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_privacy_ledger_lineage"), ["lineage"], unique=False)

    op.create_table(
        "optimizer_states",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("optimizer", sa.String(length=32), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("state_sha256", sa.String(length=64), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("version_id"),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("lineage", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.JSON(), nullable=False),
        sa.Column("upload_bytes", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("finished_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rounds_lineage"), ["lineage"], unique=False)

    op.create_table(
        "update_packages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("lineage", sa.String(length=64), nullable=False),
        sa.Column("from_version_id", sa.Integer(), nullable=True),
        sa.Column("to_version_id", sa.Integer(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("codec", sa.String(length=32), nullable=False),
        sa.Column("package", sa.LargeBinary(), nullable=False),
        sa.Column("package_bytes", sa.Integer(), nullable=False),
        sa.Column("package_sha256", sa.String(length=64), nullable=False),
        sa.Column("base_model_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cap", sa.Double(), nullable=False),
        sa.Column("reconstruction_error", sa.Double(), nullable=False),
        sa.Column("build_seconds", sa.Double(), nullable=False),
        sa.Column("created_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", fleetlora.coordinator.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["from_version_id"],
            ["model_versions.id"],
        ),
        sa.ForeignKeyConstraint(
            ["lineage"],
            ["lineages.lineage"],
        ),
        sa.ForeignKeyConstraint(
            ["to_version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("update_packages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_update_packages_lineage"), ["lineage"], unique=False)
        batch_op.create_index(batch_op.f("ix_update_packages_to_version_id"), ["to_version_id"], unique=False)

    op.create_table(
        "version_participants",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("version_id", "node_id"),
    )


def downgrade() -> None:
    op.drop_table("version_participants")
    with op.batch_alter_table("update_packages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_update_packages_to_version_id"))
        batch_op.drop_index(batch_op.f("ix_update_packages_lineage"))

    op.drop_table("update_packages")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rounds_lineage"))

    op.drop_table("rounds")
    op.drop_table("optimizer_states")
    with op.batch_alter_table("privacy_ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_privacy_ledger_lineage"))
        batch_op.drop_index(batch_op.f("ix_privacy_ledger_device_id"))

    op.drop_table("privacy_ledger")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_lineage"))

    op.drop_table("model_versions")
    op.drop_table("lineages")
    op.drop_table("devices")
    op.drop_table("device_updates")
