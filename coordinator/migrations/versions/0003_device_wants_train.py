"""Devices report whether their new records drifted from what they last trained on (issue 6).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "wants_train" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("device_updates")}:
        return
    with op.batch_alter_table("device_updates") as batch:
        batch.add_column(sa.Column("wants_train", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("device_updates") as batch:
        batch.drop_column("wants_train")
