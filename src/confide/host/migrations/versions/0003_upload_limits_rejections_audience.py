"""Security hardening: the platform id (the audience signed requests name), an index for per-party
storage quotas, and task rejections.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # one random id per platform (per database: servers sharing it are one platform)
    op.bulk_insert(
        sa.table("platform_meta", sa.column("key", sa.String()), sa.column("value", sa.Text())),
        [{"key": "platform_id", "value": os.urandom(16).hex()}],
    )
    op.create_index(op.f("ix_blob_grants_party"), "blob_grants", ["party"], unique=False)
    op.create_table(
        "task_rejections",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("party", sa.String(length=24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.task_id"], name=op.f("fk_task_rejections_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("task_id", "party", name=op.f("pk_task_rejections")),
    )


def downgrade() -> None:
    op.drop_table("task_rejections")
    op.drop_index(op.f("ix_blob_grants_party"), table_name="blob_grants")
    op.execute("DELETE FROM platform_meta WHERE key = 'platform_id'")
