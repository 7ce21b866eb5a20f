"""The platform's database: SQLAlchemy 2.0 models and the engine factory.

SQLite (one file, WAL, foreign keys on, busy timeout, every transaction ``BEGIN IMMEDIATE`` so
concurrent writers queue instead of failing on a stale snapshot) is the default; PostgreSQL is used
when the URL says so. The schema is created and upgraded by Alembic (``migrate``); the models here
and ``migrations/versions`` describe the same tables (a test compares them).

Nothing in this database is trusted by the parties: it holds public keys, ciphertext digests,
signed manifests, approvals and receipts, all of which clients and the enclave check themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from confide.enclave.errors import ConfideError

FP = 40  # fingerprint: 8 groups of 4 hex digits (128 bits; migration 0004)
SHA = 64
ID = 32
SQLITE_BUSY_TIMEOUT_MS = 30_000

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Party(Base):
    __tablename__ = "parties"
    fingerprint: Mapped[str] = mapped_column(String(FP), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    identity: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Blob(Base):
    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(SHA), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class BlobGrant(Base):
    """Parties that uploaded a blob (content-addressed: several may upload the same bytes). The sum of
    the sizes of a party's grants is what its storage quota counts."""

    __tablename__ = "blob_grants"
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), primary_key=True)
    party: Mapped[str] = mapped_column(ForeignKey("parties.fingerprint"), primary_key=True, index=True)


class Dataset(Base):
    __tablename__ = "datasets"
    dataset_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("parties.fingerprint"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    schema_json: Mapped[str] = mapped_column(Text)
    rows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ciphertext_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    key_envelope: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Function(Base):
    __tablename__ = "functions"
    digest: Mapped[str] = mapped_column(String(SHA), primary_key=True)
    owner: Mapped[str] = mapped_column(String(FP))
    registered_by: Mapped[str] = mapped_column(ForeignKey("parties.fingerprint"))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(256))
    descriptor: Mapped[str] = mapped_column(Text)
    confidential: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    sealed_source: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_state_queued_at", "state", "queued_at"),)
    task_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    creator: Mapped[str] = mapped_column(ForeignKey("parties.fingerprint"))
    manifest: Mapped[str] = mapped_column(Text)  # canonical JSON, exactly as the creator built it
    manifest_sha256: Mapped[str] = mapped_column(String(SHA))
    function_digest: Mapped[str] = mapped_column(String(SHA))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)  # attempts of the current run (reset when queued)
    runs: Mapped[int] = mapped_column(Integer)  # how many times the task was queued
    category: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    queued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class TaskParticipant(Base):
    __tablename__ = "task_participants"
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), primary_key=True)
    party: Mapped[str] = mapped_column(String(FP), primary_key=True, index=True)


class TaskInput(Base):
    __tablename__ = "task_inputs"
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(ID), index=True)


