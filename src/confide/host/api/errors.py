"""API errors: one JSON shape for every failure, `{"error": {"code", "message", "where"}}`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from confide.enclave.errors import ConfideError
from confide.host.api.common import log


class ApiError(Exception):
    """An answer with the error body; ``headers`` go with it (``Connection: close`` for an upload
    refused before its body was read, ``Retry-After`` for 429)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        where: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.where = where
        self.headers = dict(headers or {})


def not_found(what: str) -> ApiError:
    return ApiError(404, "not-found", f"no {what} (or not visible to you)", where=what)


def error_body(code: str, message: str, where: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "where": where}}


def from_confide(exc: ConfideError, *, status: int = 400, code: str = "invalid") -> ApiError:
    return ApiError(status, code, exc.message, exc.where)


# ---- errors --------------------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    def handler(
        fn: Callable[[Request, Any], JSONResponse],
    ) -> Callable[[Request, Any], Awaitable[JSONResponse]]:
        async def wrapped(request: Request, exc: Any) -> JSONResponse:
            return fn(request, exc)

        return wrapped

    def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = dict(exc.headers)
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Confide-Signature"
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
