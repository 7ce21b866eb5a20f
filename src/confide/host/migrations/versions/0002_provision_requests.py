"""Provisioning requests: a worker without the service key asks, through the database, a provisioned
worker of another server process for it (offer and evidence in, grant and the granter's evidence out).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provision_requests",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("server", sa.String(length=128), nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("offer", sa.Text(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.Column("grant", sa.Text(), nullable=True),
        sa.Column("grant_evidence", sa.Text(), nullable=True),
        sa.Column("granted_by", sa.String(length=128), nullable=True),
        sa.Column("granted_at", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provision_requests")),
    )
    op.create_index(
        "ix_provision_requests_state_expires", "provision_requests", ["state", "expires"], unique=False
    )
    op.create_index(
        op.f("ix_provision_requests_worker_id"), "provision_requests", ["worker_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_provision_requests_worker_id"), table_name="provision_requests")
    op.drop_index("ix_provision_requests_state_expires", table_name="provision_requests")
    op.drop_table("provision_requests")
