"""Initial schema: parties, blobs, datasets, functions, tasks and their runs, approvals, outputs,
the hash-chained audit log (with its head row), API nonces, workers and their evidence.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_nonces",
        sa.Column("party", sa.String(length=24), nullable=False),
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("party", "nonce", name=op.f("pk_api_nonces")),
    )
    op.create_index(op.f("ix_api_nonces_expires_at"), "api_nonces", ["expires_at"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("task_id", sa.String(length=32), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_sha256", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_actor"), "audit_events", ["actor"], unique=False)
    op.create_index(op.f("ix_audit_events_task_id"), "audit_events", ["task_id"], unique=False)

    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.bulk_insert(
        sa.table(
            "audit_head",
            sa.column("id", sa.Integer()),
            sa.column("seq", sa.BigInteger()),
            sa.column("sha256", sa.String()),
        ),
        [{"id": 1, "seq": 0, "sha256": "0" * 64}],  # genesis: the first event links to 64 zeros
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "evidence",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_evidence")),
    )
    op.create_table(
        "parties",
        sa.Column("fingerprint", sa.String(length=24), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("identity", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_parties")),
    )
    op.create_table(
        "platform_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_platform_meta")),
    )
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("server", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("measurement", sa.String(length=64), nullable=True),
        sa.Column("service", sa.String(length=24), nullable=True),
        sa.Column("evidence_sha256", sa.String(length=64), nullable=True),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("heartbeat", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_workers")),
    )
    op.create_table(
        "blob_grants",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("party", sa.String(length=24), nullable=False),
        sa.ForeignKeyConstraint(
            ["party"], ["parties.fingerprint"], name=op.f("fk_blob_grants_party_parties")
        ),
        sa.ForeignKeyConstraint(["sha256"], ["blobs.sha256"], name=op.f("fk_blob_grants_sha256_blobs")),
        sa.PrimaryKeyConstraint("sha256", "party", name=op.f("pk_blob_grants")),
    )
    op.create_table(
        "datasets",
        sa.Column("dataset_id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=24), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("schema_json", sa.Text(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("ciphertext_sha256", sa.String(length=64), nullable=False),
        sa.Column("key_envelope", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ciphertext_sha256"], ["blobs.sha256"], name=op.f("fk_datasets_ciphertext_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(["owner"], ["parties.fingerprint"], name=op.f("fk_datasets_owner_parties")),
        sa.PrimaryKeyConstraint("dataset_id", name=op.f("pk_datasets")),
    )
    op.create_index(op.f("ix_datasets_owner"), "datasets", ["owner"], unique=False)

    op.create_table(
        "functions",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=24), nullable=False),
        sa.Column("registered_by", sa.String(length=24), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("descriptor", sa.Text(), nullable=False),
        sa.Column("confidential", sa.Boolean(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("sealed_source", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["registered_by"], ["parties.fingerprint"], name=op.f("fk_functions_registered_by_parties")
        ),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_functions")),
    )
    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("creator", sa.String(length=24), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("function_digest", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires", sa.Float(), nullable=True),
        sa.Column("queued_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["creator"], ["parties.fingerprint"], name=op.f("fk_tasks_creator_parties")),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_tasks")),
    )
    op.create_index("ix_tasks_state_queued_at", "tasks", ["state", "queued_at"], unique=False)

    op.create_table(
        "approvals",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("party", sa.String(length=24), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("approval", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.task_id"], name=op.f("fk_approvals_task_id_tasks")),
        sa.PrimaryKeyConstraint("task_id", "party", name=op.f("pk_approvals")),
    )
    op.create_table(
        "task_inputs",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.task_id"], name=op.f("fk_task_inputs_task_id_tasks")),
        sa.PrimaryKeyConstraint("task_id", "name", name=op.f("pk_task_inputs")),
    )
    op.create_index(op.f("ix_task_inputs_dataset_id"), "task_inputs", ["dataset_id"], unique=False)

    op.create_table(
        "task_participants",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("party", sa.String(length=24), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.task_id"], name=op.f("fk_task_participants_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("task_id", "party", name=op.f("pk_task_participants")),
    )
    op.create_index(op.f("ix_task_participants_party"), "task_participants", ["party"], unique=False)

    op.create_table(
        "task_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("run_no", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=True),
        sa.Column("receipt", sa.Text(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.task_id"], name=op.f("fk_task_runs_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_runs")),
        sa.UniqueConstraint("task_id", "run_no", "attempt", name=op.f("uq_task_runs_task_id_run_no_attempt")),
    )
    op.create_index(op.f("ix_task_runs_task_id"), "task_runs", ["task_id"], unique=False)

    op.create_table(
        "task_outputs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["task_runs.id"], name=op.f("fk_task_outputs_run_id_task_runs")),
        sa.ForeignKeyConstraint(["sha256"], ["blobs.sha256"], name=op.f("fk_task_outputs_sha256_blobs")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.task_id"], name=op.f("fk_task_outputs_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_outputs")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_task_outputs_run_id_name")),
    )
    op.create_index(op.f("ix_task_outputs_sha256"), "task_outputs", ["sha256"], unique=False)
    op.create_index(op.f("ix_task_outputs_task_id"), "task_outputs", ["task_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_task_outputs_task_id"), table_name="task_outputs")
    op.drop_index(op.f("ix_task_outputs_sha256"), table_name="task_outputs")

    op.drop_table("task_outputs")
    op.drop_index(op.f("ix_task_runs_task_id"), table_name="task_runs")

    op.drop_table("task_runs")
    op.drop_index(op.f("ix_task_participants_party"), table_name="task_participants")

    op.drop_table("task_participants")
    op.drop_index(op.f("ix_task_inputs_dataset_id"), table_name="task_inputs")

    op.drop_table("task_inputs")
    op.drop_table("approvals")
    op.drop_index("ix_tasks_state_queued_at", table_name="tasks")

    op.drop_table("tasks")
    op.drop_table("functions")
    op.drop_index(op.f("ix_datasets_owner"), table_name="datasets")

    op.drop_table("datasets")
    op.drop_table("blob_grants")
    op.drop_table("workers")
    op.drop_table("platform_meta")
    op.drop_table("parties")
    op.drop_table("evidence")
    op.drop_table("blobs")
    op.drop_table("audit_head")
    op.drop_index(op.f("ix_audit_events_task_id"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_actor"), table_name="audit_events")

    op.drop_table("audit_events")
    op.drop_index(op.f("ix_api_nonces_expires_at"), table_name="api_nonces")

    op.drop_table("api_nonces")
