"""GET /docs: the HTTP API described from the app's own route table and OpenAPI schema, as one plain
HTML page that works offline (FastAPI's own /docs and /redoc load their scripts from a CDN; both are
off). No script, no asset from anywhere: the style sheet is inline, like the status page's."""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute

from confide.host.api.routes_status import SECURITY_HEADERS
from confide.host.api.security import authenticated_party

METHODS = ("get", "post", "put", "patch", "delete")
STYLE = """
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f6f7f9}
header,main{max-width:72rem;margin:0 auto;padding:.6rem 1.2rem}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}h3{font-size:1rem;margin:0 0 .3rem}
section.op{background:#fff;border:1px solid #d7dbe3;border-radius:6px;padding:.6rem 1rem;margin:.8rem 0}
code{font:.86rem ui-monospace,"DejaVu Sans Mono",monospace;overflow-wrap:anywhere}
.m{display:inline-block;min-width:4.2rem;font-weight:700;color:#1f5fbf}
.auth{font-size:.85rem;padding:0 .4rem;border-radius:999px;background:#eef1f6;margin-left:.4rem}
.open{background:#fdf3e1}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.4rem 0}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #d7dbe3;vertical-align:top}
th{background:#eef1f6}p.d{white-space:pre-line;margin:.3rem 0}nav a{margin-right:1rem}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _signed_operations(app: FastAPI) -> set[tuple[str, str]]:
    """(METHOD, path) of every route that needs a signed request (the `Caller` dependency)."""
    out = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and any(
            dep.call is authenticated_party for dep in route.dependant.dependencies
        ):
            out |= {(m.upper(), route.path) for m in route.methods or ()}
    return out


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    kind = str(schema.get("type", "any"))
    return f"list of {_type(schema.get('items', {}))}" if kind == "array" else kind


def _operation(method: str, path: str, op: dict[str, Any], signed: bool) -> str:
    auth = (
        '<span class="auth">signed request</span>'
        if signed
        else '<span class="auth open">no key needed</span>'
    )
    out = f'<section class="op" id="{_e(op.get("operationId"))}"><h3><span class="m">{_e(method)}</span>'
    out += f"<code>{_e(path)}</code>{auth}</h3><p><strong>{_e(op.get('summary'))}</strong></p>"
    if op.get("description"):
        out += f'<p class="d">{_e(op["description"])}</p>'
    params = op.get("parameters") or []
    if params:
        rows = "".join(
            f"<tr><td><code>{_e(p.get('name'))}</code></td><td>{_e(p.get('in'))}</td>"
            f"<td>{_e(_type(p.get('schema') or {}))}</td><td>{'yes' if p.get('required') else 'no'}</td>"
            f"<td>{_e(p.get('description') or '')}</td></tr>"
            for p in params
        )
        out += (
            '<table><thead><tr><th scope="col">Parameter</th><th scope="col">In</th><th scope="col">Type</th>'
            f'<th scope="col">Required</th><th scope="col">About</th></tr></thead><tbody>{rows}</tbody></table>'
        )
    body = (op.get("requestBody") or {}).get("content") or {}
    for media, content in body.items():
        out += f"<p>Body: <code>{_e(media)}</code> {_e(_type(content.get('schema') or {}))}</p>"
    responses = ", ".join(
        f"{_e(code)} {_e(r.get('description'))}" for code, r in (op.get("responses") or {}).items()
    )
    return out + f"<p>Answers: {responses}</p></section>"


def render_docs(app: FastAPI) -> str:
    spec = app.openapi()
    signed = _signed_operations(app)
    by_tag: dict[str, list[str]] = {}
    for path, ops in spec.get("paths", {}).items():
        for method in METHODS:
            op = ops.get(method)
            if op is None:
                continue
            tag = str((op.get("tags") or ["other"])[0])
            by_tag.setdefault(tag, []).append(
                _operation(method.upper(), path, op, (method.upper(), path) in signed)
            )
    info = spec.get("info", {})
    nav = "".join(f'<a href="#tag-{_e(t)}">{_e(t)}</a>' for t in by_tag)
    sections = "".join(f'<h2 id="tag-{_e(tag)}">{_e(tag)}</h2>' + "".join(ops) for tag, ops in by_tag.items())
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>{_e(info.get('title'))} API</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{_e(info.get('title'))} API {_e(info.get('version'))}</h1>"
        f'<p class="d">{_e(info.get("description"))}</p>'
        '<p>The machine-readable description: <a href="/openapi.json">/openapi.json</a>; the objects and '
        "messages: docs/PROTOCOL.md. This page is made from the server's own route table and needs "
        f'nothing from another site.</p><nav aria-label="Groups">{nav}</nav></header><main>{sections}</main>'
        "</body></html>"
    )


def add_docs_routes(app: FastAPI) -> None:
    page: list[str] = []  # the route table does not change once the app is built: rendered once

    @app.get("/docs", tags=["operator"], response_class=HTMLResponse)
    def api_docs() -> HTMLResponse:
        """This page: every route of the API, its parameters and answers, and whether it needs a
        signed request. UNAUTHENTICATED, like /openapi.json: it describes the API, not its data."""
        if not page:
            page.append(render_docs(app))
        return HTMLResponse(page[0], headers=SECURITY_HEADERS)
