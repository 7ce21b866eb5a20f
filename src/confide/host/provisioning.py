"""The service identity across server processes that share one database (PROTOCOL.md section 2).

**Who creates the service key.** ``service_init`` runs only when the database names no service yet,
and only on the worker that wins an insert-if-absent of the ``service.init`` row of
``platform_meta`` (`InitClaims.claim`): two servers starting at once on an empty database create
one identity. A claim whose worker has not recorded a service within `INIT_CLAIM_STALE_S` (it died
between claiming and recording) may be taken over, by compare-and-swap on the same row.

**Provisioning through the database.** A worker without the service key and without a provisioned
worker in its own server process (the in-process relay in `pool` stays the fast path) posts a
*request*: its offer and the evidence binding it, exactly what ``provision_offer`` returned. An idle
provisioned worker of another server claims it atomically, hands it to its enclave's
``provision_grant`` and writes what the enclave answered: the grant and the granter's evidence, or
the enclave's refusal. The requesting worker's enclave checks the granter's evidence and opens the
grant (``provision_accept``); then the worker deletes the request, in the transaction that records
the ``service.provisioned`` audit event. The database carries the same public messages the
in-process relay passes between two enclaves; the grant opens only inside the offering enclave.

    open ──claim──▶ claimed ──▶ granted   the requester accepts, then deletes the row
      │                   └──▶ refused   the granter's enclave refused; ``message`` says why
      └── not answered by ``expires``: the requester deletes it and posts a fresh offer

Times are the servers' wall clocks (`db.now`): servers sharing a database need roughly synchronised
clocks (seconds, not minutes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from confide.enclave.encoding import canonical_json, parse_json_object
from confide.enclave.errors import ConfideError
from confide.host import audit
from confide.host.db import Database, Meta, ProvisionRequest, insert_ignore, now

log = logging.getLogger("confide.host")

META_SERVICE = "service"  # the service's public line
META_SERVICE_INIT = "service.init"  # {"worker", "at"}: the worker that may create the service key
INIT_CLAIM_STALE_S = 60.0
REQUEST_TTL_S = 60.0


@dataclass(frozen=True)
class Offer:
    """What ``provision_offer`` returns: a fresh public key and evidence binding it."""

    offer: str
    evidence: str


@dataclass(frozen=True)
class Grant:
    """What ``provision_grant`` returns: the service key wrapped to the offer, and evidence binding
    the service key and the offer."""

    grant: str
    evidence: str


@dataclass(frozen=True)
class OpenRequest:
    """A request a granter claimed: whose it is and the offer to answer."""

    id: str
    server: str
    worker_id: str
    offer: Offer


@dataclass(frozen=True)
class RequestStatus:
    """A request as its requester sees it when polling."""

    id: str
    state: str
    expires: float
    granted_by: str | None
    grant: Grant | None
    message: str | None


@dataclass(frozen=True)
class InitClaim:
    """The outcome of `InitClaims.claim`: ``won``, or who holds the claim (``worker``, ``at``)."""

    won: bool
    worker: str | None = None
    at: float | None = None
    took_over: str | None = None  # the stale claimant this claim replaced


class InitClaims:
    """The atomic "this worker creates the service key" decision, across servers."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, worker_id: str) -> InitClaim:
        """Claim the creation of the service key for `worker_id`, unless the database names a
        service already (then ``won`` is False and ``worker`` None) or a live claim of another
        worker exists (``worker`` and ``at`` say whose)."""
        with self.db.transaction() as s:
            if s.get(Meta, META_SERVICE) is not None:
                return InitClaim(won=False)
            mine = canonical_json({"worker": worker_id, "at": now()}).decode()
            if insert_ignore(s, Meta, key=META_SERVICE_INIT, value=mine):
                return InitClaim(won=True)
            row = s.execute(
                select(Meta).where(Meta.key == META_SERVICE_INIT).execution_options(populate_existing=True)
            ).scalar_one()
            held = _parse_claim(row.value)
            if held["worker"] == worker_id:  # this worker claimed before its enclave restarted
                return InitClaim(won=True)
            if held["at"] + INIT_CLAIM_STALE_S > now():
                return InitClaim(won=False, worker=held["worker"], at=held["at"])
            swapped = cast(
                CursorResult[Any],
                s.execute(
                    update(Meta)
                    .where(Meta.key == META_SERVICE_INIT, Meta.value == row.value)
                    .values(value=mine)
                    .execution_options(synchronize_session=False)
                ),
            ).rowcount
            if swapped == 1:
                return InitClaim(won=True, took_over=held["worker"])
            return InitClaim(won=False, worker=held["worker"], at=held["at"])


def _parse_claim(value: str) -> dict[str, Any]:
    where = f"platform_meta {META_SERVICE_INIT!r}"
    try:
        data = parse_json_object(value, where=where)
        return {"worker": str(data["worker"]), "at": float(data["at"])}
    except (ConfideError, KeyError, TypeError, ValueError):
        log.warning("%s holds %r, not a claim; treating it as stale", where, value[:200])
        return {"worker": "?", "at": 0.0}


