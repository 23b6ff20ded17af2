"""Operators: a key and a TOTP secret each, for commands that change parameters or settings (issue 14).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fleetlora.coordinator.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "operators" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "operators",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("public_key_pem", sa.String(400), nullable=False),
        sa.Column("totp_secret", sa.LargeBinary(), nullable=False),
        sa.Column("last_counter", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("failed_since", UTCDateTime(timezone=True), nullable=True),
        sa.Column("locked_until", UTCDateTime(timezone=True), nullable=True),
        sa.Column("added_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("operators")
