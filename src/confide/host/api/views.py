"""Authorization (who may see what) and the JSON shapes of the objects the API returns."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from confide.enclave.encoding import parse_json_object
from confide.host.api.errors import not_found
from confide.host.db import (
    Approval,
    Blob,
    BlobGrant,
    Dataset,
    Function,
    Task,
    TaskInput,
    TaskOutput,
    TaskParticipant,
    TaskRejection,
    TaskRun,
)

# ---- authorization and JSON shapes ----------------------------------------------------------------------


def participant(me: str) -> Any:
    return select(TaskParticipant.task_id).where(TaskParticipant.party == me)


def dataset_visible(me: str) -> Any:
    used = select(TaskInput.dataset_id).where(TaskInput.task_id.in_(participant(me)))
    return or_(Dataset.owner == me, Dataset.dataset_id.in_(used))


def task_for(s: Session, task_id: str, me: str, *, lock: bool = False) -> Task:
    stmt = (
        select(Task)
        .join(TaskParticipant, TaskParticipant.task_id == Task.task_id)
        .where(Task.task_id == task_id, TaskParticipant.party == me)
    )
    if lock:
        stmt = stmt.with_for_update(of=Task)
    task = s.execute(stmt).scalar()
    if task is None:
        raise not_found(f"task {task_id}")
    return task


def can_read_blob(s: Session, sha256: str, me: str) -> bool:
    """Its uploader; the owner of a dataset on it; a participant of a task that reads such a dataset
    *and that the dataset's owner approved* (that very manifest; a rejection withdraws the approval);
    a participant of a task that wrote it. Naming someone's dataset in a task grants nothing."""
    if s.get(BlobGrant, (sha256, me)) is not None:
        return True
    owned = select(Dataset.dataset_id).where(Dataset.ciphertext_sha256 == sha256, Dataset.owner == me)
    if s.execute(owned.limit(1)).first() is not None:
        return True
    approved = (
        select(TaskInput.task_id)
        .join(Dataset, Dataset.dataset_id == TaskInput.dataset_id)
        .join(
            TaskParticipant, and_(TaskParticipant.task_id == TaskInput.task_id, TaskParticipant.party == me)
        )
        .join(Task, Task.task_id == TaskInput.task_id)
        .join(
            Approval,
            and_(
                Approval.task_id == TaskInput.task_id,
                Approval.party == Dataset.owner,
                Approval.manifest_sha256 == Task.manifest_sha256,
            ),
        )
        .where(Dataset.ciphertext_sha256 == sha256)
    )
    if s.execute(approved.limit(1)).first() is not None:
        return True
    outputs = select(TaskOutput.id).where(
        TaskOutput.sha256 == sha256, TaskOutput.task_id.in_(participant(me))
    )
    return s.execute(outputs.limit(1)).first() is not None


def dataset_json(s: Session, row: Dataset, me: str) -> dict[str, Any]:
    """The ciphertext's size only to those who may read the ciphertext (`can_read_blob`)."""
    readable = row.owner == me or can_read_blob(s, row.ciphertext_sha256, me)
    blob = s.get(Blob, row.ciphertext_sha256) if readable else None
    out: dict[str, Any] = {
        "dataset_id": row.dataset_id,
        "name": row.name,
        "owner": row.owner,
        "schema": parse_json_object(row.schema_json, where=f"dataset {row.dataset_id}"),
        "rows": row.rows,
        "ciphertext_sha256": row.ciphertext_sha256,
        "size": blob.size if blob is not None else None,
        "created_at": row.created_at,
    }
    if row.owner == me:
        out["key_envelope"] = parse_json_object(row.key_envelope, where=f"dataset {row.dataset_id}")
    return out


def function_json(row: Function) -> dict[str, Any]:
    out: dict[str, Any] = {
        "digest": row.digest,
        "descriptor": parse_json_object(row.descriptor, where=f"function {row.digest}"),
        "confidential": row.confidential,
        "kind": row.kind,
        "owner": row.owner,
        "created_at": row.created_at,
    }
    if not row.confidential:
        out["source"] = row.source
    return out


def task_summary(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "creator": task.creator,
        "manifest_sha256": task.manifest_sha256,
        "function_digest": task.function_digest,
        "state": task.state,
        "attempts": task.attempts,
        "runs": task.runs,
        "category": task.category,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "lease_owner": task.lease_owner,  # while running: the worker holding the task, and until when
        "lease_expires": task.lease_expires,
    }


def task_json(s: Session, task: Task) -> dict[str, Any]:
    approvals = s.execute(
        select(Approval).where(Approval.task_id == task.task_id).order_by(Approval.party)
    ).scalars()
    runs = list(
        s.execute(select(TaskRun).where(TaskRun.task_id == task.task_id).order_by(TaskRun.id)).scalars()
    )
    last = next((r for r in reversed(runs) if r.receipt is not None), None)
    outputs: list[dict[str, Any]] = []
    if last is not None:
        outputs = [
            {"name": o.name, "sha256": o.sha256, "size": o.size}
            for o in s.execute(
                select(TaskOutput).where(TaskOutput.run_id == last.id).order_by(TaskOutput.name)
            ).scalars()
        ]
    return {
        **task_summary(task),
        "manifest": parse_json_object(task.manifest, where=f"task {task.task_id}"),
        "message": task.message,
        "approvals": [parse_json_object(a.approval, where=f"approval by {a.party}") for a in approvals],
        "rejections": [
            {"party": r.party, "reason": r.reason, "created_at": r.created_at}
            for r in s.execute(
                select(TaskRejection)
                .where(TaskRejection.task_id == task.task_id)
                .order_by(TaskRejection.party)
            ).scalars()
        ],
        "receipt": last.receipt if last is not None else None,
        "outputs": outputs,
        "history": [
            {
                "run": r.run_no,
                "attempt": r.attempt,
                "worker": r.worker,
                "status": r.status,
                "category": r.category,
                "receipt": r.receipt,
                "started_at": r.started_at,
                "ended_at": r.ended_at,
            }
            for r in runs
        ],
    }