class ProvisionRelay:
    """The provisioning requests table: post and poll (requester), claim and answer (granter)."""

    def __init__(self, db: Database, *, ttl_seconds: float = REQUEST_TTL_S) -> None:
        self.db = db
        self.ttl_seconds = ttl_seconds

    # ---- the requesting worker ----------------------------------------------------------------------
    def post(self, *, server: str, worker_id: str, offer: Offer) -> str:
        """Post a request for `worker_id` (replacing any it left behind, e.g. before a restart) and
        drop requests long expired (their worker or server is gone). Returns the request id."""
        request_id = os.urandom(16).hex()
        t = now()
        with self.db.transaction() as s:
            s.execute(
                delete(ProvisionRequest)
                .where(
                    (ProvisionRequest.worker_id == worker_id)
                    | (ProvisionRequest.expires < t - self.ttl_seconds)
                )
                .execution_options(synchronize_session=False)
            )
            s.add(
                ProvisionRequest(
                    id=request_id,
                    server=server,
                    worker_id=worker_id,
                    offer=offer.offer,
                    evidence=offer.evidence,
                    created_at=t,
                    state="open",
                    expires=t + self.ttl_seconds,
                )
            )
        return request_id

    def status(self, request_id: str) -> RequestStatus | None:
        """The request as stored now, or None when it is gone."""
        with self.db.reading() as s:
            row = s.get(ProvisionRequest, request_id)
            if row is None:
                return None
            grant = None
            if row.state == "granted" and row.grant is not None and row.grant_evidence is not None:
                grant = Grant(row.grant, row.grant_evidence)
            return RequestStatus(row.id, row.state, row.expires, row.granted_by, grant, row.message)

    def withdraw(self, request_id: str) -> None:
        with self.db.transaction() as s:
            self.finish(s, request_id)

    @staticmethod
    def finish(session: Session, request_id: str) -> None:
        """Delete the request inside the caller's transaction (with the audit event it completes)."""
        session.execute(
            delete(ProvisionRequest)
            .where(ProvisionRequest.id == request_id)
            .execution_options(synchronize_session=False)
        )

    # ---- a granting worker ---------------------------------------------------------------------------
    def any_open(self, *, exclude_server: str) -> bool:
        """Whether another server's worker waits for a grant (a cheap read, no write lock)."""
        with self.db.reading() as s:
            return (
                s.execute(
                    select(ProvisionRequest.id)
                    .where(
                        ProvisionRequest.state == "open",
                        ProvisionRequest.expires > now(),
                        ProvisionRequest.server != exclude_server,
                    )
                    .limit(1)
                ).scalar()
                is not None
            )

    def claim(self, granter: str, *, exclude_server: str) -> OpenRequest | None:
        """Claim the oldest open, unexpired request of another server for `granter`, atomically:
        two granters (of one server or several) never answer the same request."""
        for _ in range(4):  # another granter may win the race for the oldest one: look again
            with self.db.transaction() as s:
                t = now()
                request_id = s.execute(
                    select(ProvisionRequest.id)
                    .where(
                        ProvisionRequest.state == "open",
                        ProvisionRequest.expires > t,
                        ProvisionRequest.server != exclude_server,
                    )
                    .order_by(ProvisionRequest.created_at, ProvisionRequest.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).scalar()
                if request_id is None:
                    return None
                won = cast(
                    CursorResult[Any],
                    s.execute(
                        update(ProvisionRequest)
                        .where(ProvisionRequest.id == request_id, ProvisionRequest.state == "open")
                        .values(state="claimed", granted_by=granter)
                        .execution_options(synchronize_session=False)
                    ),
                ).rowcount
                if won != 1:
                    continue
                row = s.execute(
                    select(ProvisionRequest)
                    .where(ProvisionRequest.id == request_id)
                    .execution_options(populate_existing=True)
                ).scalar_one()
                return OpenRequest(row.id, row.server, row.worker_id, Offer(row.offer, row.evidence))
        return None

    def grant(self, request: OpenRequest, granter: str, grant: Grant) -> bool:
        """Write the enclave's grant; False when the requester withdrew the request meanwhile."""
        return self._answer(request, granter, state="granted", grant=grant)

    def refuse(self, request: OpenRequest, granter: str, reason: str) -> bool:
        """Record that the granter's enclave refused the request, and why, with an audit event in
        the same transaction; False when the requester withdrew the request meanwhile."""
        return self._answer(request, granter, state="refused", message=reason)

    def release(self, request: OpenRequest, granter: str) -> None:
        """The granter could not answer (its enclave died): let another granter take the request."""
        with self.db.transaction() as s:
            s.execute(
                update(ProvisionRequest)
                .where(
                    ProvisionRequest.id == request.id,
                    ProvisionRequest.state == "claimed",
                    ProvisionRequest.granted_by == granter,
                )
                .values(state="open", granted_by=None)
                .execution_options(synchronize_session=False)
            )

    def _answer(
        self,
        request: OpenRequest,
        granter: str,
        *,
        state: str,
        grant: Grant | None = None,
        message: str | None = None,
    ) -> bool:
        with self.db.transaction() as s:
            t = now()
            done = cast(
                CursorResult[Any],
                s.execute(
                    update(ProvisionRequest)
                    .where(
                        ProvisionRequest.id == request.id,
                        ProvisionRequest.state == "claimed",
                        ProvisionRequest.granted_by == granter,
                    )
                    .values(
                        state=state,
                        grant=grant.grant if grant else None,
                        grant_evidence=grant.evidence if grant else None,
                        granted_at=t,
                        message=message,
                    )
                    .execution_options(synchronize_session=False)
                ),
            ).rowcount
            if done == 1 and state == "refused":
                audit.append(
                    s,
                    "service.provision-refused",
                    actor=granter,
                    detail={
                        "granter": granter,
                        "grantee": request.worker_id,
                        "request": request.id,
                        "reason": message,
                    },
                )
        return done == 1
