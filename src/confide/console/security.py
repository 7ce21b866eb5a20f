"""Who may use the console, from where, and how: the checks every request passes before a page runs.

- **Host** must be ``127.0.0.1:PORT`` or ``localhost:PORT``: a page of another site whose DNS name
  is rebound to 127.0.0.1 sends its own name and is refused (400).
- **The launch token** (random per launch, in the URL `confide ui` prints) is exchanged once for a
  session cookie (HttpOnly, SameSite=Strict, named after the port: browsers do not separate cookies
  by port); without a valid cookie or token every request is refused (403).
- **State changes** are POSTs only, and each is refused (403) when the browser says it comes from
  another site (``Sec-Fetch-Site: cross-site`` or ``same-site``: another port of 127.0.0.1 is the
  same site), when its ``Origin`` is not this console's (``null``, which browsers send under
  ``no-referrer``, only with ``Sec-Fetch-Site: same-origin``), or when its form lacks the CSRF token
  bound to the session. The form is parsed here, once, and handed to the page as ``request.state.form``.
- **Every answer** carries a Content-Security-Policy of ``default-src 'self'``, ``X-Frame-Options:
  DENY``, ``Referrer-Policy: no-referrer``, ``nosniff`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import parse_qsl, quote

from confide.console.forms import MAX_BODY_BYTES, Form, parse_form
from confide.enclave.errors import ConfideError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_PARAM = "token"
CSRF_FIELD = "csrf"
SAFE_METHODS = ("GET", "HEAD")
FOREIGN_FETCH_SITES = ("cross-site", "same-site")

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


@dataclass(frozen=True)
class Guard:
    """The secrets of one launch: the token in the launch URL and the key that makes session
    cookies and CSRF tokens (both random, neither ever written to disk)."""

    port: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset({f"127.0.0.1:{self.port}", f"localhost:{self.port}"})

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(f"http://{h}" for h in self.hosts)

    @property
    def cookie(self) -> str:
        return f"confide_console_{self.port}"

    @property
    def launch_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?{TOKEN_PARAM}={self.token}"

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self.key, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._mac('session', nonce)}"

    def session_ok(self, value: str | None) -> bool:
        if not value or value.count(".") != 1:
            return False
        nonce, mac = value.split(".")
        return hmac.compare_digest(mac, self._mac("session", nonce))

    def token_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())

    def csrf_token(self, session: str) -> str:
        return self._mac("csrf", session)

    def csrf_ok(self, session: str, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.csrf_token(session).encode())


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        if name in out and name != "cookie":
            out[name] = "\0duplicate"  # a repeated Host or Origin is nobody's: refused below
        else:
            value = raw_value.decode("latin-1")
            out[name] = f"{out[name]}; {value}" if name in out else value
    return out


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in out:
            out[name] = value
    return out


def refusal_page(status: int, title: str, why: str) -> bytes:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>"
        f"{escape(title)} - Confide console</title></head><body><main><h1>{escape(title)}</h1>"
        f"<p>{escape(why)}</p></main></body></html>"
    ).encode()


class GuardMiddleware:
    """The checks of this module's docstring, in front of the console's pages."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets: nothing passes the guard unchecked
            await send({"type": "websocket.close", "code": 1008})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                given = {bytes(k).lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in given
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self._guarded(scope, receive, send_with_headers)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        g = self.guard
        headers = _headers(scope)
        if headers.get("host") not in g.hosts:
            await _refuse(
                send,
                400,
                "Wrong host name",
                f"this console answers only as 127.0.0.1:{g.port} or localhost:{g.port} "
                "(another name could be a DNS rebinding attack)",
            )
            return
        method = scope["method"]
        if method not in (*SAFE_METHODS, "POST"):
            await _refuse(send, 405, "Method not allowed", f"{method} is not used by this console")
            return
        session = _cookies(headers.get("cookie", "")).get(g.cookie)
        if not g.session_ok(session):
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if method == "GET" and g.token_ok(query.get(TOKEN_PARAM)):
                await _start_session(send, g, scope.get("path", "/"))
                return
            await _refuse(
                send,
                403,
                "Not signed in",
                "open the URL with the token that `confide ui` printed when it started",
            )
            return
        assert session is not None
        state = scope.setdefault("state", {})
        state["session"] = session
        state["csrf"] = g.csrf_token(session)
        if method == "POST":
            form = await self._checked_form(scope, receive, send, headers, session)
            if form is None:
                return
            state["form"] = form
            receive = _empty_body
        await self.app(scope, receive, send)

    async def _checked_form(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], session: str
    ) -> Form | None:
        g = self.guard
        site = headers.get("sec-fetch-site", "")
        if site in FOREIGN_FETCH_SITES:
            await _refuse(send, 403, "Refused", f"a state change from another site ({site}) is refused")
            return None
        origin = headers.get("origin")
        # Under Referrer-Policy: no-referrer a browser sends `Origin: null` even for its own forms;
        # then its Fetch Metadata (which no page can set) must say same-origin.
        vouched = origin == "null" and site == "same-origin"
        if origin is not None and origin not in g.origins and not vouched:
            await _refuse(send, 403, "Refused", "a state change from another origin is refused")
            return None
        try:
            body = await _read_body(receive)
            form = parse_form(headers.get("content-type", ""), body)
        except ConfideError as exc:
            await _refuse(send, 400, "Bad form", exc.message)
            return None
        if not g.csrf_ok(session, form.fields.get(CSRF_FIELD)):
            await _refuse(send, 403, "Refused", "the form's CSRF token is missing or not this session's")
            return None
        return form


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConfideError("the browser went away during the upload", where="request body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ConfideError(
                f"the form is over {MAX_BODY_BYTES >> 20} MiB (use `confide dataset upload` for larger files)",
                where="request body",
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _empty_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _refuse(send: Send, status: int, title: str, why: str) -> None:
    body = refusal_page(status, title, why)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _start_session(send: Send, g: Guard, path: str) -> None:
    """Exchange the launch token for a session cookie, and drop the token from the address bar."""
    cookie = f"{g.cookie}={g.new_session()}; Path=/; HttpOnly; SameSite=Strict"
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (
                    b"location",
                    quote(path if path.startswith("/") and not path.startswith("//") else "/").encode(),
                ),
                (b"set-cookie", cookie.encode()),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
