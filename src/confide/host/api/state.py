"""The API's state: database, blob store, scheduler, worker pool; party lookup and nonces."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError as DbIntegrityError

from confide.client import api_auth
from confide.enclave.errors import ConfideError
from confide.enclave.keys import PublicIdentity
from confide.host.api.common import MAX_CACHED_PARTIES, MAX_JSON_BYTES, NONCE_PURGE_INTERVAL_S
from confide.host.api.errors import ApiError
from confide.host.blobstore import BlobStore
from confide.host.db import ApiNonce, Database, Party
from confide.host.pool import WorkerPool
from confide.host.scheduler import Scheduler

# ---- the application's state ------------------------------------------------------------------------


@dataclass
class Platform:
    db: Database
    blobs: BlobStore
    scheduler: Scheduler
    pool: WorkerPool | None = None
    max_json_bytes: int = MAX_JSON_BYTES
    _last_purge: float = field(default=0.0)
    # A fingerprint is a digest of the keys, so a party found once never changes: cache the hits.
    _parties: dict[str, PublicIdentity] = field(default_factory=dict)

    # -- authentication ------------------------------------------------------------------------------
    def lookup_party(self, fingerprint: str) -> PublicIdentity | None:
        known = self._parties.get(fingerprint)
        if known is not None:
            return known
        with self.db.reading() as s:
            row = s.get(Party, fingerprint)
            if row is None:
                return None
            public = PublicIdentity.from_line(row.identity, where=f"party {fingerprint}")
        if len(self._parties) < MAX_CACHED_PARTIES:
            self._parties[fingerprint] = public
        return public

    def seen_nonce(self, party: str, nonce: str, signed_time: int) -> bool:
        t = time.time()
        try:
            with self.db.transaction() as s:
                if t - self._last_purge > NONCE_PURGE_INTERVAL_S:
                    self._last_purge = t
                    s.execute(delete(ApiNonce).where(ApiNonce.expires_at < t))
                s.add(
                    ApiNonce(party=party, nonce=nonce, expires_at=max(t, signed_time) + api_auth.NONCE_TTL_S)
                )
        except DbIntegrityError:
            return True
        return False

    def authenticate(
        self,
        headers: Mapping[str, str],
        method: str,
        target: str,
        body: bytes,
        body_sha256: str | None = None,
    ) -> str:
        try:
            party = api_auth.verify_request(
                headers, method, target, body, self.lookup_party, self.seen_nonce, body_sha256=body_sha256
            )
        except ConfideError as exc:  # AuthError, or a malformed request line (FormatError)
            raise ApiError(401, "unauthenticated", exc.message, exc.where) from None
        return party.fingerprint

    # -- facts ---------------------------------------------------------------------------------------
    def service_line(self) -> str | None:
        return self.pool.service_line() if self.pool is not None else None


def request_target(request: Request) -> str:
    """The request target exactly as the client sent it (what the signature covers)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    target = raw.decode("latin-1")
    query = request.scope.get("query_string", b"")
    return f"{target}?{query.decode('latin-1')}" if query else target
