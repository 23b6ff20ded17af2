"""The privacy ledger counts each device's retired records (per-record budgets, issue 13).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "records_retired" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("privacy_ledger")}:
        return
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.add_column(sa.Column("records_retired", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.drop_column("records_retired")
