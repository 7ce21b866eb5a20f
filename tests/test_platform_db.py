"""The platform's storage on SQLite and PostgreSQL: migrations, the audit chain under concurrent
writers, atomic task claims and leases, API nonces, and the content-addressed blob store."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text, update

from confide.enclave.errors import ConfideError, IntegrityError
from confide.host import audit
from confide.host.blobstore import BlobStore, BlobTooLarge
from confide.host.db import AuditEvent, Base, Database, Party, Task, TaskRun, normalise_url, sqlite_url
from confide.host.scheduler import MAX_ATTEMPTS, Scheduler, StateConflict
from platform_support import PostgresCluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "confide.db")
    else:
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        url = cluster.create_database()
    database = Database(url)
    database.migrate()
    yield database
    database.dispose()


def test_url_forms() -> None:
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    for bad in ("mysql://u@h/db", "sqlite://", "sqlite:///:memory:", "not a url"):
        with pytest.raises(ConfideError):
            normalise_url(bad)


def test_migrations_match_the_models_and_are_idempotent(db: Database) -> None:
    db.migrate()  # a second start: nothing to do
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"
    if db.dialect == "sqlite":
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_audit_chain_stays_linear_with_concurrent_writers(db: Database) -> None:
    writers, per_writer = 4, 15
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(per_writer):
                with db.transaction() as s:
                    audit.append(s, "test.event", actor=f"writer-{n}", detail={"i": i})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with db.transaction() as s:
        assert audit.verify_log(s) == writers * per_writer
        assert audit.head(s)["seq"] == writers * per_writer


def test_tampering_with_an_event_is_detected(db: Database) -> None:
    with db.transaction() as s:
        for i in range(5):
            audit.append(s, "test.event", actor="w", detail={"i": i})
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(detail='{"i":99}'))
    with db.transaction() as s, pytest.raises(IntegrityError, match="event 3.*altered"):
        audit.verify_log(s)
    # recomputing the hash of the edited event breaks the link from the next one instead
    with db.transaction() as s:
        row = s.get(AuditEvent, 3)
        assert row is not None
        row.sha256 = audit.event_hash(audit.as_dict(row))
    with db.transaction() as s, pytest.raises(IntegrityError, match="event 4.*link"):
        audit.verify_log(s)
    # removing the last event: the head row no longer matches
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(detail='{"i":2}'))
        row = s.get(AuditEvent, 3)
        assert row is not None
        row.sha256 = audit.event_hash(audit.as_dict(row))
        s.delete(s.get(AuditEvent, 5))
    with db.transaction() as s, pytest.raises(IntegrityError, match="head names event 5"):
        audit.verify_log(s)


def _make_tasks(db: Database, n: int) -> None:
    with db.transaction() as s:
        s.add(Party(fingerprint="aaaa-aaaa-aaaa-aaaa-aaaa", name="a", identity="x", created_at=0))
        s.flush()
        for i in range(n):
            s.add(
                Task(
                    task_id=f"{i:032x}",
                    creator="aaaa-aaaa-aaaa-aaaa-aaaa",
                    manifest="{}",
                    manifest_sha256="0" * 64,
                    function_digest="0" * 64,
                    state="created",
                    attempts=0,
                    runs=0,
                    created_at=0,
                    updated_at=0,
                )
            )


def test_claims_are_atomic_across_concurrent_workers(db: Database, tmp_path: Path) -> None:
    sched = Scheduler(db, BlobStore(tmp_path / "blobs"), lease_seconds=60)
    n = 12
    _make_tasks(db, n)
    with db.transaction() as s:
        for task in s.execute(select(Task)).scalars():
            sched.queue(s, task, actor="test")
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        while (c := sched.claim(f"w{k}")) is not None:
            with lock:
                claimed.append(c.task_id)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(f"{i:032x}" for i in range(n))  # each exactly once
    with db.transaction() as s:
        assert {t.state for t in s.execute(select(Task)).scalars()} == {"running"}
        assert audit.verify_log(s) == 2 * n  # queued + running per task, one linear chain


def test_expired_leases_requeue_then_fail_after_max_attempts(db: Database, tmp_path: Path) -> None:
    sched = Scheduler(db, BlobStore(tmp_path / "blobs"), lease_seconds=-1)  # every lease already expired
    _make_tasks(db, 1)
    task_id = f"{0:032x}"
    with db.transaction() as s:
        task = s.get(Task, task_id)
        assert task is not None
        sched.queue(s, task, actor="test")
        with pytest.raises(StateConflict, match="already queued"):
            sched.queue(s, task, actor="test")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = sched.claim("w0")
        assert claimed is not None and claimed.attempt == attempt
        assert sched.requeue_expired(actor="test") == [task_id]
    with db.transaction() as s:
        task = s.get(Task, task_id)
        assert task is not None
        assert (task.state, task.category) == ("failed", "worker-lost")
        runs = s.execute(select(TaskRun).where(TaskRun.task_id == task_id)).scalars().all()
        assert [r.status for r in runs] == ["worker-lost"] * MAX_ATTEMPTS
        kinds = [e.kind for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]
    assert kinds == ["task.queued"] + ["task.running", "task.requeued"] * (MAX_ATTEMPTS - 1) + [
        "task.running",
        "task.failed",
    ]
    # a stale worker reporting afterwards changes nothing
    assert sched.worker_lost(claimed, "late") is None


def test_nonces_are_single_use_in_the_database(db: Database, tmp_path: Path) -> None:
    from confide.host.api import Platform

    blobs = BlobStore(tmp_path / "b")
    platform = Platform(db=db, blobs=blobs, scheduler=Scheduler(db, blobs, lease_seconds=60))
    assert platform.seen_nonce("aaaa-aaaa-aaaa-aaaa-aaaa", "0" * 32, 0) is False
    assert platform.seen_nonce("aaaa-aaaa-aaaa-aaaa-aaaa", "0" * 32, 0) is True
    assert platform.seen_nonce("bbbb-bbbb-bbbb-bbbb-bbbb", "0" * 32, 0) is False


# ---- the blob store ------------------------------------------------------------------------------------


def test_blob_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=1000)
    sha, size = store.put_bytes(b"hello")
    assert size == 5
    path = store.path(sha)
    assert path.relative_to(store.root).parts == ("sha256", sha[:2], sha[2:4], sha)
    assert path.read_bytes() == b"hello" and store.verify(sha)
    assert store.put_bytes(b"hello") == (sha, 5)  # same content, same place
    # a wrong expected digest publishes nothing
    with store.writer() as w:
        w.write(b"other")
        with pytest.raises(IntegrityError, match="expected"):
            w.commit("0" * 64)
    assert not list(store.tmp_dir.iterdir())
    # the cap is enforced while streaming; the partial file is removed
    with store.writer() as w, pytest.raises(BlobTooLarge):
        for _ in range(11):
            w.write(b"x" * 100)
    assert not list(store.tmp_dir.iterdir())
    # a file on disk that no longer matches its name is detected
    path.chmod(0o600)
    path.write_bytes(b"hellO")
    assert not store.verify(sha)
    with pytest.raises(ConfideError, match="64 lowercase hex"):
        store.path("../../etc/passwd")


def test_start_up_cleans_only_stale_uploads(tmp_path: Path) -> None:
    """A crash leaves a stale temporary file; another server's live upload on a shared store is kept."""
    store = BlobStore(tmp_path / "blobs")
    stale, live = store.tmp_dir / "upload-stale", store.tmp_dir / "upload-live"
    stale.write_bytes(b"cut short")
    live.write_bytes(b"still arriving")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert store.clean_temporary(older_than_s=600) == 1
    assert not stale.exists() and live.exists()


def test_import_file_checks_the_reported_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    src = tmp_path / "out"
    src.write_bytes(b"sealed output")
    with pytest.raises(IntegrityError, match="enclave reported"):
        store.import_file(src, expected_sha256="f" * 64)
    assert src.exists()
    sha, size = store.import_file(src, expected_sha256=None)
    assert store.path(sha).read_bytes() == b"sealed output" and size == 13 and not src.exists()
