"""Authentication before anything else of a request is read, and a cap on JSON bodies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from confide.enclave.encoding import parse_json_object
from confide.enclave.errors import ConfideError
from confide.host.api.common import BLOB_PATH, PARTY_SCOPE_KEY
from confide.host.api.errors import ApiError, error_body
from confide.host.api.state import Platform, request_target

# ---- ASGI middleware: cap JSON bodies before anything reads them ------------------------------------


class JsonBodyLimit:
    """Reads a non-blob request body up to the cap (413 beyond it) and replays it to the app, so
    no handler ever buffers an unbounded body; a body slower than the upload limits (a chunk later
    than ``chunk_s``, all of it later than ``total_s``) is cut off with 408. Blob uploads pass
    through: their route checks the same limits, and the declaration, while they stream."""

    def __init__(self, app: ASGIApp, max_bytes: int, chunk_s: float = 60.0, total_s: float = 120.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.chunk_s = chunk_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == BLOB_PATH or _has_no_body(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        deadline = time.monotonic() + self.total_s
        while more:
            try:
                remaining = min(self.chunk_s, deadline - time.monotonic())
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):  # no extra task per chunk, unlike wait_for
                    message = await receive()
            except TimeoutError:
                response = JSONResponse(
                    error_body("timeout", f"request body too slow ({size} bytes received)", "body"),
                    408,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
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


def _has_no_body(scope: Scope) -> bool:
    """A GET, HEAD or DELETE that declares no body (neither Content-Length nor Transfer-Encoding):
    HTTP gives it none, so there is nothing to cap or time (most API calls)."""
    if scope.get("method") not in ("GET", "HEAD", "DELETE"):
        return False
    names = {name.lower() for name, _ in scope.get("headers", [])}
    return b"content-length" not in names and b"transfer-encoding" not in names


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
