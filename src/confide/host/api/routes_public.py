"""Public routes: health, the platform id and limits, the enclave service and its evidence, party
registration."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path
from fastapi.responses import JSONResponse

from confide.client import api_auth
from confide.enclave.errors import ConfideError
from confide.host import audit
from confide.host.api.bodies import EvidenceBody, RegisterBody
from confide.host.api.common import HEX64, log
from confide.host.api.errors import ApiError, from_confide, not_found
from confide.host.api.state import Platform
from confide.host.db import Evidence, Party, now
from confide.host.pool import ServiceUnavailable


def add_public_routes(app: FastAPI, platform: Platform) -> None:
    db = platform.db

    @app.get("/v1/health", tags=["service"])
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/v1/platform", tags=["service"])
    def platform_info() -> dict[str, Any]:
        """The platform id every signed request names (its audience), and the upload limits."""
        limits = platform.uploads
        return {
            "platform_id": platform.platform_id,
            "scheme": api_auth.SCHEME,
            "uploads": {
                "max_blob_bytes": platform.blobs.max_bytes,
                "quota_bytes": limits.quota_bytes,
                "max_concurrent": limits.max_concurrent,
                "max_concurrent_per_party": limits.max_concurrent_per_party,
                "timeout_s": limits.timeout_s,
                "min_bytes_per_s": limits.min_rate,
            },
        }

    @app.get("/v1/service", tags=["service"])
    def service() -> dict[str, Any]:
        if platform.pool is None:
            return {"service": None, "fingerprint": None, "workers": [], "platform_id": platform.platform_id}
        return {**platform.pool.describe(), "platform_id": platform.platform_id}

    @app.post("/v1/service/evidence", tags=["service"])
    def service_evidence(body: EvidenceBody) -> dict[str, Any]:
        if platform.pool is None:
            raise ApiError(503, "unavailable", "this server runs no enclave workers", "service")
        try:
            evidence, line = platform.pool.evidence(body.nonce)
        except ServiceUnavailable as exc:
            raise from_confide(exc, status=503, code="unavailable") from None
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
            raise from_confide(exc) from None
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
