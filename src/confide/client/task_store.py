"""What a party's client remembers between runs, in its home directory (``$CONFIDE_HOME/client.db``,
SQLite: every write is one atomic transaction, and several CLI processes may use it at once).

- the digest of every manifest the party **created or approved**, per task: results and receipts
  of any other manifest are refused (the platform could otherwise store another manifest under
  the same task id, with an input of its own, and have the enclave sign a valid receipt for it);
- the **dataset references** uploaded from this home (``cds1:...``, see ``dataset_ref``), so a bare
  dataset id typed on this machine can still be pinned;
- the **receipts seen** per task, worker and run number: a second, different receipt for the same
  run of the same worker means the host rolled that worker's state back (or forged nothing but
  replayed a worker), and is refused.

The file holds digests and references, nothing secret; it is trusted as much as the home itself.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from confide.enclave.errors import ConfideError, IntegrityError

SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    party TEXT NOT NULL, task_id TEXT NOT NULL, manifest_sha256 TEXT NOT NULL, role TEXT NOT NULL,
    max_runs INTEGER, at REAL NOT NULL, PRIMARY KEY (party, task_id));
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id TEXT PRIMARY KEY, ref TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    party TEXT NOT NULL, task_id TEXT NOT NULL, worker TEXT NOT NULL, run INTEGER NOT NULL,
    receipt_sha256 TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (party, task_id, worker, run));
"""


@dataclass(frozen=True)
class ManifestRecord:
    task_id: str
    manifest_sha256: str
    role: str  # "created" or "approved"
    max_runs: int | None  # the limit this party approved (None: created, not yet approved)


class TaskStore:
    """One home's record, for every party using that home (rows are keyed by fingerprint)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None  # opened on first use, kept for the client's life
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                # WAL: readers never wait for a writer, and a commit costs one write, not several
                # fsyncs; a power cut can lose the newest record but never corrupt the file (a lost
                # manifest record makes the client refuse that task's results: it fails closed)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise ConfideError(
                    f"cannot open the client's task record ({exc})", where=str(self.path)
                ) from None
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise ConfideError(f"client's task record failed ({exc})", where=str(self.path)) from None
                raise

    # ---- manifests ----------------------------------------------------------------------------
    def manifest(self, party: str, task_id: str) -> ManifestRecord | None:
        with self._db() as db:
            row = db.execute(
                "SELECT manifest_sha256, role, max_runs FROM manifests WHERE party = ? AND task_id = ?",
                (party, task_id),
            ).fetchone()
        return None if row is None else ManifestRecord(task_id, row[0], row[1], row[2])

    def remember_manifest(
        self, party: str, task_id: str, digest: str, role: str, max_runs: int | None = None
    ) -> None:
        """Record that `party` created or approved manifest `digest` of `task_id`. A different
        manifest under a task id already recorded is refused, naming both digests."""
        with self._db() as db:
            row = db.execute(
                "SELECT manifest_sha256, role, max_runs FROM manifests WHERE party = ? AND task_id = ?",
                (party, task_id),
            ).fetchone()
            if row is not None and row[0] != digest:
                raise IntegrityError(
                    f"this party {row[1]} manifest {row[0]} of task {task_id}; the platform now shows "
                    f"manifest {digest} under the same task id",
                    where=f"task {task_id}",
                )
            if row is not None and role == "created":
                return
            db.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?)",
                (party, task_id, digest, role, max_runs, time.time()),
            )

    # ---- dataset references -------------------------------------------------------------------
    def remember_dataset(self, dataset_id: str, ref: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?)", (dataset_id, ref, time.time()))

    def dataset_ref(self, dataset_id: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT ref FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
        return None if row is None else str(row[0])

    # ---- receipts seen ------------------------------------------------------------------------
    def check_receipt(self, party: str, task_id: str, worker: str, run: int, receipt_sha256: str) -> None:
        """Remember receipt `receipt_sha256` as run `run` of `worker`; a different receipt already
        seen for that run of that worker is refused (the worker's run count was rolled back)."""
        with self._db() as db:
            row = db.execute(
                "SELECT receipt_sha256 FROM receipts WHERE party = ? AND task_id = ? AND worker = ? AND run = ?",
                (party, task_id, worker, run),
            ).fetchone()
            if row is not None and row[0] != receipt_sha256:
                raise IntegrityError(
                    f"two different receipts claim run {run} of worker {worker[:16]}…: receipt "
                    f"{row[0]} seen before, now {receipt_sha256} (the host rolled back the worker's "
                    "sealed run count, or replays it)",
                    where=f"receipt of task {task_id}",
                )
            if row is None:
                db.execute(
                    "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?)",
                    (party, task_id, worker, run, receipt_sha256, time.time()),
                )
