"""Routes for parties, blobs, datasets and functions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from confide.client import api_auth
from confide.enclave import manifest as mf
from confide.enclave.encoding import canonical_json
from confide.enclave.errors import ConfideError
from confide.enclave.keys import PublicIdentity
from confide.host import audit
from confide.host.api.bodies import DatasetBody, FunctionBody
from confide.host.api.common import BLOB_PATH, FINGERPRINT, HEX32, HEX64
from confide.host.api.errors import ApiError, from_confide, not_found
from confide.host.api.security import Caller
from confide.host.api.state import Platform, request_target
from confide.host.api.views import can_read_blob, dataset_json, dataset_visible, function_json
from confide.host.blobstore import BlobTooLarge, BlobWriter
from confide.host.db import Blob, BlobGrant, Dataset, Function, Party, insert_ignore, now


async def _receive_declared(
    request: Request, writer: BlobWriter, declared: api_auth.DeclaredBody, chunk_s: float, total_s: float
) -> None:
    """Stream the body into `writer`, refusing it as soon as it differs from the declaration (longer,
    shorter, another digest) or comes too slowly (a chunk later than `chunk_s`, or all of it later
    than `total_s`: 408)."""
    close = {"Connection": "close"}
    start = time.monotonic()
    deadline = start + total_s
    received = 0
    more = True
    while more:
        remaining = min(chunk_s, deadline - time.monotonic())
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(request.receive(), remaining)
        except TimeoutError:
            raise ApiError(
                408,
                "timeout",
                f"upload too slow: {received} of {declared.length} bytes in {time.monotonic() - start:.1f} s "
                f"(limits: {chunk_s:g} s per chunk, {total_s:.1f} s in all)",
                "body",
                headers=close,
            ) from None
        if message["type"] == "http.disconnect":
            raise ApiError(
                400, "incomplete", "the client went away before the body ended", "body", headers=close
            )
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > declared.length:
            raise ApiError(
                400,
                "invalid",
                f"body is longer than the signed declaration ({declared.length} bytes)",
                "body",
                headers=close,
            )
        if chunk:
            await run_in_threadpool(writer.write, chunk)
        more = bool(message.get("more_body"))
    if received != declared.length:
        raise ApiError(
            400,
            "invalid",
            f"body is {received} bytes, the signed declaration says {declared.length}",
            "body",
            headers=close,
        )
    if writer.sha256 != declared.sha256:
        raise ApiError(
            400,
            "invalid",
            f"body has SHA-256 {writer.sha256}, the signed declaration says {declared.sha256}",
            "body",
            headers=close,
        )


def add_data_routes(app: FastAPI, platform: Platform) -> None:
    db = platform.db

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
        """Store ciphertext. The signed headers declare the body's length and SHA-256
        (``X-Confide-Content-Length``, ``X-Confide-Content-SHA256``): the request is authenticated,
        and the size cap, the party's quota and the upload slots are checked, before a byte of
        the body is read or anything is written. The body is then streamed to a temporary file,
        checked against the declaration as it comes (no longer than declared, the digest at the
        end) and within the time limit; it is published only if it matches, else nothing is kept.
        Every refusal closes the connection (``Connection: close``): an unread body is not drained."""
        close = {"Connection": "close"}
        try:
            api_auth.parse_headers(request.headers)  # the headers' own errors first, then the body's
            declared = api_auth.parse_declared_body(request.headers)
        except api_auth.AuthError as exc:
            raise ApiError(401, "unauthenticated", exc.message, exc.where, headers=close) from None
        try:
            party = await run_in_threadpool(
                platform.authenticate, request.headers, request.method, request_target(request), b"", declared
            )
        except ApiError as exc:
            exc.headers.update(close)
            raise
        sent = request.headers.get("content-length")
        if sent is not None and sent.strip() != str(declared.length):
            raise ApiError(
                400,
                "invalid",
                f"Content-Length {sent[:24]} differs from the signed declaration ({declared.length} bytes)",
                "Content-Length",
                headers=close,
            )
        if declared.length > platform.blobs.max_bytes:
            raise ApiError(
                413,
                "too-large",
                f"blob of {declared.length} bytes exceeds the {platform.blobs.max_bytes}-byte limit",
                api_auth.HEADER_CONTENT_LENGTH,
                headers=close,
            )
        slots, limits = platform.upload_slots, platform.uploads
        busy = {**close, "Retry-After": "1"}
        if slots.running >= limits.max_concurrent:
            raise ApiError(
                429,
                "too-many-uploads",
                f"{slots.running} uploads in progress on this server (limit {limits.max_concurrent}); retry later",
                "PUT /v1/blobs",
                headers=busy,
            )
        if slots.per_party.get(party, 0) >= limits.max_concurrent_per_party:
            raise ApiError(
                429,
                "too-many-uploads",
                f"{slots.per_party[party]} uploads of yours in progress "
                f"(limit {limits.max_concurrent_per_party} per party); retry later",
                api_auth.HEADER_PARTY,
                headers=busy,
            )
        slots.take(party, 0)  # no await between the checks above and this
        reserved = 0
        writer: BlobWriter | None = None
        try:
            before = slots.reserved.get(party, 0)
            owned = await run_in_threadpool(platform.has_grant, party, declared.sha256)
            cost = 0 if owned else declared.length  # the same bytes again cost nothing
            used = await run_in_threadpool(platform.storage_used, party)
            # an upload of ours that committed meanwhile is in `used` or still in `before`
            in_flight = max(before, slots.reserved.get(party, 0))
            if used + in_flight + cost > limits.quota_bytes:
                raise ApiError(
                    413,
                    "quota-exceeded",
                    f"storage quota of {limits.quota_bytes} bytes exceeded: {used} bytes stored, "
                    f"{in_flight} in uploads in progress, this upload {cost}",
                    api_auth.HEADER_CONTENT_LENGTH,
                    headers=close,
                )
            slots.reserved[party] = slots.reserved.get(party, 0) + cost
            reserved = cost
            writer = await run_in_threadpool(platform.blobs.writer)
            await _receive_declared(
                request, writer, declared, limits.timeout_s, limits.deadline_s(declared.length)
            )
            sha, size = await run_in_threadpool(writer.commit, declared.sha256)

            def record() -> None:
                with db.transaction() as s:
                    insert_ignore(s, Blob, sha256=sha, size=size, created_at=now())
                    insert_ignore(s, BlobGrant, sha256=sha, party=party)

            await run_in_threadpool(record)
        except BlobTooLarge as exc:
            raise ApiError(413, "too-large", exc.message, "body", headers=close) from None
        finally:
            if writer is not None:
                writer.abort()  # no-op once committed; otherwise the temporary file goes
            slots.give_back(party, reserved)
        return {"sha256": sha, "size": size}

    @app.get(
        "/v1/blobs/{sha256}",
        tags=["blobs"],
        response_class=FileResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def get_blob(sha256: Annotated[str, Path(pattern=HEX64)], me: Caller) -> FileResponse:
        with db.reading() as s:
            if not can_read_blob(s, sha256, me):
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
            raise from_confide(exc) from None
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
            if s.get(BlobGrant, (body.ciphertext_sha256, me)) is None:  # only on ciphertext one uploaded
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
            return dataset_json(s, row, me)

    @app.get("/v1/datasets", tags=["datasets"])
    def list_datasets(me: Caller) -> dict[str, Any]:
        with db.reading() as s:
            rows = s.execute(
                select(Dataset).where(dataset_visible(me)).order_by(Dataset.created_at)
            ).scalars()
            return {"datasets": [dataset_json(s, r, me) for r in rows]}

    @app.get("/v1/datasets/{dataset_id}", tags=["datasets"])
    def get_dataset(dataset_id: Annotated[str, Path(pattern=HEX32)], me: Caller) -> dict[str, Any]:
        """Metadata to any party that knows the id (a 128-bit capability: a task's creator needs the
        owner and ciphertext digest to write the manifest); the key envelope only to the owner."""
        with db.reading() as s:
            row = s.get(Dataset, dataset_id)
            if row is None:
                raise not_found(f"dataset {dataset_id}")
            return dataset_json(s, row, me)

    # ---- functions -------------------------------------------------------------------------------
    @app.post("/v1/functions", tags=["functions"], status_code=201)
    def create_function(body: FunctionBody, me: Caller) -> JSONResponse:
        try:
            desc = mf.parse_function_descriptor(body.descriptor)
        except ConfideError as exc:
            raise from_confide(exc) from None
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
                raise from_confide(exc) from None
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
                return JSONResponse(function_json(row), 200)
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
            return JSONResponse(function_json(row), 201)

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
            return function_json(row)
