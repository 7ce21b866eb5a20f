"""Fingerprints grow from 80 to 128 bits (8 groups of 4 hex digits, 39 characters): every column
holding one widens from 24 to 40 characters. Rows written with 80-bit fingerprints stay as they
are (parties register again under their new fingerprints).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (
    ("api_nonces", "party", False),
    ("parties", "fingerprint", False),
    ("workers", "service", True),
    ("blob_grants", "party", False),
    ("datasets", "owner", False),
    ("functions", "owner", False),
    ("functions", "registered_by", False),
    ("tasks", "creator", False),
    ("approvals", "party", False),
    ("task_participants", "party", False),
    ("task_rejections", "party", False),
)


def _resize(length_from: int, length_to: int) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        for table, column, nullable in COLUMNS:
            op.alter_column(
                table,
                column,
                existing_type=sa.String(length=length_from),
                type_=sa.String(length=length_to),
                existing_nullable=nullable,
            )
        return
    # SQLite ignores the length (the column's affinity stays TEXT, so the file format is unchanged);
    # only the declared type is rewritten, as SQLite documents for such changes (ALTER TABLE,
    # "other kinds of table schema changes"): recreating tables would trip the foreign keys.
    version = int(bind.exec_driver_sql("PRAGMA schema_version").scalar() or 0)
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    for table in sorted({t for t, _, _ in COLUMNS}):
        sql = bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)
        ).scalar()
        new = str(sql)
        for t, column, _ in COLUMNS:
            if t == table:
                new = new.replace(f"{column} VARCHAR({length_from})", f"{column} VARCHAR({length_to})")
        bind.exec_driver_sql("UPDATE sqlite_master SET sql=? WHERE type='table' AND name=?", (new, table))
    bind.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
    bind.exec_driver_sql("PRAGMA writable_schema = OFF")


def upgrade() -> None:
    _resize(24, 40)


def downgrade() -> None:
    _resize(40, 24)
