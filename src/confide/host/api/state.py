"""The API's state: database, blob store, scheduler, worker pool; the platform id, party lookup,
nonces, and the upload limits (concurrency, per-party quota, time)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError as DbIntegrityError

from confide.client import api_auth
from confide.enclave.errors import ConfideError
from confide.enclave.keys import PublicIdentity
from confide.host.api.common import MAX_CACHED_PARTIES, MAX_JSON_BYTES, NONCE_PURGE_INTERVAL_S
from confide.host.api.errors import ApiError
from confide.host.blobstore import BlobStore
from confide.host.db import PLATFORM_ID_KEY, ApiNonce, Blob, BlobGrant, Database, Meta, Party, insert_ignore
from confide.host.pool import WorkerPool
from confide.host.scheduler import Scheduler

# ---- upload limits -----------------------------------------------------------------------------------

DEFAULT_MAX_UPLOADS = 16
DEFAULT_MAX_UPLOADS_PER_PARTY = 4
DEFAULT_QUOTA_BYTES = 16 << 30
DEFAULT_UPLOAD_TIMEOUT_S = 60.0
DEFAULT_UPLOAD_MIN_RATE = 64 << 10  # bytes per second


@dataclass(frozen=True)
class UploadLimits:
    """What one server process allows blob uploads (``confide serve --max-uploads`` ...).

    An upload may take ``timeout_s + declared length / min_rate`` seconds in all, and wait at most
    ``timeout_s`` for any one chunk: a client that sends a few bytes a second is cut off (408)."""

    max_concurrent: int = DEFAULT_MAX_UPLOADS
    max_concurrent_per_party: int = DEFAULT_MAX_UPLOADS_PER_PARTY
    quota_bytes: int = DEFAULT_QUOTA_BYTES  # per party: the blobs it uploaded, and its uploads in flight
    timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S
    min_rate: int = DEFAULT_UPLOAD_MIN_RATE

    def deadline_s(self, length: int) -> float:
        return self.timeout_s + length / self.min_rate


@dataclass
class UploadSlots:
    """Uploads in flight in this process (used from the event loop only), per party with the bytes
    they declared, so that concurrent uploads cannot together exceed a quota."""

    running: int = 0
    per_party: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)

    def take(self, party: str, length: int) -> None:
        self.running += 1
        self.per_party[party] = self.per_party.get(party, 0) + 1
        self.reserved[party] = self.reserved.get(party, 0) + length

    def give_back(self, party: str, length: int) -> None:
        self.running -= 1
        for table, amount in ((self.per_party, 1), (self.reserved, length)):
            left = table.get(party, 0) - amount
            if left > 0:
                table[party] = left
            else:
                table.pop(party, None)


# ---- the application's state ------------------------------------------------------------------------


@dataclass
class Platform:
    db: Database
    blobs: BlobStore
    scheduler: Scheduler
    pool: WorkerPool | None = None
    max_json_bytes: int = MAX_JSON_BYTES
    uploads: UploadLimits = field(default_factory=UploadLimits)
    upload_slots: UploadSlots = field(default_factory=UploadSlots)
    _last_purge: float = field(default=0.0)
    # A fingerprint is a digest of the keys, so a party found once never changes: cache the hits.
    _parties: dict[str, PublicIdentity] = field(default_factory=dict)
    _platform_id: str | None = None

    # -- the audience of signed requests ---------------------------------------------------------------
    @property
    def platform_id(self) -> str:
        """This platform's id (random, in ``platform_meta``; migration 0003 creates it): every signed
        request names it, so a request signed for another platform is refused here."""
        if self._platform_id is None:
            with self.db.transaction() as s:
                row = s.get(Meta, PLATFORM_ID_KEY)
                if row is None:  # a database whose tables were made without the migrations
                    insert_ignore(s, Meta, key=PLATFORM_ID_KEY, value=api_auth.new_platform_id())
                    row = s.get(Meta, PLATFORM_ID_KEY)
                assert row is not None
                self._platform_id = api_auth.check_platform_id(row.value, where="platform_meta")
        return self._platform_id

    def storage_used(self, party: str) -> int:
        """Bytes of the blobs this party uploaded (what its quota counts)."""
        with self.db.reading() as s:
            total = s.execute(
                select(func.coalesce(func.sum(Blob.size), 0))
                .join(BlobGrant, BlobGrant.sha256 == Blob.sha256)
                .where(BlobGrant.party == party)
            ).scalar()
        return int(total or 0)

    def has_grant(self, party: str, sha256: str) -> bool:
        with self.db.reading() as s:
            return s.get(BlobGrant, (sha256, party)) is not None

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
        declared: api_auth.DeclaredBody | None = None,
    ) -> str:
        try:
            party = api_auth.verify_request(
                headers,
                method,
                target,
                body,
                self.lookup_party,
                self.seen_nonce,
                audience=self.platform_id,
                declared=declared,
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
