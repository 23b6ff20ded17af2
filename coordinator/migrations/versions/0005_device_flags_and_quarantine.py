"""Anomaly flags per device and the quarantine that keeps a repeatedly flagged device out (issue 14).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fleetlora.coordinator.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "device_flags" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "device_flags",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("lineage", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("flagged_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )
    op.create_index("ix_device_flags_device_id", "device_flags", ["device_id"])
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("quarantined_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("released_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.String(500), nullable=True),
        sa.Column("flags_until", sa.Integer(), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )
    op.create_index("ix_quarantine_device_id", "quarantine", ["device_id"])


def downgrade() -> None:
    op.drop_table("quarantine")
    op.drop_table("device_flags")
