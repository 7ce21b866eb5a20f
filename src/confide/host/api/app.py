"""The FastAPI application: error handlers, body cap, authenticated routes."""

from __future__ import annotations

from fastapi import FastAPI

from confide import __version__
from confide.host.api.errors import install_error_handlers
from confide.host.api.routes_data import add_data_routes
from confide.host.api.routes_docs import add_docs_routes
from confide.host.api.routes_lists import add_list_routes
from confide.host.api.routes_public import add_public_routes
from confide.host.api.routes_status import add_status_routes
from confide.host.api.routes_tasks import add_task_routes
from confide.host.api.security import ConfideRoute, JsonBodyLimit
from confide.host.api.state import Platform


def create_app(platform: Platform) -> FastAPI:
    app = FastAPI(
        title="Confide platform",
        version=__version__,
        description=(
            "The untrusted platform of Confide (docs/PROTOCOL.md §7). Authenticated calls carry "
            "X-Confide-Party, X-Confide-Audience (the platform id of GET /v1/platform), X-Confide-Time, "
            "X-Confide-Nonce and X-Confide-Signature; uploads also X-Confide-Content-Length and "
            "X-Confide-Content-SHA256."
        ),
        # A signed request cannot follow a redirect (the signature covers the path): a path with a
        # stray trailing slash is a plain 404 with the error body, not a 307 without one.
        redirect_slashes=False,
        # FastAPI's Swagger UI and ReDoc load their scripts from a CDN: /docs is our own page instead
        docs_url=None,
        redoc_url=None,
    )
    app.router.route_class = ConfideRoute
    app.state.platform = platform
    limits = platform.uploads
    app.add_middleware(
        JsonBodyLimit,
        max_bytes=platform.max_json_bytes,
        chunk_s=limits.timeout_s,
        total_s=limits.deadline_s(platform.max_json_bytes),
    )
    install_error_handlers(app)

    add_public_routes(app, platform)
    add_data_routes(app, platform)
    add_task_routes(app, platform)
    add_list_routes(app, platform)
    add_status_routes(app, platform)  # GET /status and /metrics, unauthenticated
    add_docs_routes(app)  # GET /docs, unauthenticated, offline
    return app
