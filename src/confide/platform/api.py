"""The platform's HTTP API (PROTOCOL.md §7), built with FastAPI; OpenAPI at ``/openapi.json``.

Every call but ``GET /v1/health``, ``/v1/service*`` and ``POST /v1/parties`` is authenticated with
`confide.api_auth` (nonces kept in the database, so a replay is refused after a restart and by
every server sharing the database), before anything else of the request is looked at. A party
sees its own objects and the tasks it takes part in; anything else answers 404, exactly like an
object that does not exist. Requests are validated strictly (JSON bodies parsed strictly, unknown
fields rejected, values the database cannot store refused) and every error is
``{"error": {"code", "message", "where"}}`` (tests/test_api_fuzz.py fuzzes every operation).

The platform is untrusted: the checks it makes on manifests, approvals and envelopes are a
courtesy that gives early, clear errors. The enclave makes them again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import delete, or_, select
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from confide import __version__, api_auth
from confide.enclave import manifest as mf
from confide.enclave.encoding import canonical_json, json_depth, parse_json_object
from confide.enclave.errors import ConfideError
from confide.enclave.keys import PublicIdentity
from confide.platform import audit
from confide.platform.blobstore import BlobStore, BlobTooLarge
from confide.platform.db import (
    ApiNonce,
    Approval,
    AuditEvent,
    Blob,
    BlobGrant,
    Database,
    Dataset,
    Evidence,
    Function,
    Party,
    Task,
    TaskInput,
    TaskOutput,
    TaskParticipant,
    TaskRun,
    insert_ignore,
    now,
)
from confide.platform.pool import ServiceUnavailable, WorkerPool
from confide.platform.scheduler import Scheduler, StateConflict

MAX_LONG_POLL_S = 30.0
MAX_CACHED_PARTIES = 100_000
LONG_POLL_SLICE_S = 0.25  # re-read the database this often (changes by other server processes)

log = logging.getLogger("confide.platform")

MAX_JSON_BYTES = 4 << 20
NONCE_PURGE_INTERVAL_S = 60.0
BLOB_PATH = "/v1/blobs"
HEX32 = r"^[0-9a-f]{32}$"
HEX64 = r"^[0-9a-f]{64}$"
FINGERPRINT = r"^[0-9a-f]{4}(-[0-9a-f]{4}){4}$"
MAX_INT64 = (1 << 63) - 1  # the database's BIGINT
MAX_SCHEMA_DEPTH = 16  # a dataset's schema is echoed back: keep it shallow enough to serialise
PARTY_SCOPE_KEY = "confide.party"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.where = where


def not_found(what: str) -> ApiError:
    return ApiError(404, "not-found", f"no {what} (or not visible to you)", where=what)


def error_body(code: str, message: str, where: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "where": where}}


def _from_confide(exc: ConfideError, *, status: int = 400, code: str = "invalid") -> ApiError:
    return ApiError(status, code, exc.message, exc.where)


# ---- request bodies (strict: unknown fields and wrong types are refused) ----------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RegisterBody(Strict):
    name: str = Field(min_length=1, max_length=api_auth.MAX_NAME_LEN)
    identity: str = Field(max_length=512)
    signature: str = Field(max_length=128)


class EvidenceBody(Strict):
    nonce: str = Field(pattern=r"^([0-9a-f]{2}){0,64}$", description="hex, at most 64 bytes; may be empty")


class DatasetBody(Strict):
    dataset_id: str = Field(pattern=HEX32)
    name: str = Field(min_length=1, max_length=256)
    schema_: dict[str, Any] = Field(alias="schema")
    rows: int | None = Field(default=None, ge=0, le=MAX_INT64)
    ciphertext_sha256: str = Field(pattern=HEX64)
    key_envelope: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        # shown to other parties; and PostgreSQL text refuses NUL (a database error, not a 4xx)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("must hold no control characters")
        return value

    @field_validator("schema_")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        # stored as canonical JSON and echoed in every listing: what the encoder refuses there
        # (deep nesting, lone surrogates, 1e400 parsed as infinity) would break them all
        if json_depth(value, MAX_SCHEMA_DEPTH + 1) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
        try:
            canonical_json(value)
            json.dumps(value, allow_nan=False)
        except (UnicodeEncodeError, ValueError):
            raise ValueError("holds text that is not valid Unicode or a number out of range") from None
        return value


class FunctionBody(Strict):
    descriptor: dict[str, Any]
    source: str | None = Field(default=None, max_length=mf.MAX_SOURCE_BYTES)
    sealed_source: str | None = Field(default=None, max_length=2 * mf.MAX_SOURCE_BYTES)

    @field_validator("source")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # compile() refuses it anyway, and PostgreSQL text refuses it with a database error
        if value is not None and "\x00" in value:
            raise ValueError("Python source holds no NUL character")
        return value


class TaskBody(Strict):
    manifest: dict[str, Any] | str = Field(description="the manifest object (or its canonical JSON text)")


class ApprovalBody(Strict):
    approval: dict[str, Any]


class RunBody(Strict):
    pass


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


# ---- ASGI middleware: cap JSON bodies before anything reads them ------------------------------------


class JsonBodyLimit:
    """Reads a non-blob request body up to the cap (413 beyond it) and replays it to the app, so
    no handler ever buffers an unbounded body. Blob uploads pass through and are capped by the
    blob store while they stream."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == BLOB_PATH:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                response = JSONResponse(
                    error_body("too-large", f"request body exceeds {self.max_bytes} bytes", "body"), 413
                )
                await response(scope, receive, send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- authentication (a dependency of every non-public route) -------------------------------------------


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI will parse a body with this content type as JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _authenticate(request: Request) -> str:
    """Check the request's signature (401 otherwise) and keep the party in the request's scope."""
    platform: Platform = request.app.state.platform
    body = await request.body()
    party = await run_in_threadpool(
        platform.authenticate, request.headers, request.method, request_target(request), body
    )
    request.scope[PARTY_SCOPE_KEY] = party
    return party


async def _check_json_body(request: Request) -> None:
    """A JSON body is parsed strictly before FastAPI parses it: malformed JSON, bytes that are not
    UTF-8, nesting beyond the parser's limit, duplicate keys and NaN are refused, not guessed at,
    with one clear error (400 ``invalid-json``, ``where`` = ``body``)."""
    body = await request.body()
    if body and _is_json(request.headers.get("content-type")):
        try:
            parse_json_object(body, where="body")
        except ConfideError as exc:
            raise ApiError(400, "invalid-json", exc.message, "body") from None


async def authenticated_party(request: Request) -> str:
    """The fingerprint of the party that signed this request (401 otherwise). `ConfideRoute` has
    normally authenticated the request already, before anything read its parameters or body."""
    party = request.scope.get(PARTY_SCOPE_KEY)
    if isinstance(party, str):
        return party
    party = await _authenticate(request)
    await _check_json_body(request)
    return party


class ConfideRoute(APIRoute):
    """Every route of the API. A route that needs a `Caller` authenticates first, so an
    unauthenticated request learns nothing but 401 whatever its path parameters, query or body;
    then a JSON body is parsed strictly (`_check_json_body`), before FastAPI parses and validates
    it (FastAPI would answer malformed JSON with 422 ``body.<offset>``, ahead of authentication)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        protected = any(dep.call is authenticated_party for dep in self.dependant.dependencies)
        if not protected and self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            if protected:
                await _authenticate(request)
            await _check_json_body(request)
            return await handler(request)

        return checked


Caller = Annotated[str, Depends(authenticated_party)]


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


def create_app(platform: Platform) -> FastAPI:
    app = FastAPI(
        title="Confide platform",
        version=__version__,
        description=(
            "The untrusted platform of Confide (docs/PROTOCOL.md §7). Authenticated calls carry "
            "X-Confide-Party, X-Confide-Time, X-Confide-Nonce and X-Confide-Signature."
        ),
        # A signed request cannot follow a redirect (the signature covers the path): a path with a
        # stray trailing slash is a plain 404 with the error body, not a 307 without one.
        redirect_slashes=False,
    )
    app.router.route_class = ConfideRoute
    app.state.platform = platform
    app.add_middleware(JsonBodyLimit, max_bytes=platform.max_json_bytes)
    _install_error_handlers(app)

    db = platform.db

    # ---- public ----------------------------------------------------------------------------------
    long_poll = LongPoll()
    platform.scheduler.add_listener(long_poll.notify_threadsafe)

    @app.get("/v1/health", tags=["service"])
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/v1/service", tags=["service"])
    def service() -> dict[str, Any]:
        if platform.pool is None:
            return {"service": None, "fingerprint": None, "workers": []}
        return platform.pool.describe()

    @app.post("/v1/service/evidence", tags=["service"])
    def service_evidence(body: EvidenceBody) -> dict[str, Any]:
        if platform.pool is None:
            raise ApiError(503, "unavailable", "this server runs no enclave workers", "service")
        try:
            evidence, line = platform.pool.evidence(body.nonce)
        except ServiceUnavailable as exc:
            raise _from_confide(exc, status=503, code="unavailable") from None
        return {"evidence": evidence, "service": line}

    @app.get("/v1/service/evidence/{sha256}", tags=["service"])
    def boot_evidence(sha256: Annotated[str, Path(pattern=HEX64)]) -> dict[str, Any]:
        with db.reading() as s:
            row = s.get(Evidence, sha256)
            if row is None:
                raise not_found(f"evidence {sha256}")
            return {"sha256": row.sha256, "evidence": row.evidence, "worker": row.worker_id}

    @app.post("/v1/parties", tags=["parties"], status_code=201)
    def register(body: RegisterBody) -> JSONResponse:
        try:
            public = api_auth.verify_registration(body.name, body.identity, body.signature)
        except ConfideError as exc:
            raise _from_confide(exc) from None
        fp = public.fingerprint
        with db.transaction() as s:
            row = s.get(Party, fp)
            if row is not None:
                if row.name != body.name:
                    raise ApiError(409, "conflict", f"party {fp} is registered as {row.name!r}", "name")
                return JSONResponse({"fingerprint": fp, "name": row.name}, 200)
            s.add(Party(fingerprint=fp, name=body.name, identity=body.identity, created_at=now()))
            audit.append(s, "party.registered", actor=fp, detail={"name": body.name})
        log.info("party %s registered as %r", fp, body.name)
        return JSONResponse({"fingerprint": fp, "name": body.name}, 201)

    # ---- parties ---------------------------------------------------------------------------------
    @app.get("/v1/parties/{fingerprint}", tags=["parties"])
    def get_party(fingerprint: Annotated[str, Path(pattern=FINGERPRINT)], me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            row = s.get(Party, fingerprint)
            if row is None:
                raise not_found(f"party {fingerprint}")
            return {"fingerprint": row.fingerprint, "name": row.name, "identity": row.identity}

    # ---- blobs -----------------------------------------------------------------------------------
    @app.put(
        BLOB_PATH,
        tags=["blobs"],
        status_code=201,
        openapi_extra={
            "requestBody": {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            }
        },
    )
    async def put_blob(request: Request) -> dict[str, Any]:
        """Store ciphertext, streamed: hashed while written to a temporary file; published only
        after the signature over its digest verified."""
        try:
            signed = api_auth.parse_headers(request.headers)
            api_auth.check_time(signed)
        except api_auth.AuthError as exc:
            raise ApiError(401, "unauthenticated", exc.message, exc.where) from None
        party = await run_in_threadpool(platform.lookup_party, signed.party)
        if party is None:
            raise ApiError(
                401, "unauthenticated", f"unknown party {signed.party} (register first)", "X-Confide-Party"
            )
        writer = await run_in_threadpool(platform.blobs.writer)
        try:
            async for chunk in request.stream():
                if chunk:
                    await run_in_threadpool(writer.write, chunk)
            digest = writer.sha256
            await run_in_threadpool(
                platform.authenticate, request.headers, request.method, request_target(request), b"", digest
            )
            sha, size = await run_in_threadpool(writer.commit)
        except BlobTooLarge as exc:
            raise ApiError(413, "too-large", exc.message, "body") from None
        except ClientDisconnect:
            raise ApiError(400, "incomplete", "the client went away before the body ended", "body") from None
        finally:
            writer.abort()  # no-op once committed; otherwise the temporary file goes

        def record() -> None:
            with db.transaction() as s:
                insert_ignore(s, Blob, sha256=sha, size=size, created_at=now())
                insert_ignore(s, BlobGrant, sha256=sha, party=signed.party)

        await run_in_threadpool(record)
        return {"sha256": sha, "size": size}

    @app.get(
        "/v1/blobs/{sha256}",
        tags=["blobs"],
        response_class=FileResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def get_blob(sha256: Annotated[str, Path(pattern=HEX64)], me: Caller) -> FileResponse:
        with db.reading() as s:
            if not _can_read_blob(s, sha256, me):
                raise not_found(f"blob {sha256}")
        path = platform.blobs.path(sha256)
        if not path.is_file():
            raise ApiError(410, "gone", "the blob is registered but missing from the store", f"blob {sha256}")
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Content-SHA256": sha256})

    # ---- datasets --------------------------------------------------------------------------------
    @app.post("/v1/datasets", tags=["datasets"], status_code=201)
    def create_dataset(body: DatasetBody, me: Caller) -> dict[str, Any]:
        where = f"dataset {body.dataset_id}"
        try:
            env = mf.parse_dataset_key(body.key_envelope, where="key_envelope")
        except ConfideError as exc:
            raise _from_confide(exc) from None
        for name, got, want in (
            ("dataset_id", env.dataset_id, body.dataset_id),
            ("owner", env.owner, me),
            ("ciphertext_sha256", env.ciphertext_sha256, body.ciphertext_sha256),
        ):
            if got != want:
                raise ApiError(
                    400, "invalid", f"envelope {name} is {got}, expected {want}", f"key_envelope.{name}"
                )
        service = platform.service_line()
        if service is not None and env.service != PublicIdentity.from_line(service).fingerprint:
            raise ApiError(
                400,
                "invalid",
                f"key is wrapped to service {env.service}, not this platform's",
                "key_envelope.service",
            )
        with db.transaction() as s:
            if not _can_read_blob(s, body.ciphertext_sha256, me):
                raise ApiError(
                    400, "invalid", "upload the ciphertext first (PUT /v1/blobs)", "ciphertext_sha256"
                )
            if s.get(Dataset, body.dataset_id) is not None:
                raise ApiError(409, "conflict", "dataset id already in use", where)
            row = Dataset(
                dataset_id=body.dataset_id,
                owner=me,
                name=body.name,
                schema_json=canonical_json(body.schema_).decode(),
                rows=body.rows,
                ciphertext_sha256=body.ciphertext_sha256,
                key_envelope=canonical_json(body.key_envelope).decode(),
                created_at=now(),
            )
            s.add(row)
            audit.append(
                s,
                "dataset.registered",
                actor=me,
                detail={"dataset_id": body.dataset_id, "ciphertext_sha256": body.ciphertext_sha256},
            )
            return _dataset_json(s, row, me)

    @app.get("/v1/datasets", tags=["datasets"])
    def list_datasets(me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            rows = s.execute(
                select(Dataset).where(_dataset_visible(me)).order_by(Dataset.created_at)
            ).scalars()
            return {"datasets": [_dataset_json(s, r, me) for r in rows]}

    @app.get("/v1/datasets/{dataset_id}", tags=["datasets"])
    def get_dataset(dataset_id: Annotated[str, Path(pattern=HEX32)], me: Caller) -> dict[str, Any]:
        """Metadata to any party that knows the id (a 128-bit capability: a task's creator needs the
        owner and ciphertext digest to write the manifest); the key envelope only to the owner."""
        with db.reading() as s:
            row = s.get(Dataset, dataset_id)
            if row is None:
                raise not_found(f"dataset {dataset_id}")
            return _dataset_json(s, row, me)

    # ---- functions -------------------------------------------------------------------------------
    @app.post("/v1/functions", tags=["functions"], status_code=201)
    def create_function(body: FunctionBody, me: Caller) -> JSONResponse:
        try:
            desc = mf.parse_function_descriptor(body.descriptor)
        except ConfideError as exc:
            raise _from_confide(exc) from None
        if desc.kind != "python":
            raise ApiError(
                400,
                "invalid",
                "built-in functions ship with the enclave; register only python",
                "descriptor.kind",
            )
        if desc.owner != me:
            raise ApiError(
                403,
                "forbidden",
                f"the descriptor's owner is {desc.owner or '(none)'}, not you",
                "descriptor.owner",
            )
        if (body.source is None) == (body.sealed_source is None):
            raise ApiError(
                400, "invalid", "give exactly one of source (clear) or sealed_source (confidential)", "body"
            )
        if body.source is not None:
            try:
                mf.check_function_source(desc, body.source)
            except ConfideError as exc:
                raise _from_confide(exc) from None
        else:
            try:
                base64.b64decode(str(body.sealed_source), validate=True)
            except binascii.Error:
                raise ApiError(400, "invalid", "not valid base64", "sealed_source") from None
        digest = desc.digest
        with db.transaction() as s:
            row = s.get(Function, digest)
            if row is not None:
                if (row.source, row.sealed_source) != (body.source, body.sealed_source):
                    raise ApiError(
                        409, "conflict", "function already registered with other source", f"function {digest}"
                    )
                return JSONResponse(_function_json(row), 200)
            row = Function(
                digest=digest,
                owner=desc.owner,
                registered_by=me,
                kind=desc.kind,
                name=desc.name,
                descriptor=canonical_json(desc.to_json()).decode(),
                confidential=body.sealed_source is not None,
                source=body.source,
                sealed_source=body.sealed_source,
                created_at=now(),
            )
            s.add(row)
            audit.append(
                s,
                "function.registered",
                actor=me,
                detail={"digest": digest, "name": desc.name, "confidential": row.confidential},
            )
            return JSONResponse(_function_json(row), 201)

    @app.get("/v1/functions/{digest}", tags=["functions"])
    def get_function(digest: Annotated[str, Path(pattern=HEX64)], me: Caller) -> dict[str, Any]:
        for name in mf.BUILTINS:
            desc = mf.builtin_descriptor(name)
            if desc.digest == digest:
                return {
                    "digest": digest,
                    "descriptor": desc.to_json(),
                    "confidential": False,
                    "kind": "builtin",
                    "source": mf.builtin_source(name),
                }
        with db.reading() as s:
            row = s.get(Function, digest)
            if row is None:
                raise not_found(f"function {digest}")
            return _function_json(row)

    # ---- tasks -----------------------------------------------------------------------------------
    @app.post("/v1/tasks", tags=["tasks"], status_code=201)
    def create_task(body: TaskBody, me: Caller) -> dict[str, Any]:
        try:
            manifest = mf.parse_manifest(body.manifest)
        except ConfideError as exc:
            raise _from_confide(exc) from None
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
            s.flush()
            return _task_json(s, task)

    @app.get("/v1/tasks", tags=["tasks"])
    def list_tasks(me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            rows = s.execute(
                select(Task)
                .join(TaskParticipant, TaskParticipant.task_id == Task.task_id)
                .where(TaskParticipant.party == me)
                .order_by(Task.created_at)
            ).scalars()
            return {"tasks": [_task_summary(r) for r in rows]}

    @app.get("/v1/tasks/{task_id}", tags=["tasks"])
    async def get_task(
        task_id: Annotated[str, Path(pattern=HEX32)],
        me: Caller,
        wait: Annotated[float, Query(ge=0, le=MAX_LONG_POLL_S, allow_inf_nan=False)] = 0,
        state: Annotated[str | None, Query(pattern="^(created|queued|running|succeeded|failed)$")] = None,
    ) -> dict[str, Any]:
        """With `wait` and `state`: a long poll that answers as soon as the task leaves `state` (or
        after `wait` seconds), so a client learns of completion without polling. No thread is held
        while waiting; changes made by other server processes are seen within LONG_POLL_SLICE_S."""

        def read() -> tuple[str, dict[str, Any]]:
            with db.reading() as s:
                task = _task_for(s, task_id, me)
                return task.state, _task_json(s, task)

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
            task = _task_for(s, task_id, me)
            try:
                manifest = mf.parse_manifest(task.manifest)
                approval = mf.parse_approval(body.approval)
                if approval.party != me:
                    raise ApiError(
                        403, "forbidden", f"approval is by {approval.party}, not you", "approval.party"
                    )
                mf.verify_approval(approval, manifest)
            except ConfideError as exc:
                raise _from_confide(exc) from None
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
            s.flush()
            return _task_json(s, task)

    @app.post("/v1/tasks/{task_id}/run", tags=["tasks"])
    def run(
        task_id: Annotated[str, Path(pattern=HEX32)], me: Caller, body: RunBody | None = None
    ) -> dict[str, Any]:
        with db.transaction() as s:
            task = _task_for(s, task_id, me, lock=True)
            try:
                platform.scheduler.queue(s, task, actor=me)
            except StateConflict as exc:
                raise ApiError(409, "conflict", exc.message, exc.where) from None
            result = {"task_id": task_id, "state": task.state, "run": task.runs}
        if platform.pool is not None:
            platform.pool.wake()
        log.info("task %s: queued by %s (run %d)", task_id, me, result["run"])
        return result

    # ---- audit -----------------------------------------------------------------------------------
    @app.get("/v1/tasks/{task_id}/audit", tags=["audit"])
    def task_audit(task_id: Annotated[str, Path(pattern=HEX32)], me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            _task_for(s, task_id, me)
            rows = s.execute(
                select(AuditEvent).where(AuditEvent.task_id == task_id).order_by(AuditEvent.seq)
            ).scalars()
            return {"events": [audit.as_dict(r) for r in rows]}

    @app.get("/v1/audit", tags=["audit"])
    def my_audit(
        me: Caller,
        after: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict[str, Any]:
        with db.reading() as s:
            mine = select(TaskParticipant.task_id).where(TaskParticipant.party == me)
            rows = s.execute(
                select(AuditEvent)
                .where(AuditEvent.seq > after, or_(AuditEvent.actor == me, AuditEvent.task_id.in_(mine)))
                .order_by(AuditEvent.seq)
                .limit(limit)
            ).scalars()
            return {"events": [audit.as_dict(r) for r in rows]}

    @app.get("/v1/audit/head", tags=["audit"])
    def audit_head(me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            return audit.head(s)

    return app


# ---- authorization and JSON shapes ----------------------------------------------------------------------


def _participant(me: str) -> Any:
    return select(TaskParticipant.task_id).where(TaskParticipant.party == me)


def _dataset_visible(me: str) -> Any:
    used = select(TaskInput.dataset_id).where(TaskInput.task_id.in_(_participant(me)))
    return or_(Dataset.owner == me, Dataset.dataset_id.in_(used))


def _task_for(s: Session, task_id: str, me: str, *, lock: bool = False) -> Task:
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


def _can_read_blob(s: Session, sha256: str, me: str) -> bool:
    """Uploader, owner of a dataset on it, participant of a task that reads or wrote it."""
    if s.get(BlobGrant, (sha256, me)) is not None:
        return True
    datasets = select(Dataset.dataset_id).where(Dataset.ciphertext_sha256 == sha256, _dataset_visible(me))
    if s.execute(datasets.limit(1)).first() is not None:
        return True
    outputs = select(TaskOutput.id).where(
        TaskOutput.sha256 == sha256, TaskOutput.task_id.in_(_participant(me))
    )
    return s.execute(outputs.limit(1)).first() is not None


def _dataset_json(s: Session, row: Dataset, me: str) -> dict[str, Any]:
    blob = s.get(Blob, row.ciphertext_sha256)
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


def _function_json(row: Function) -> dict[str, Any]:
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


def _task_summary(task: Task) -> dict[str, Any]:
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
    }


def _task_json(s: Session, task: Task) -> dict[str, Any]:
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
        **_task_summary(task),
        "manifest": parse_json_object(task.manifest, where=f"task {task.task_id}"),
        "message": task.message,
        "approvals": [parse_json_object(a.approval, where=f"approval by {a.party}") for a in approvals],
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


# ---- errors --------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    def handler(
        fn: Callable[[Request, Any], JSONResponse],
    ) -> Callable[[Request, Any], Awaitable[JSONResponse]]:
        async def wrapped(request: Request, exc: Any) -> JSONResponse:
            return fn(request, exc)

        return wrapped

    def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Confide-Signature"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message, exc.where), exc.status, headers=headers)

    def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5]
        ]
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return JSONResponse(error_body("invalid-request", "; ".join(parts) + more, where), 422)

    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        where = f"{request.method} {request.url.path}"
        return JSONResponse(error_body(code, str(exc.detail), where), exc.status_code)

    def confide_error(_: Request, exc: ConfideError) -> JSONResponse:
        return JSONResponse(error_body("invalid", exc.message, exc.where), 400)

    def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body(
                "internal",
                "internal error (details in the server log)",
                f"{request.method} {request.url.path}",
            ),
            500,
        )

    app.add_exception_handler(ApiError, handler(api_error))
    app.add_exception_handler(RequestValidationError, handler(validation_error))
    app.add_exception_handler(StarletteHTTPException, handler(http_error))
    app.add_exception_handler(ConfideError, handler(confide_error))
    app.add_exception_handler(Exception, handler(internal_error))