class Approval(Base):
    __tablename__ = "approvals"
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), primary_key=True)
    party: Mapped[str] = mapped_column(String(FP), primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(String(SHA))
    approval: Mapped[str] = mapped_column(Text)  # canonical JSON of the signed approval
    created_at: Mapped[float] = mapped_column(Float)


class TaskRejection(Base):
    """A participant refused a task it was named in: the task cannot run, and the party's approval
    (if it gave one) no longer counts, for the platform's own checks (blob access, queueing)."""

    __tablename__ = "task_rejections"
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), primary_key=True)
    party: Mapped[str] = mapped_column(String(FP), primary_key=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class TaskRun(Base):
    """One attempt at running a task on a worker, with the enclave's receipt when it replied."""

    __tablename__ = "task_runs"
    __table_args__ = (UniqueConstraint("task_id", "run_no", "attempt"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), index=True)
    run_no: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # running | ok | error | worker-lost
    category: Mapped[str | None] = mapped_column(String(64), nullable=True)
    receipt: Mapped[str | None] = mapped_column(Text, nullable=True)  # base64, signed by the service
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class TaskOutput(Base):
    __tablename__ = "task_outputs"
    __table_args__ = (UniqueConstraint("run_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("task_runs.id"))
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)  # plaintext bytes, as the enclave reports


class AuditEvent(Base):
    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[float] = mapped_column(Float)
    task_id: Mapped[str | None] = mapped_column(String(ID), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_sha256: Mapped[str] = mapped_column(String(SHA))
    sha256: Mapped[str] = mapped_column(String(SHA))


class AuditHead(Base):
    """One row: the latest event. Appending locks it, so the chain stays linear across writers."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(SHA))


class ApiNonce(Base):
    __tablename__ = "api_nonces"
    party: Mapped[str] = mapped_column(String(FP), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Worker(Base):
    __tablename__ = "workers"
    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    server: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16))  # starting | provisioning | ready | busy | dead
    measurement: Mapped[str | None] = mapped_column(String(SHA), nullable=True)
    service: Mapped[str | None] = mapped_column(String(FP), nullable=True)
    evidence_sha256: Mapped[str | None] = mapped_column(String(SHA), nullable=True)
    restarts: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    heartbeat: Mapped[float] = mapped_column(Float)


class Evidence(Base):
    """Workers' boot evidence, named by digest in receipts."""

    __tablename__ = "evidence"
    sha256: Mapped[str] = mapped_column(String(SHA), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(128))
    evidence: Mapped[str] = mapped_column(Text)  # base64
    created_at: Mapped[float] = mapped_column(Float)


PLATFORM_ID_KEY = "platform_id"


class Meta(Base):
    """Platform facts: the service's public line once a worker created it, which worker claimed
    the right to create it (see `provisioning`), and the platform id (``PLATFORM_ID_KEY``: random,
    created by migration 0003; the audience that every signed request names)."""

    __tablename__ = "platform_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ProvisionRequest(Base):
    """A worker without the service key asking a provisioned worker of another server for it, relayed
    through the database (see `provisioning`). Only public keys, evidence and a grant that only the
    offering enclave can open pass through here.

    ``state``: open (posted) | claimed (a granter's enclave is answering) | granted | refused."""

    __tablename__ = "provision_requests"
    __table_args__ = (Index("ix_provision_requests_state_expires", "state", "expires"),)
    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    server: Mapped[str] = mapped_column(String(128))  # the requesting server
    worker_id: Mapped[str] = mapped_column(String(128), index=True)  # the requesting worker
    offer: Mapped[str] = mapped_column(Text)  # the offer's public line (provision_offer)
    evidence: Mapped[str] = mapped_column(Text)  # base64 evidence binding the offer
    created_at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    expires: Mapped[float] = mapped_column(Float)
    grant: Mapped[str | None] = mapped_column(Text, nullable=True)  # base64 HPKE to the offer
    grant_evidence: Mapped[str | None] = mapped_column(Text, nullable=True)  # the granter's, base64
    granted_by: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the granting worker
    granted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)  # why the granter's enclave refused


# ---- engines -------------------------------------------------------------------------------------------


def normalise_url(url: str) -> URL:
    """Accept ``sqlite:///path``, ``postgresql://`` (psycopg 3 is used) and ``postgresql+psycopg://``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfideError(f"not a database URL: {url!r}", where="--db") from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise ConfideError("SQLite needs a file (the server's threads share it)", where="--db")
        return parsed
    raise ConfideError(
        f"unsupported database {parsed.drivername!r}: use sqlite:///FILE or postgresql://...", where="--db"
    )


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=8,
            max_overflow=16,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin_read if read_only else _sqlite_begin)
        return engine
    return create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=16)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin_read(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")  # deferred: a WAL snapshot that never waits for the writer


def _sqlite_begin(conn: Any) -> None:
    # take the write lock up front: a deferred transaction that reads and then writes fails with
    # SQLITE_BUSY_SNAPSHOT (not retried by the busy timeout) when another writer got in between
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """An engine plus its session factory. ``with db.transaction() as s:`` commits or rolls back."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        sqlite = self.engine.dialect.name == "sqlite"
        # SQLite has one writer at a time: queue this process's writers on a lock (fair and fast)
        # instead of in SQLite's busy handler (which sleeps), and let readers use WAL snapshots.
        self._write_lock: threading.Lock | None = threading.Lock() if sqlite else None
        self.read_engine = make_engine(url, read_only=True) if sqlite else self.engine
        self.read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write transaction (on SQLite it holds the write lock from its first statement)."""
        if self._write_lock is None:
            with self.sessions.begin() as session:
                yield session
            return
        with self._write_lock, self.sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: a consistent snapshot that does not wait for writers."""
        with self.read_sessions() as session:
            try:
                yield session
            finally:
                session.rollback()  # nothing to commit; a read path never writes by accident

    def migrate(self) -> None:
        from confide.host.migrations import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


def now() -> float:
    return round(time.time(), 3)


def insert_ignore(session: Session, model: type[Base], **values: Any) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING (content-addressed rows may be added by two writers at once);
    returns whether a row was added. (RETURNING says so on both dialects: the rowcount of an ORM
    session's INSERT is -1 on PostgreSQL whether or not a row was added.)"""
    stmt: Any
    if session.get_bind().dialect.name == "postgresql":
        stmt = pg_insert(model).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite_insert(model).values(**values).on_conflict_do_nothing()
    key = inspect(model).primary_key
    return session.execute(stmt.returning(*key)).first() is not None
