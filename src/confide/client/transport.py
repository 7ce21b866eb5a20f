"""Signed HTTP calls to a Confide platform (the untrusted host).

Every call but the public ones carries the party's signature over method, path, time, a fresh nonce
and the body's digest (confide.client.api_auth), so the platform can authenticate the party without a
password and reject a replayed call. Nothing the platform answers is trusted beyond what the client
checks itself (evidence, signatures, digests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from confide.client.api_auth import sign_request
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


class Transport:
    def __init__(self, url: str, identity: Identity | None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # -- JSON calls ------------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, signed: bool = True) -> Any:
        content = canonical_json(body) if body is not None else b""
        headers = {"content-type": "application/json"} if body is not None else {}
        if signed:
            headers.update(self._sign(method, path, content))
        try:
            resp = self.http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise ConfideError(
                f"cannot reach the platform ({exc})", where=f"{method} {self.url}{path}"
            ) from None
        return self._json(resp, method, path)

    # -- blobs -----------------------------------------------------------------------------------
    def put_blob(self, path: Path) -> dict[str, Any]:
        """Upload a ciphertext file (streamed; the signature covers its SHA-256)."""
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(STREAM_CHUNK), b""):
                sha.update(chunk)
        headers = {"content-type": "application/octet-stream"}
        headers.update(self._sign("PUT", "/v1/blobs", None, body_sha256=sha.hexdigest()))
        with open(path, "rb") as fh:
            try:
                resp = self.http.put("/v1/blobs", content=_chunks(fh), headers=headers)
            except httpx.HTTPError as exc:
                raise ConfideError(f"upload failed ({exc})", where=str(path)) from None
        result = self._json(resp, "PUT", "/v1/blobs")
        if result.get("sha256") != sha.hexdigest():
            raise ConfideError("the platform stored a blob with another digest", where=str(path))
        return dict(result)

    def get_blob(self, sha256: str, dst: BinaryIO) -> None:
        """Download a blob and check its SHA-256 (the platform could hand back anything)."""
        path = f"/v1/blobs/{sha256}"
        headers = self._sign("GET", path, b"")
        sha = hashlib.sha256()
        with self.http.stream("GET", path, headers=headers) as resp:
            if resp.status_code != 200:
                resp.read()
                self._json(resp, "GET", path)
            for chunk in resp.iter_bytes(STREAM_CHUNK):
                sha.update(chunk)
                dst.write(chunk)
        if sha.hexdigest() != sha256:
            raise ConfideError(f"blob content does not match its digest {sha256}", where=path)

    # -- internals -------------------------------------------------------------------------------
    def _sign(
        self, method: str, path: str, body: bytes | None, *, body_sha256: str | None = None
    ) -> dict[str, str]:
        if self.identity is None:
            raise ConfideError("this call needs an identity (confide keygen)", where=f"{method} {path}")
        return sign_request(
            self.identity, method, path, body if body is not None else b"", body_sha256=body_sha256
        )

    @staticmethod
    def _json(resp: httpx.Response, method: str, path: str) -> Any:
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.is_success:
            if data is None:
                raise ConfideError(
                    f"platform sent a non-JSON reply ({resp.status_code})", where=f"{method} {path}"
                )
            return data
        err = data.get("error", {}) if isinstance(data, dict) else {}
        if not isinstance(err, dict):
            err = {}
        message = str(err.get("message") or resp.reason_phrase or "request failed")
        where = str(err.get("where") or f"{method} {path}")
        raise ApiError(
            f"platform refused ({resp.status_code}): {message}",
            where=where,
            status=resp.status_code,
            code=str(err.get("code", "")),
        )


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    yield from iter(lambda: fh.read(STREAM_CHUNK), b"")
