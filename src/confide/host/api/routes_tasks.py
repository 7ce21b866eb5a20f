"""Routes for tasks (create, approve, reject, run, long-polled state) and the audit log."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from confide.enclave import manifest as mf
from confide.enclave.encoding import canonical_json, parse_json_object
from confide.enclave.errors import ConfideError
from confide.enclave.keys import PublicIdentity
from confide.host import audit
from confide.host.api.bodies import ApprovalBody, RejectBody, RunBody, TaskBody
from confide.host.api.common import HEX32, LONG_POLL_SLICE_S, MAX_INT64, MAX_LONG_POLL_S, log
from confide.host.api.errors import ApiError, from_confide
from confide.host.api.security import Caller
from confide.host.api.state import Platform
from confide.host.api.views import task_for, task_json, task_summary
from confide.host.db import (
    Approval,
    AuditEvent,
    Dataset,
    Function,
    Task,
    TaskInput,
    TaskParticipant,
    TaskRejection,
    now,
)
from confide.host.scheduler import StateConflict

# ---- the app -------------------------------------------------------------------------------------------


class LongPoll:
    """Wakes waiting long polls (on the event loop) when a worker thread commits a task's outcome."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: set[asyncio.Future[None]] = set()

    async def wait(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = self.loop.create_future()
        self.waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self.waiters.discard(fut)

    def notify_threadsafe(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_result(None)


def add_task_routes(app: FastAPI, platform: Platform) -> None:
    db = platform.db
    long_poll = LongPoll()
    platform.scheduler.add_listener(long_poll.notify_threadsafe)

    # ---- tasks -----------------------------------------------------------------------------------
    def store_approval(s: Session, task_id: str, me: str, approval: mf.Approval) -> None:
        row = s.get(Approval, (task_id, me))
        if row is None:
            row = Approval(task_id=task_id, party=me, manifest_sha256="", approval="", created_at=0.0)
            s.add(row)
        row.manifest_sha256 = approval.manifest_sha256
        row.approval = canonical_json(approval.to_json()).decode()
        row.created_at = now()
        audit.append(
            s,
            "task.approved",
            actor=me,
            task_id=task_id,
            detail={"manifest_sha256": approval.manifest_sha256},
        )

    def checked_approval(raw: dict[str, Any], manifest: mf.Manifest, me: str) -> mf.Approval:
        """A party's approval of `manifest` (signature checked as a courtesy: the enclave checks again)."""
        try:
            approval = mf.parse_approval(raw)
            if approval.party != me:
                raise ApiError(
                    403, "forbidden", f"approval is by {approval.party}, not you", "approval.party"
                )
            mf.verify_approval(approval, manifest)
        except ConfideError as exc:
            raise from_confide(exc) from None
        return approval

    @app.post("/v1/tasks", tags=["tasks"], status_code=201)
    def create_task(body: TaskBody, me: Caller) -> dict[str, Any]:
        try:
            manifest = mf.parse_manifest(body.manifest)
        except ConfideError as exc:
            raise from_confide(exc) from None
        creator_approval = (
            checked_approval(body.approval, manifest, me) if body.approval is not None else None
        )
        obj = (
            body.manifest
            if isinstance(body.manifest, dict)
            else parse_json_object(body.manifest, where="manifest")
        )
        text = canonical_json(obj).decode()
        if text != manifest.text:
            raise ApiError(400, "invalid", "manifest does not round-trip (non-canonical values)", "manifest")
        where = f"task {manifest.task_id}"
        if manifest.creator != me:
            raise ApiError(
                403, "forbidden", f"the manifest's creator is {manifest.creator}, not you", "manifest.creator"
            )
        service = platform.service_line()
        if service is not None and manifest.service != PublicIdentity.from_line(service).fingerprint:
            raise ApiError(
                400,
                "invalid",
                f"manifest is for service {manifest.service}, not this platform's",
                "manifest.service",
            )
        fn = manifest.function
        if fn.kind == "builtin" and (
            fn.name not in mf.BUILTINS or mf.builtin_descriptor(fn.name).digest != manifest.function_digest
        ):
            raise ApiError(400, "invalid", f"built-in {fn.name!r} of this build differs", "manifest.function")
        with db.transaction() as s:
            if fn.kind != "builtin" and s.get(Function, manifest.function_digest) is None:
                raise ApiError(
                    400,
                    "invalid",
                    f"function {manifest.function_digest} is not registered",
                    "manifest.function",
                )
            for inp in manifest.inputs:
                ds = s.get(Dataset, inp.dataset_id)
                if ds is None or ds.owner != inp.owner or ds.ciphertext_sha256 != inp.ciphertext_sha256:
                    raise ApiError(
                        400,
                        "invalid",
                        f"no dataset {inp.dataset_id} of {inp.owner} with ciphertext {inp.ciphertext_sha256}",
                        f"manifest.inputs.{inp.name}",
                    )
            if s.get(Task, manifest.task_id) is not None:
                raise ApiError(409, "conflict", "task id already in use", where)
            t = now()
            task = Task(
                task_id=manifest.task_id,
                creator=me,
                manifest=text,
                manifest_sha256=manifest.digest,
                function_digest=manifest.function_digest,
                state="created",
                attempts=0,
                runs=0,
                created_at=t,
                updated_at=t,
            )
            s.add(task)
            s.flush()
            for p in manifest.participants:
                s.add(TaskParticipant(task_id=task.task_id, party=p.fingerprint))
            for inp in manifest.inputs:
                s.add(TaskInput(task_id=task.task_id, name=inp.name, dataset_id=inp.dataset_id))
            audit.append(
                s,
                "task.created",
                actor=me,
                task_id=task.task_id,
                detail={"manifest_sha256": manifest.digest, "function": manifest.function_digest},
            )
            if creator_approval is not None:
                store_approval(s, task.task_id, me, creator_approval)
            s.flush()
            return task_json(s, task)

    @app.get("/v1/tasks", tags=["tasks"])
    def list_tasks(me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            rows = s.execute(
                select(Task)
                .join(TaskParticipant, TaskParticipant.task_id == Task.task_id)
                .where(TaskParticipant.party == me)
                .order_by(Task.created_at)
            ).scalars()
            return {"tasks": [task_summary(r) for r in rows]}

    @app.get("/v1/tasks/{task_id}", tags=["tasks"])
    async def get_task(
        task_id: Annotated[str, Path(pattern=HEX32)],
        me: Caller,
        wait: Annotated[float, Query(ge=0, le=MAX_LONG_POLL_S, allow_inf_nan=False)] = 0,
        state: Annotated[str | None, Query(pattern="^(created|queued|running|succeeded|failed)$")] = None,
        audit_from: Annotated[int | None, Query(ge=1, le=MAX_INT64)] = None,
    ) -> dict[str, Any]:
        """With `wait` and `state`: a long poll that answers as soon as the task leaves `state` (or
        after `wait` seconds), so a client learns of completion without polling. No thread is held
        while waiting; changes made by other server processes are seen within LONG_POLL_SLICE_S.
        With `audit_from`: also the audit head and the links from that event on (as
        `GET /v1/audit/links` gives them), so a client checks a receipt's audit head in one call."""

        def read() -> tuple[str, dict[str, Any]]:
            with db.reading() as s:
                task = task_for(s, task_id, me)
                view = task_json(s, task)
                if audit_from is not None:
                    head = audit.head(s)
                    view["audit"] = {"head": head, "links": audit.links(s, audit_from, int(head["seq"]))}
                return task.state, view

        deadline = time.monotonic() + wait
        while True:
            current, view = await run_in_threadpool(read)
            remaining = deadline - time.monotonic()
            if state is None or current != state or remaining <= 0:
                return view
            await long_poll.wait(min(LONG_POLL_SLICE_S, remaining))

    @app.post("/v1/tasks/{task_id}/approvals", tags=["tasks"], status_code=201)
    def approve(
        task_id: Annotated[str, Path(pattern=HEX32)], body: ApprovalBody, me: Caller
    ) -> dict[str, Any]:
        with db.transaction() as s:
            task = task_for(s, task_id, me)
            if s.get(TaskRejection, (task_id, me)) is not None:
                raise ApiError(
                    409, "conflict", "you rejected this task (a rejection is final)", f"task {task_id}"
                )
            try:
                manifest = mf.parse_manifest(task.manifest)
            except ConfideError as exc:
                raise from_confide(exc) from None
            approval = checked_approval(body.approval, manifest, me)
            store_approval(s, task_id, me, approval)
            s.flush()
            return task_json(s, task)

    @app.post("/v1/tasks/{task_id}/run", tags=["tasks"])
    def run(
        task_id: Annotated[str, Path(pattern=HEX32)], me: Caller, body: RunBody | None = None
    ) -> dict[str, Any]:
        with db.transaction() as s:
            task = task_for(s, task_id, me, lock=True)
            rejected = (
                s.execute(
                    select(TaskRejection.party)
                    .where(TaskRejection.task_id == task_id)
                    .order_by(TaskRejection.party)
                )
                .scalars()
                .first()
            )
            if rejected is not None:
                raise ApiError(
                    409, "conflict", f"task was rejected by {rejected}: it cannot run", f"task {task_id}"
                )
            try:
                platform.scheduler.queue(s, task, actor=me)
            except StateConflict as exc:
                raise ApiError(409, "conflict", exc.message, exc.where) from None
            result = {"task_id": task_id, "state": task.state, "run": task.runs}
        if platform.pool is not None:
            platform.pool.wake()
        log.info("task %s: queued by %s (run %d)", task_id, me, result["run"])
        return result

    @app.post("/v1/tasks/{task_id}/reject", tags=["tasks"])
    def reject(
        task_id: Annotated[str, Path(pattern=HEX32)], me: Caller, body: RejectBody | None = None
    ) -> dict[str, Any]:
        """A participant refuses a task it was named in (say, one naming its dataset that it never
        asked for): the task can no longer run (queued: it fails now, category ``rejected``), the
        party's approval, if it gave one, is withdrawn, and nobody reads its datasets' ciphertext
        through this task. Final. Refused (409) while an attempt runs: the enclave already checked
        every approval. Enforced by the platform (the enclave still accepts an approval signed
        before the rejection, if a hostile host hands it over)."""
        reason = body.reason if body is not None else None
        with db.transaction() as s:
            task = task_for(s, task_id, me, lock=True)
            if s.get(TaskRejection, (task_id, me)) is not None:
                return task_json(s, task)  # already rejected: nothing changes
            if task.state == "running":
                raise ApiError(
                    409,
                    "conflict",
                    "task is running: the enclave already checked its approvals; reject it once the attempt ends",
                    f"task {task_id}",
                )
            t = now()
            s.add(TaskRejection(task_id=task_id, party=me, reason=reason, created_at=t))
            withdrawn = s.get(Approval, (task_id, me))
            if withdrawn is not None:
                s.delete(withdrawn)
            if task.state in ("created", "queued", "failed"):
                task.state = "failed"
                task.category = "rejected"
                task.message = f"rejected by {me}" + (f": {reason}" if reason else "")
                task.lease_owner = None
                task.lease_expires = None
                task.updated_at = t
            audit.append(
                s,
                "task.rejected",
                actor=me,
                task_id=task_id,
                detail={
                    "manifest_sha256": task.manifest_sha256,
                    "reason": reason,
                    "approval_withdrawn": withdrawn is not None,
                },
            )
            s.flush()
            view = task_json(s, task)
        platform.scheduler.notify_changed()
        log.info("task %s: rejected by %s", task_id, me)
        return view

    # ---- audit -----------------------------------------------------------------------------------
    def with_chain(s: Any, events: list[dict[str, Any]], audit_from: int | None) -> dict[str, Any]:
        """The events, and the head and links a client needs to check them against its pins: from
        the first event shown (or `audit_from`, its pinned head, when earlier) to the head."""
        head = audit.head(s)
        starts = [int(events[0]["seq"])] if events else []
        if audit_from is not None:
            starts.append(audit_from)
        first = min(starts, default=int(head["seq"]) + 1)
        return {"events": events, "audit": {"head": head, "links": audit.links(s, first, int(head["seq"]))}}

    @app.get("/v1/tasks/{task_id}/audit", tags=["audit"])
    def task_audit(
        task_id: Annotated[str, Path(pattern=HEX32)],
        me: Caller,
        chain: bool = False,
        audit_from: Annotated[int | None, Query(ge=1, le=MAX_INT64)] = None,
    ) -> dict[str, Any]:
        """A task's audit events. With `chain`: also the audit head and the links from the first
        event shown (or `audit_from`, when earlier) on, so a client checks them in one call."""
        with db.reading() as s:
            task_for(s, task_id, me)
            rows = s.execute(
                select(AuditEvent).where(AuditEvent.task_id == task_id).order_by(AuditEvent.seq)
            ).scalars()
            events = [audit.as_dict(r) for r in rows]
            return with_chain(s, events, audit_from) if chain else {"events": events}

    @app.get("/v1/audit", tags=["audit"])
    def my_audit(
        me: Caller,
        after: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        chain: bool = False,
        audit_from: Annotated[int | None, Query(ge=1, le=MAX_INT64)] = None,
    ) -> dict[str, Any]:
        """Audit events this party may see (its own acts and its tasks'). With `chain`: also the
        head and the links from the first event shown (or `audit_from`, when earlier) on."""
        with db.reading() as s:
            mine = select(TaskParticipant.task_id).where(TaskParticipant.party == me)
            rows = s.execute(
                select(AuditEvent)
                .where(AuditEvent.seq > after, or_(AuditEvent.actor == me, AuditEvent.task_id.in_(mine)))
                .order_by(AuditEvent.seq)
                .limit(limit)
            ).scalars()
            events = [audit.as_dict(r) for r in rows]
            return with_chain(s, events, audit_from) if chain else {"events": events}

    @app.get("/v1/audit/head", tags=["audit"])
    def audit_head(me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            return audit.head(s)

    @app.get("/v1/audit/links", tags=["audit"])
    def audit_links(
        me: Caller,
        first: Annotated[int, Query(ge=1, le=MAX_INT64)],
        last: Annotated[int, Query(ge=1, le=MAX_INT64)],
    ) -> dict[str, Any]:
        """Links {seq, prev_sha256, body_sha256, sha256} of events first..last (at most 10000), and the
        head: enough for any party to check that the chain it pinned is extended, not rewritten,
        without seeing other parties' events."""
        with db.reading() as s:
            return {"links": audit.links(s, first, last), "head": audit.head(s)}
