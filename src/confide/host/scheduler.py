"""Task states in the database: queue, atomic claim with a lease, completion, and recovery.

    created ─run─▶ queued ─claim─▶ running ─enclave replied─▶ succeeded | failed
       │             ▲  │             │
       │             │  └─cancel─┐    │
       └──cancel──▶ cancelled ◀──┘    │   (final: never queued or claimed again)
                     └── worker lost ─┘  (attempts ≤ MAX_ATTEMPTS, then failed "worker-lost")

A claim is one transaction: pick the oldest queued task (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
SQLite transactions hold the write lock) and ``UPDATE ... WHERE state = 'queued'``, so two workers
(or two servers) never run the same attempt. The claimant holds a lease it renews while the enclave
works; a task whose lease expired (its server was killed) is put back in the queue by whichever
server notices first. Every state change writes an audit event in the same transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from confide.enclave import manifest as mf
from confide.enclave.encoding import parse_json_object
from confide.enclave.errors import ConfideError
from confide.host import audit
from confide.host.blobstore import BlobStore
from confide.host.db import (
    Approval,
    Blob,
    Database,
    Dataset,
    Function,
    Task,
    TaskOutput,
    TaskRun,
    insert_ignore,
    now,
)

log = logging.getLogger("confide.host")

MAX_ATTEMPTS = 3
STATES = ("created", "queued", "running", "succeeded", "failed", "cancelled")
CANCELLABLE = ("created", "queued", "failed")
WORKER_LOST = "worker-lost"


class StateConflict(ConfideError):
    """The task is not in a state that allows the operation."""


@dataclass
class ClaimedTask:
    """What a worker needs for one attempt, read in the claiming transaction."""

    task_id: str
    run_id: int
    run_no: int
    attempt: int
    worker_id: str
    manifest: str
    approvals: list[dict[str, Any]]
    dataset_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> blob sha256
    datasets: dict[str, str] = field(default_factory=dict)  # input name -> dataset id
    outputs: tuple[str, ...] = ()
    function_source: dict[str, str] | None = None
    problem: str | None = None  # the platform cannot run it (missing dataset/function): why


@dataclass(frozen=True)
class StoredOutput:
    name: str
    sha256: str
    size: int  # plaintext bytes as reported by the enclave


class Scheduler:
    def __init__(self, db: Database, blobs: BlobStore, *, lease_seconds: float) -> None:
        self.db = db
        self.blobs = blobs
        self.lease_seconds = lease_seconds
        # called (from worker threads) after a task's final state is committed; long polls listen
        self._listeners: list[Callable[[], None]] = []
        self._listeners_lock = threading.Lock()

    def add_listener(self, callback: Callable[[], None]) -> None:
        with self._listeners_lock:
            self._listeners.append(callback)

    def notify_changed(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback()

    # ---- the API side ----------------------------------------------------------------------------
    def queue(self, session: Session, task: Task, *, actor: str) -> None:
        """created/failed -> queued (a new run: attempts start again)."""
        if task.state in ("queued", "running"):
            raise StateConflict(f"task is already {task.state}", where=f"task {task.task_id}")
        if task.state == "succeeded":
            raise StateConflict("task already succeeded", where=f"task {task.task_id}")
        if task.state == "cancelled":
            raise StateConflict("task was cancelled", where=f"task {task.task_id}")
        t = now()
        task.state = "queued"
        task.attempts = 0
        task.runs += 1
        task.category = None
        task.message = None
        task.queued_at = t
        task.updated_at = t
        audit.append(session, "task.queued", actor=actor, task_id=task.task_id, detail={"run": task.runs})

    def cancel(self, session: Session, task: Task, *, actor: str) -> str:
        """created/queued/failed -> cancelled, for good. The caller holds the task's row lock, and a
        claim only takes a task still 'queued' (`claim`'s UPDATE ... WHERE), so a cancelled task is
        never claimed after this commits. Returns the state it was in."""
        if task.state not in CANCELLABLE:
            raise StateConflict(
                f"task is {task.state}: only a task not yet running or done can be cancelled",
                where=f"task {task.task_id}",
            )
        before = task.state
        task.state = "cancelled"
        task.queued_at = None
        task.updated_at = now()
        audit.append(session, "task.cancelled", actor=actor, task_id=task.task_id, detail={"was": before})
        return before

    # ---- claiming ----------------------------------------------------------------------------------
    def claim(self, worker_id: str) -> ClaimedTask | None:
        for _ in range(8):  # another claimant may win the race for the oldest task: look again
            with self.db.transaction() as s:
                task_id = s.execute(
                    select(Task.task_id)
                    .where(Task.state == "queued")
                    .order_by(Task.queued_at, Task.task_id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).scalar()
                if task_id is None:
                    return None
                t = now()
                won = cast(
                    CursorResult[Any],
                    s.execute(
                        update(Task)
                        .where(Task.task_id == task_id, Task.state == "queued")
                        .values(
                            state="running",
                            attempts=Task.attempts + 1,
                            lease_owner=worker_id,
                            lease_expires=t + self.lease_seconds,
                            updated_at=t,
                        )
                        .execution_options(synchronize_session=False)
                    ),
                ).rowcount
                if won != 1:
                    continue
                task = s.execute(
                    select(Task).where(Task.task_id == task_id).execution_options(populate_existing=True)
                ).scalar_one()
                run = TaskRun(
                    task_id=task_id,
                    run_no=task.runs,
                    attempt=task.attempts,
                    worker=worker_id,
                    status="running",
                    started_at=t,
                )
                s.add(run)
                s.flush()
                audit.append(
                    s,
                    "task.running",
                    actor=worker_id,
                    task_id=task_id,
                    detail={"run": task.runs, "attempt": task.attempts, "worker": worker_id},
                )
                return self._load(s, task, run, worker_id)
        return None

    def _load(self, s: Session, task: Task, run: TaskRun, worker_id: str) -> ClaimedTask:
        claimed = ClaimedTask(
            task_id=task.task_id,
            run_id=run.id,
            run_no=run.run_no,
            attempt=run.attempt,
            worker_id=worker_id,
            manifest=task.manifest,
            approvals=[
                parse_json_object(a.approval, where=f"approval of {a.party}")
                for a in s.execute(
                    select(Approval).where(Approval.task_id == task.task_id).order_by(Approval.party)
                ).scalars()
            ],
        )
        try:
            manifest = mf.parse_manifest(task.manifest)
        except ConfideError as exc:  # stored by the API after the same check: only if edited in the DB
            claimed.problem = f"stored manifest does not parse: {exc}"
            return claimed
        claimed.outputs = tuple(o.name for o in manifest.outputs)
        for inp in manifest.inputs:
            ds = s.get(Dataset, inp.dataset_id)
            if ds is None or ds.owner != inp.owner:
                claimed.problem = (
                    f"input {inp.name!r}: dataset {inp.dataset_id} of {inp.owner} is not on this platform"
                )
                return claimed
            if not self.blobs.exists(ds.ciphertext_sha256):
                claimed.problem = (
                    f"input {inp.name!r}: the ciphertext of dataset {inp.dataset_id} "
                    f"(blob {ds.ciphertext_sha256}) is missing from the blob store"
                )
                return claimed
            claimed.dataset_keys[inp.name] = parse_json_object(
                ds.key_envelope, where=f"dataset {ds.dataset_id}"
            )
            claimed.inputs[inp.name] = ds.ciphertext_sha256
            claimed.datasets[inp.name] = ds.dataset_id
        if manifest.function.kind != "builtin":
            fn = s.get(Function, manifest.function_digest)
            if fn is None:
                claimed.problem = (
                    f"function {manifest.function.name!r} ({manifest.function_digest}) is not registered"
                )
                return claimed
            if fn.confidential:
                claimed.function_source = {"sealed": fn.sealed_source or ""}
            else:
                claimed.function_source = {"clear": fn.source or ""}
        return claimed

    # ---- outcomes -----------------------------------------------------------------------------------
    def _held(self, s: Session, claimed: ClaimedTask) -> tuple[Task, TaskRun] | None:
        task = s.execute(
            select(Task)
            .where(Task.task_id == claimed.task_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()
        run = s.get(TaskRun, claimed.run_id)
        if (
            task.state != "running"
            or task.lease_owner != claimed.worker_id
            or task.attempts != claimed.attempt
            or run is None
        ):
            log.warning(
                "task %s: attempt %d of %s lost its lease (now %s); result discarded",
                claimed.task_id,
                claimed.attempt,
                claimed.worker_id,
                task.state,
            )
            return None
        return task, run

    def finish(
        self,
        claimed: ClaimedTask,
        *,
        ok: bool,
        category: str,
        receipt: str | None,
        outputs: Sequence[StoredOutput],
        message: str | None = None,
    ) -> str | None:
        """Record the enclave's answer: outputs (already in the blob store), receipt and final state,
        in one transaction. Returns the new state, or None when the lease was lost meanwhile."""
        with self.db.transaction() as s:
            held = self._held(s, claimed)
            if held is None:
                return None
            task, run = held
            t = now()
            for out in outputs:
                insert_ignore(s, Blob, sha256=out.sha256, size=self.blobs.size(out.sha256), created_at=t)
                s.add(
                    TaskOutput(
                        run_id=run.id, task_id=task.task_id, name=out.name, sha256=out.sha256, size=out.size
                    )
                )
            state = "succeeded" if ok else "failed"
            run.status = "ok" if ok else "error"
            run.category = category
            run.receipt = receipt
            run.ended_at = t
            task.state = state
            task.category = None if ok else category
            task.message = message
            task.lease_owner = None
            task.lease_expires = None
            task.updated_at = t
            detail: dict[str, Any] = {
                "run": run.run_no,
                "attempt": run.attempt,
                "worker": claimed.worker_id,
                "category": category,
                "receipt": receipt is not None,
                "outputs": {o.name: o.sha256 for o in outputs},
            }
            if message:
                detail["message"] = message
            audit.append(s, f"task.{state}", actor=claimed.worker_id, task_id=task.task_id, detail=detail)
        self.notify_changed()
        return state

    def worker_lost(self, claimed: ClaimedTask, reason: str) -> str | None:
        """The enclave process died during the attempt: queue again, or fail after MAX_ATTEMPTS."""
        with self.db.transaction() as s:
            held = self._held(s, claimed)
            if held is None:
                return None
            task, run = held
            state = self._lose(s, task, run, reason=reason, actor=claimed.worker_id)
        self.notify_changed()
        return state

    def _lose(self, s: Session, task: Task, run: TaskRun | None, *, reason: str, actor: str) -> str:
        t = now()
        if run is not None:
            run.status = WORKER_LOST
            run.category = WORKER_LOST
            run.ended_at = t
        task.lease_owner = None
        task.lease_expires = None
        task.updated_at = t
        detail = {"run": task.runs, "attempt": task.attempts, "reason": reason}
        if task.attempts >= MAX_ATTEMPTS:
            task.state = "failed"
            task.category = WORKER_LOST
            task.message = f"gave up after {task.attempts} attempts: {reason}"
            audit.append(
                s,
                "task.failed",
                actor=actor,
                task_id=task.task_id,
                detail={**detail, "category": WORKER_LOST},
            )
            return "failed"
        task.state = "queued"
        task.queued_at = t
        audit.append(s, "task.requeued", actor=actor, task_id=task.task_id, detail=detail)
        return "queued"

    def renew(self, held: Mapping[str, str]) -> None:
        """Extend the leases of tasks this server's workers are running ({task id: worker id})."""
        if not held:
            return
        with self.db.transaction() as s:
            for task_id, worker_id in held.items():
                s.execute(
                    update(Task)
                    .where(Task.task_id == task_id, Task.state == "running", Task.lease_owner == worker_id)
                    .values(lease_expires=now() + self.lease_seconds)
                    .execution_options(synchronize_session=False)
                )

    def requeue_expired(self, *, actor: str) -> list[str]:
        """Tasks left running with an expired lease (their server or worker died): queue or fail."""
        changed: list[str] = []
        with self.db.transaction() as s:
            tasks = (
                s.execute(
                    select(Task)
                    .where(Task.state == "running", Task.lease_expires < now())
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            )
            for task in tasks:
                run = s.execute(
                    select(TaskRun).where(
                        TaskRun.task_id == task.task_id,
                        TaskRun.run_no == task.runs,
                        TaskRun.attempt == task.attempts,
                    )
                ).scalar()
                state = self._lose(
                    s,
                    task,
                    run,
                    reason=f"lease of {task.lease_owner} expired (server or worker stopped)",
                    actor=actor,
                )
                log.info("task %s: lease expired, now %s", task.task_id, state)
                changed.append(task.task_id)
        return changed
