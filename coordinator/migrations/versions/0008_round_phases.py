"""Round phases: what a running round is doing, so operators can follow it (issue 15).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fleetlora.coordinator.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "round_phases" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "round_phases",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("lineage", sa.String(64), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(20), nullable=True, index=True),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.String(500), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("round_phases")
