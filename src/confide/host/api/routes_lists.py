"""Routes for the everyday verbs: list parties and functions, rename yourself, what waits for your
approval, cancel a task, withdraw an approval, delete a dataset.

What they can and cannot promise (the platform is untrusted):

* cancel: the platform stops queueing and claiming the task. An honest platform never runs it
  after; a hostile one still holds every signed approval and could run it anyway. What the enclave
  enforces is an approval's absence: data owners who want that guarantee withdraw their approval.
* withdraw: the approval row is deleted, so the enclave, which checks for every required approval
  itself, refuses the task if it runs after. It cannot undo a run that already happened, and a
  hostile platform could have kept a copy of the signed approval and present it later.
* dataset delete: the dataset's row (with its key envelope) and its ciphertext go from this
  platform's database and blob store. Outputs of tasks that already read it are not recalled, and a
  hostile platform could keep copies of the ciphertext and envelope (the envelope opens only inside
  the attested service, and only for a task the owner approved, so a copy lets it re-run at most
  the tasks the owner already signed for).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from pydantic import Field, field_validator
from sqlalchemy import delete, or_, select

from confide.client import api_auth
from confide.enclave import manifest as mf
from confide.enclave.encoding import parse_json_object
from confide.enclave.errors import ConfideError
from confide.enclave.task_fields import party_name
from confide.host import audit
from confide.host.api.bodies import Strict
from confide.host.api.common import FINGERPRINT, HEX32, log
from confide.host.api.errors import ApiError, not_found
from confide.host.api.security import Caller
from confide.host.api.state import Platform
from confide.host.api.views import participant, task_for, task_summary
from confide.host.db import (
    Approval,
    Blob,
    BlobGrant,
    Dataset,
    Function,
    Party,
    Task,
    TaskInput,
    TaskOutput,
)
from confide.host.scheduler import StateConflict

MAX_LIST = 10_000
PENDING_STATES = ("created", "queued", "failed")  # a task that may still run


class RenameBody(Strict):
    name: str = Field(min_length=1, max_length=api_auth.MAX_NAME_LEN)

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        try:
            api_auth.check_party_name(value)
            party_name(value, "name")  # what a manifest accepts: printable, no format characters
        except ConfideError as exc:
            raise ValueError(exc.message) from None
        return value


class CancelBody(Strict):
    pass


def _function_row(row: Function) -> dict[str, Any]:
    desc = parse_json_object(row.descriptor, where=f"function {row.digest}")
    return {
        "digest": row.digest,
        "name": row.name,
        "version": desc.get("version"),
        "description": desc.get("description"),
        "owner": row.owner,
        "kind": row.kind,
        "confidential": row.confidential,
        "created_at": row.created_at,
    }


def _builtin_rows() -> list[dict[str, Any]]:
    out = []
    for name in mf.BUILTINS:
        desc = mf.builtin_descriptor(name)
        out.append(
            {
                "digest": desc.digest,
                "name": name,
                "version": desc.version,
                "description": desc.description,
                "owner": None,
                "kind": "builtin",
                "confidential": False,
                "created_at": None,
            }
        )
    return out


def add_list_routes(app: FastAPI, platform: Platform) -> None:
    db = platform.db

    # ---- parties ---------------------------------------------------------------------------------
    @app.get("/v1/parties", tags=["parties"])
    def list_parties(
        me: Caller,
        name: Annotated[str | None, Query(min_length=1, max_length=api_auth.MAX_NAME_LEN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 1000,
    ) -> dict[str, Any]:
        """Registered parties (fingerprint, name): the directory every party needs to address
        outputs by name. Names are labels chosen by each party and not unique; fingerprints are."""
        with db.reading() as s:
            stmt = select(Party).order_by(Party.name, Party.fingerprint).limit(limit)
            if name is not None:
                stmt = stmt.where(Party.name == name)
            rows = s.execute(stmt).scalars()
            return {
                "parties": [
                    {"fingerprint": r.fingerprint, "name": r.name, "created_at": r.created_at} for r in rows
                ]
            }

    @app.patch("/v1/parties/{fingerprint}", tags=["parties"])
    def rename_party(
        fingerprint: Annotated[str, Path(pattern=FINGERPRINT)], body: RenameBody, me: Caller
    ) -> dict[str, Any]:
        """Change your own display name (a signed call; manifests already written keep the name
        they were written with, and pin your fingerprint either way)."""
        if fingerprint != me:
            raise ApiError(403, "forbidden", "a party can rename only itself", f"party {fingerprint}")
        with db.transaction() as s:
            row = s.get(Party, me)
            if row is None:  # authenticated, so registered: only if deleted meanwhile
                raise not_found(f"party {me}")
            before = row.name
            if before != body.name:
                row.name = body.name
                audit.append(s, "party.renamed", actor=me, detail={"from": before, "to": body.name})
        log.info("party %s renamed from %r to %r", me, before, body.name)
        return {"fingerprint": me, "name": body.name, "previous": before}

    # ---- functions -------------------------------------------------------------------------------
    @app.get("/v1/functions", tags=["functions"])
    def list_functions(me: Caller) -> dict[str, Any]:
        """The built-ins, the functions you own or registered, and those of tasks you take part in."""
        used = select(Task.function_digest).where(Task.task_id.in_(participant(me)))
        with db.reading() as s:
            rows = s.execute(
                select(Function)
                .where(or_(Function.owner == me, Function.registered_by == me, Function.digest.in_(used)))
                .order_by(Function.name, Function.created_at)
                .limit(MAX_LIST)
            ).scalars()
            return {"functions": [*_builtin_rows(), *(_function_row(r) for r in rows)]}

    # ---- datasets --------------------------------------------------------------------------------
    @app.delete("/v1/datasets/{dataset_id}", tags=["datasets"])
    def delete_dataset(dataset_id: Annotated[str, Path(pattern=HEX32)], me: Caller) -> dict[str, Any]:
        """The owner removes a dataset: its row and key envelope, and its ciphertext from the blob
        store (unless another object still refers to the same blob). Tasks that read it fail
        cleanly if run after; outputs of tasks that already ran are not recalled."""
        where = f"dataset {dataset_id}"
        with db.transaction() as s:
            row = s.get(Dataset, dataset_id)
            visible = row is not None and (
                row.owner == me
                or s.execute(
                    select(TaskInput.task_id)
                    .where(TaskInput.dataset_id == dataset_id, TaskInput.task_id.in_(participant(me)))
                    .limit(1)
                ).first()
                is not None
            )
            if row is None or not visible:
                raise not_found(where)
            if row.owner != me:
                raise ApiError(403, "forbidden", "only the dataset's owner can delete it", where)
            running = s.execute(
                select(Task.task_id)
                .join(TaskInput, TaskInput.task_id == Task.task_id)
                .where(TaskInput.dataset_id == dataset_id, Task.state == "running")
                .limit(1)
            ).scalar()
            if running is not None:
                raise ApiError(
                    409, "conflict", f"task {running} is reading it now: delete it after the task ends", where
                )
            sha = row.ciphertext_sha256
            s.delete(row)
            s.flush()
            still_used = (
                s.execute(select(Dataset.dataset_id).where(Dataset.ciphertext_sha256 == sha).limit(1)).first()
                is not None
                or s.execute(select(TaskOutput.id).where(TaskOutput.sha256 == sha).limit(1)).first()
                is not None
            )
            if not still_used:
                s.execute(delete(BlobGrant).where(BlobGrant.sha256 == sha))
                s.execute(delete(Blob).where(Blob.sha256 == sha))
            audit.append(
                s,
                "dataset.deleted",
                actor=me,
                detail={"dataset_id": dataset_id, "ciphertext_sha256": sha, "blob_removed": not still_used},
            )
        removed = False
        if not still_used:
            try:
                platform.blobs.path(sha).unlink(missing_ok=True)
                removed = True
            except OSError as exc:  # the row is gone (nobody can fetch it); the file stays behind
                log.error(
                    "dataset %s deleted, but its blob %s could not be removed: %s", dataset_id, sha, exc
                )
        return {"dataset_id": dataset_id, "deleted": True, "ciphertext_sha256": sha, "blob_removed": removed}

    # ---- tasks -----------------------------------------------------------------------------------
    @app.get("/v1/approvals/pending", tags=["tasks"])
    def pending_approvals(me: Caller) -> dict[str, Any]:
        """Tasks that still may run and need your approval, which you have not given."""
        approved = select(Approval.task_id).where(Approval.party == me)
        out: list[dict[str, Any]] = []
        with db.reading() as s:
            rows = s.execute(
                select(Task)
                .where(
                    Task.task_id.in_(participant(me)),
                    Task.state.in_(PENDING_STATES),
                    Task.task_id.not_in(approved),
                )
                .order_by(Task.created_at)
                .limit(MAX_LIST)
            ).scalars()
            for task in rows:
                try:
                    manifest = mf.parse_manifest(task.manifest)
                except ConfideError:  # stored after the same check: only if edited in the database
                    continue
                if me in manifest.required_approvals():
                    out.append({**task_summary(task), "function_name": manifest.function.name})
        return {"tasks": out}

    @app.post("/v1/tasks/{task_id}/cancel", tags=["tasks"])
    def cancel_task(
        task_id: Annotated[str, Path(pattern=HEX32)], me: Caller, body: CancelBody | None = None
    ) -> dict[str, Any]:
        """The creator cancels a task not yet running or done: it is never queued or claimed again.
        (A hostile platform could still run it with the approvals it holds: withdraw those to have
        the enclave refuse.)"""
        with db.transaction() as s:
            task = task_for(s, task_id, me, lock=True)
            if task.creator != me:
                raise ApiError(
                    403, "forbidden", "only the task's creator can cancel it (withdraw your approval)", "task"
                )
            try:
                was = platform.scheduler.cancel(s, task, actor=me)
            except StateConflict as exc:
                raise ApiError(409, "conflict", exc.message, exc.where) from None
        platform.scheduler.notify_changed()
        log.info("task %s: cancelled by %s (was %s)", task_id, me, was)
        return {"task_id": task_id, "state": "cancelled", "was": was}

    @app.delete("/v1/tasks/{task_id}/approvals", tags=["tasks"])
    def withdraw_approval(task_id: Annotated[str, Path(pattern=HEX32)], me: Caller) -> dict[str, Any]:
        """Delete your approval of a task that has not run (or failed and may run again): the
        enclave then refuses it for the missing approval. A run that already happened is not undone."""
        with db.transaction() as s:
            task = task_for(s, task_id, me, lock=True)
            if task.state == "running":
                raise ApiError(
                    409,
                    "conflict",
                    "task is running now (the enclave already holds your approval for this attempt): "
                    "withdraw after it ends",
                    f"task {task_id}",
                )
            if task.state == "succeeded":
                raise ApiError(
                    409, "conflict", "task already ran: a withdrawal cannot undo it", f"task {task_id}"
                )
            row = s.get(Approval, (task_id, me))
            if row is None:
                raise not_found(f"approval of task {task_id} by you")
            s.delete(row)
            audit.append(
                s,
                "task.approval-withdrawn",
                actor=me,
                task_id=task_id,
                detail={"manifest_sha256": row.manifest_sha256, "state": task.state},
            )
            state = task.state
        log.info("task %s: %s withdrew its approval (task %s)", task_id, me, state)
        return {"task_id": task_id, "withdrawn": True, "state": state}
