"""HTTP/1.1 to the platform with the standard library's `http.client`: one kept-alive connection.

The client makes a few small JSON calls and streams blobs; it needs no connection pool, HTTP/2 or
async. `http.client` parses the protocol (principle 3: no hand-written parser) and imports in a
fraction of httpx's time, which every `confide` command pays at start-up.

A kept-alive connection the server has closed since its last use (its idle timeout) is noticed when
the next request gets no answer; that request is sent once more on a new connection. Callers build
each attempt's headers afresh (`headers` is a function), so a signed request is signed again with a
new nonce rather than replayed.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Body = bytes | Callable[[], Iterable[bytes]] | None
STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class HttpError(Exception):
    """No (complete) answer: connection refused or cut, timeout, a reply that is not HTTP."""


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    body: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.body)


class Connection:
    """Requests to one base URL (``http://host:port[/prefix]`` or ``https://...``, where the server's
    certificate is verified against the system's CA bundle)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self, method: str, path: str, *, body: Body = None, headers: Callable[[], dict[str, str]]
    ) -> Reply:
        with self.stream(method, path, body=body, headers=headers) as (resp, _chunks):
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise HttpError(_describe(exc)) from None
            return Reply(resp.status, resp.reason, data)

    @contextmanager
    def stream(
        self, method: str, path: str, *, body: Body = None, headers: Callable[[], dict[str, str]]
    ) -> Iterator[tuple[http.client.HTTPResponse, Callable[[int], Iterator[bytes]]]]:
        """The response, and a function giving its body in chunks of at most n bytes."""
        resp = self._send(method, path, body, headers)

        def chunks(n: int) -> Iterator[bytes]:
            try:
                while chunk := resp.read(n):
                    yield chunk
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise HttpError(_describe(exc)) from None

        try:
            yield resp, chunks
        finally:
            if resp.will_close or not resp.isclosed():  # unread body or server closing: a new one next
                self.close()

    def _send(
        self, method: str, path: str, body: Body, headers: Callable[[], dict[str, str]]
    ) -> http.client.HTTPResponse:
        for attempt in (1, 2):
            fields = headers()  # first: signing may itself make a call (the platform id) on this connection
            content = body() if callable(body) else body
            reused = self._conn is not None
            conn = self._conn or self._connect()
            self._conn = conn
            try:
                try:
                    conn.request(method, self.prefix + path, body=content, headers=fields)
                except STALE:
                    # the server may have answered before reading the whole body (a refused upload):
                    # its answer says why; no answer at all means the connection was stale
                    return conn.getresponse()
                return conn.getresponse()
            except STALE as exc:
                self.close()
                if reused and attempt == 1:
                    continue  # closed by the server while idle: once more, on a new connection
                raise HttpError(_describe(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise HttpError(_describe(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> http.client.HTTPConnection:
        if not self.https:
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        import ssl  # only for https: loading the CA bundle costs ~20 ms of start-up

        context = ssl.create_default_context()
        return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=context)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
