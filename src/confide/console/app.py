"""The console's Starlette app: the routes, and the `Console` that holds the party's `Client`.

Pages are plain functions of (console, request) returning HTML; they run in Starlette's thread
pool, one at a time (the client keeps one connection to the platform), and every Confide error
becomes a page that says what was refused and where, never a traceback."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from confide.console.forms import Form
from confide.console.html import Frame, notice, page
from confide.console.security import Guard, GuardMiddleware
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.sdk import Client
    from confide.client.transport import Transport
    from confide.enclave.manifest import Manifest

TASK_ID_RE = re.compile(r"[0-9a-f]{32}")
FOLLOW_WAIT_S = 10.0  # one long poll of a task page that follows a running task
Handler = Callable[["Console", Request], Response | str]


class Console:
    """One party's console: its client (and key), the launch's secrets, where results go."""

    def __init__(self, client: Client, guard: Guard, *, results_dir: Path) -> None:
        self.client = client
        self.guard = guard
        self.results_dir = Path(results_dir)
        self.lock = threading.Lock()
        self._name: str | None = None
        self.name_error = ""
        self._manifests: dict[str, Manifest] = {}  # a task id's manifest never changes: parsed once
        self._sources: dict[str, str | None] = {}  # a digest's source never changes: checked once
        self._follow_lock = threading.Lock()
        self._follower: Transport | None = None

    def party_name(self) -> str | None:
        """The name the platform has for this party; None while it does not know this key (then
        `name_error` says what the platform answered)."""
        if self._name is None:
            try:
                self._name = str(self.client.whoami().get("name") or "")
            except ConfideError as exc:
                self.name_error = f"{exc.message} ({exc.where})" if exc.where else exc.message
                return None
        return self._name

    def forget_name(self) -> None:
        self._name = None

    def frame(self, request: Request) -> Frame:
        name = self.party_name()
        try:
            simulated: bool | None = self.client.service.claims.simulated
        except ConfideError:
            simulated = None
        shown = name if name is not None else "(not registered)"
        return Frame(shown, self.client.fingerprint, simulated, str(request.state.csrf))

    def manifest(self, task_id: str) -> Manifest:
        """The task's manifest, checked by `Client.manifest` (for display: approving fetches and
        checks it again, against the digest the page showed)."""
        known = self._manifests.get(task_id)
        if known is None:
            known = self._manifests[task_id] = self.client.manifest(task_id)
        return known

    def function_source(self, digest: str) -> str | None:
        """A function's source, checked by `Client.function_source` against the digest the manifest
        pins; None for a confidential function (sealed to the enclave)."""
        if digest not in self._sources:
            self._sources[digest] = self.client.function_source(digest)[2]
        return self._sources[digest]

    def follow(self, task_id: str, state: str, *, wait_s: float = FOLLOW_WAIT_S) -> None:
        """Return when the task leaves `state`, or after `wait_s` (the platform's long poll), on a
        signed connection of its own: the other pages do not wait for it."""
        from urllib.parse import quote

        from confide.client.transport import Transport

        with self._follow_lock:
            if self._follower is None:
                self._follower = Transport(self.client.api.url, self.client.identity, timeout=wait_s + 30)
            self._follower.call("GET", f"/v1/tasks/{task_id}?wait={wait_s:.1f}&state={quote(state)}")

    def close(self) -> None:
        """Close the follower's connection (the client belongs to whoever made it)."""
        with self._follow_lock:
            if self._follower is not None:
                self._follower.close()
                self._follower = None

    def task_dir(self, task_id: str) -> Path:
        return self.results_dir / task_id


def form_of(request: Request) -> Form:
    """The POSTed form, parsed and CSRF-checked by the guard."""
    form = getattr(request.state, "form", None)
    if not isinstance(form, Form):
        raise ConfideError("no form", where="request")
    return form


def task_id_of(request: Request) -> str:
    task_id = str(request.path_params.get("task_id", ""))
    if not TASK_ID_RE.fullmatch(task_id):
        raise ConfideError("not a task id (32 hex digits)", where=f"task {task_id[:40]!r}")
    return task_id


def error_page(console: Console, request: Request, exc: ConfideError) -> HTMLResponse:
    where = f" ({exc.where})" if exc.where else ""
    body = notice(f"error: {exc.message}{where}", kind="error")
    body += '<p><a href="/">Back to the inbox</a></p>'
    try:
        frame = console.frame(request)
    except ConfideError:
        frame = Frame("?", console.client.fingerprint, None, str(request.state.csrf))
    return HTMLResponse(page(frame, "Refused", body), status_code=400)


def _endpoint(
    console: Console, handler: Handler, before: Callable[[Console, Request], None] | None = None
) -> Callable[[Request], Response]:
    """`handler` under the console's lock; `before` first, outside it (a long poll)."""

    def endpoint(request: Request) -> Response:
        if before is not None:
            before(console, request)
        with console.lock:
            try:
                result = handler(console, request)
            except ConfideError as exc:
                return error_page(console, request, exc)
        return HTMLResponse(result) if isinstance(result, str) else result

    return endpoint


STATIC = {"console.css": "text/css", "upload.js": "text/javascript"}  # every file a page may load


def static(_console: Console, request: Request) -> Response:
    name = str(request.path_params.get("name", ""))
    media = STATIC.get(name)
    if media is None:
        return Response("not found", status_code=404, media_type="text/plain")
    data = resources.files("confide.console").joinpath("static", name).read_bytes()
    return Response(data, media_type=media, headers={"cache-control": "no-store"})


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def create_app(console: Console) -> Starlette:
    from confide.console import pages, task_pages

    before: dict[Handler, Callable[[Console, Request], None]] = {task_pages.task_page: task_pages.follow}
    routes: list[tuple[str, Handler, tuple[str, ...]]] = [
        ("/", task_pages.inbox, ("GET",)),
        ("/register", pages.register, ("POST",)),
        ("/tasks/new", task_pages.new_task, ("GET", "POST")),
        ("/tasks/{task_id}", task_pages.task_page, ("GET",)),
        ("/tasks/{task_id}/approve", task_pages.approve, ("POST",)),
        ("/tasks/{task_id}/reject", task_pages.reject, ("POST",)),
        ("/tasks/{task_id}/run", task_pages.run, ("POST",)),
        ("/tasks/{task_id}/cancel", task_pages.cancel, ("POST",)),
        ("/tasks/{task_id}/withdraw", task_pages.withdraw, ("POST",)),
        ("/tasks/{task_id}/results", task_pages.results, ("GET",)),
        ("/tasks/{task_id}/results/{name}", task_pages.download, ("GET",)),
        ("/service", pages.service, ("GET",)),
        ("/datasets", pages.datasets, ("GET", "POST")),
        ("/functions", pages.functions, ("GET", "POST")),
        ("/audit", pages.audit, ("GET",)),
        ("/static/{name}", static, ("GET",)),
    ]
    app = Starlette(
        routes=[
            Route(path, _endpoint(console, h, before.get(h)), methods=list(methods))
            for path, h, methods in routes
        ]
    )
    app.add_middleware(GuardMiddleware, guard=console.guard)
    return app


def serve(console: Console, sock: Any, *, log_level: str = "warning") -> None:
    """Serve on an already bound socket (127.0.0.1) until interrupted."""
    import uvicorn

    config = uvicorn.Config(create_app(console), log_level=log_level, access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
