"""The hash-chained audit log (PROTOCOL.md §7).

Each event is ``{seq, time, task_id, actor, kind, detail, prev_sha256, sha256}`` with
``body_sha256 = H(canonical_json({time, task_id, actor, kind, detail}))``,
``sha256 = H(canonical_json({format: "confide-audit-v2", seq, prev_sha256, body_sha256}))`` and
``prev_sha256`` the previous event's hash (64 zeros before the first). A *link*
``{seq, prev_sha256, body_sha256, sha256}`` lets a party check the chain across events it may not
see (their content stays hidden behind ``body_sha256``): parties pin the newest ``(seq, sha256)``
they verified and require every later answer to extend it through links (client/audit_pins.py).

Events are appended in the same transaction as the state change they record, after locking the
single ``audit_head`` row (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every transaction
already holds the write lock), so concurrent writers — API threads, workers, several servers on one
PostgreSQL database — produce one linear chain.

The platform is untrusted: the chain lets a party detect that events it saw were later altered,
removed or reordered (it pins the head it verified; receipts sign the head the host passed), not
that the platform never lied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from confide.client.audit_chain import GENESIS, MAX_LINKS, body_hash, event_hash, link_hash
from confide.enclave.encoding import canonical_json, parse_json_object
from confide.enclave.errors import ConfideError, IntegrityError
from confide.host.db import AuditEvent, AuditHead, now

HEAD_ID = 1


def as_link(row: AuditEvent) -> dict[str, Any]:
    ev = as_dict(row)
    return {
        "seq": row.seq,
        "prev_sha256": row.prev_sha256,
        "body_sha256": body_hash(ev),
        "sha256": row.sha256,
    }


def links(session: Session, first: int, last: int) -> list[dict[str, Any]]:
    """The links of events first..last (at most MAX_LINKS), in order, as stored (a party checks them)."""
    last = min(last, first + MAX_LINKS - 1)
    rows = session.execute(
        select(AuditEvent).where(AuditEvent.seq >= first, AuditEvent.seq <= last).order_by(AuditEvent.seq)
    ).scalars()
    return [as_link(r) for r in rows]


def as_dict(row: AuditEvent) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "time": row.time,
        "task_id": row.task_id,
        "actor": row.actor,
        "kind": row.kind,
        "detail": parse_json_object(row.detail, where=f"audit event {row.seq}"),
        "prev_sha256": row.prev_sha256,
        "sha256": row.sha256,
    }


def append(
    session: Session,
    kind: str,
    *,
    actor: str,
    task_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Add one event to the chain inside the caller's transaction; returns the event."""
    head = session.execute(select(AuditHead).where(AuditHead.id == HEAD_ID).with_for_update()).scalar_one()
    event: dict[str, Any] = {
        "seq": head.seq + 1,
        "time": now(),
        "task_id": task_id,
        "actor": actor,
        "kind": kind,
        "detail": dict(detail or {}),
        "prev_sha256": head.sha256,
    }
    event["sha256"] = event_hash(event)
    session.add(
        AuditEvent(
            seq=event["seq"],
            time=event["time"],
            task_id=task_id,
            actor=actor,
            kind=kind,
            detail=canonical_json(event["detail"]).decode(),
            prev_sha256=event["prev_sha256"],
            sha256=event["sha256"],
        )
    )
    head.seq = event["seq"]
    head.sha256 = event["sha256"]
    return event


def head(session: Session) -> dict[str, Any]:
    row = session.get(AuditHead, HEAD_ID)
    if row is None:
        raise ConfideError("audit head row missing (database not migrated?)", where="audit_head")
    return {"seq": row.seq, "sha256": row.sha256}


def verify_log(session: Session, *, batch: int = 1000) -> int:
    """Walk the whole chain from genesis to the head row; returns the number of events.

    Raises `IntegrityError` naming the first event that was altered, removed or reordered.
    """
    expected_prev = GENESIS
    expected_seq = 1
    last = 0
    while True:
        rows = (
            session.execute(
                select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            break
        for row in rows:
            where = f"audit event {row.seq}"
            if row.seq != expected_seq:
                raise IntegrityError(f"expected event {expected_seq} next (events missing)", where=where)
            try:
                ev = as_dict(row)
            except ConfideError as exc:
                raise IntegrityError(f"detail is not valid JSON ({exc.message})", where=where) from None
            if ev["prev_sha256"] != expected_prev:
                raise IntegrityError("does not link to the previous event", where=where)
            if event_hash(ev) != row.sha256:
                raise IntegrityError("does not match its hash (altered)", where=where)
            expected_prev = row.sha256
            expected_seq += 1
            last = row.seq
    top = head(session)
    if top["seq"] != last or top["sha256"] != expected_prev:
        raise IntegrityError(
            f"the head names event {top['seq']} but the chain ends at {last} (events missing or altered)",
            where="audit_head",
        )
    return last


__all__ = [
    "GENESIS",
    "MAX_LINKS",
    "append",
    "as_dict",
    "as_link",
    "body_hash",
    "event_hash",
    "head",
    "link_hash",
    "links",
    "verify_log",
]
