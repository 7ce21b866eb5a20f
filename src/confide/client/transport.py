"""Signed HTTP calls to a Confide platform (the untrusted host).

Every call but the public ones carries the party's signature over the platform's id (the audience,
from ``GET /v1/platform``), method, path, time, a fresh nonce and the body's length and digest
(confide.client.api_auth), so the platform can authenticate the party without a password, reject a
replayed call, and refuse a call signed for another platform. Nothing the platform answers is
trusted beyond what the client checks itself (evidence, signatures, digests).

The platform id is announced by the platform itself, unauthenticated: it stops a request captured
at one platform (its logs, a proxy) from being replayed to another, but a hostile platform could
announce another platform's id. Pin it (``Transport(..., platform_id=...)``) where that matters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from confide.client.api_auth import check_platform_id, sign_request
from confide.client.http import Connection, HttpError, Reply
from confide.enclave.encoding import canonical_json
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity

STREAM_CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 60.0


class ApiError(ConfideError):
    """The platform refused a call; carries its HTTP status and error code."""

    def __init__(self, message: str, *, where: str, status: int, code: str) -> None:
        super().__init__(message, where=where)
        self.status = status
        self.code = code


class Unreachable(ConfideError):
    """The call did not get an answer from the platform (connection refused or cut, timeout)."""


class Transport:
    def __init__(
        self,
        url: str,
        identity: Identity | None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        platform_id: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        try:
            self.http = Connection(self.url, timeout=timeout)
        except ValueError as exc:
            raise ConfideError(str(exc), where="platform URL") from None
        self.pinned = check_platform_id(platform_id, where="platform_id") if platform_id is not None else None
        self._platform_id: str | None = None

    @property
    def platform_id(self) -> str:
        """The audience this client's requests are signed for: the id the platform announces at
        ``GET /v1/platform`` (fetched once), which must equal the pinned one when there is one."""
        if self._platform_id is None:
            info = self.call("GET", "/v1/platform", signed=False)
            announced = info.get("platform_id") if isinstance(info, dict) else None
            where = f"GET {self.url}/v1/platform"
            check_platform_id(announced if isinstance(announced, str) else "", where=where)
            if self.pinned is not None and announced != self.pinned:
                raise ConfideError(
                    f"the platform announces id {announced}, not the pinned {self.pinned}", where=where
                )
            self._platform_id = str(announced)
        return self._platform_id

    def close(self) -> None:
        self.http.close()

    # -- JSON calls ------------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, signed: bool = True) -> Any:
        content = canonical_json(body) if body is not None else b""

        def headers() -> dict[str, str]:  # per attempt: a retried call is signed afresh
            h = {"content-type": "application/json"} if body is not None else {}
            if signed:
                h.update(self._sign(method, path, content))
            return h

        try:
            resp = self.http.request(method, path, body=content, headers=headers)
        except HttpError as exc:
            raise Unreachable(
                f"cannot reach the platform ({exc})", where=f"{method} {self.url}{path}"
            ) from None
        return self._json(resp, method, path)

    # -- blobs -----------------------------------------------------------------------------------
    def put_blob(self, path: Path) -> dict[str, Any]:
        """Upload a ciphertext file, streamed. The signed headers declare its length and SHA-256, so
        the platform authenticates the upload (and checks size, quota, upload slots) before it reads
        the body, and refuses a body that differs from the declaration."""
        sha = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(STREAM_CHUNK), b""):
                sha.update(chunk)
                size += len(chunk)

        def headers() -> dict[str, str]:
            h = {"content-type": "application/octet-stream", "content-length": str(size)}
            h.update(self._sign("PUT", "/v1/blobs", None, body_sha256=sha.hexdigest(), body_length=size))
            return h

        try:
            resp = self.http.request("PUT", "/v1/blobs", body=lambda: _chunks(path), headers=headers)
        except (HttpError, OSError) as exc:
            raise ConfideError(f"upload failed ({exc})", where=str(path)) from None
        result = self._json(resp, "PUT", "/v1/blobs")
        if result.get("sha256") != sha.hexdigest():
            raise ConfideError("the platform stored a blob with another digest", where=str(path))
        return dict(result)

    def get_blob(self, sha256: str, dst: BinaryIO) -> None:
        """Download a blob and check its SHA-256 (the platform could hand back anything)."""
        path = f"/v1/blobs/{sha256}"
        sha = hashlib.sha256()
        try:
            with self.http.stream("GET", path, headers=lambda: self._sign("GET", path, b"")) as (
                resp,
                chunks,
            ):
                if resp.status != 200:
                    self._json(Reply(resp.status, resp.reason, resp.read()), "GET", path)
                for chunk in chunks(STREAM_CHUNK):
                    sha.update(chunk)
                    dst.write(chunk)
        except HttpError as exc:
            raise Unreachable(f"download cut short ({exc})", where=path) from None
        if sha.hexdigest() != sha256:
            raise ConfideError(f"blob content does not match its digest {sha256}", where=path)

    # -- internals -------------------------------------------------------------------------------
    def _sign(
        self,
        method: str,
        path: str,
        body: bytes | None,
        *,
        body_sha256: str | None = None,
        body_length: int | None = None,
    ) -> dict[str, str]:
        if self.identity is None:
            raise ConfideError("this call needs an identity (confide keygen)", where=f"{method} {path}")
        return sign_request(
            self.identity,
            method,
            path,
            body if body is not None else b"",
            audience=self.platform_id,
            body_sha256=body_sha256,
            body_length=body_length,
        )

    @staticmethod
    def _json(resp: Reply, method: str, path: str) -> Any:
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.is_success:
            if data is None:
                raise ConfideError(
                    f"platform sent a non-JSON reply ({resp.status})", where=f"{method} {path}"
                )
            return data
        err = data.get("error", {}) if isinstance(data, dict) else {}
        if not isinstance(err, dict):
            err = {}
        message = str(err.get("message") or resp.reason or "request failed")
        where = str(err.get("where") or f"{method} {path}")
        raise ApiError(
            f"platform refused ({resp.status}): {message}",
            where=where,
            status=resp.status,
            code=str(err.get("code", "")),
        )


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from iter(lambda: fh.read(STREAM_CHUNK), b"")
