"""Devices report whether their gates let them train, and on what; a decline is kept (issue 17).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = (
    "eligible",
    "eligibility_reason",
    "accelerator",
    "memory_bytes",
    "declined_round",
    "declined_reason",
)


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "eligible" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("device_updates")}:
        return
    with op.batch_alter_table("device_updates") as batch:
        # Every device reported so far came before contract 6, which says nothing: eligible.
        batch.add_column(sa.Column("eligible", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("eligibility_reason", sa.String(500), nullable=True))
        batch.add_column(sa.Column("accelerator", sa.String(16), nullable=True))
        batch.add_column(sa.Column("memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("declined_round", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("declined_reason", sa.String(500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_updates") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
