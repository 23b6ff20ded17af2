"""Key knowledge: tenants' key sets, each version's score on them, and the versions held back (issue 16).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fleetlora.coordinator.models import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted from before migrations got today's tables from create_all: nothing to add.
    if "key_sets" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "key_sets",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("examples", sa.LargeBinary(), nullable=False),
        sa.Column("examples_sha256", sa.String(64), nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("added_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(200), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )
    op.create_index("ix_key_sets_tenant", "key_sets", ["tenant"])
    op.create_table(
        "version_key_scores",
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), primary_key=True),
        sa.Column("key_set_id", sa.Integer(), sa.ForeignKey("key_sets.id"), primary_key=True),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("scored_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )
    op.create_table(
        "version_holds",
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), primary_key=True),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("held_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("released_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.String(500), nullable=True),
        sa.Column("released_by", sa.String(200), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("version_holds")
    op.drop_table("version_key_scores")
    op.drop_index("ix_key_sets_tenant", "key_sets")
    op.drop_table("key_sets")
