"""Enrolled devices remember their SuperNode's Flower node id (deployment: `devices enroll --auth-key`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "node_id" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("devices")}:
        return
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("node_id", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("node_id")
