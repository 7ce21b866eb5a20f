"""GET /docs: the API described offline, from the server's own route table (FastAPI's Swagger UI and
ReDoc, which load their scripts from a CDN, are off): every operation of /openapi.json is on the
page with its parameters, the signed ones marked as such, nothing refers to another site, and the
page runs no script."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from confide.host.api import Platform, create_app
from confide.host.blobstore import BlobStore
from confide.host.db import Database, sqlite_url
from confide.host.scheduler import Scheduler


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    db = Database(sqlite_url(tmp_path / "confide.db"))
    db.migrate()
    blobs = BlobStore(tmp_path / "blobs")
    with TestClient(
        create_app(Platform(db=db, blobs=blobs, scheduler=Scheduler(db, blobs, lease_seconds=60)))
    ) as client:
        yield client
    db.dispose()


def test_docs_page_lists_every_operation_offline(http: TestClient) -> None:
    r = http.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': no script
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    page = r.text
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "an asset from another site"
    spec = http.get("/openapi.json").json()
    ops = [(m.upper(), p) for p, o in spec["paths"].items() for m in o]
    assert len(ops) > 20
    for method, path in ops:
        assert f'<span class="m">{method}</span><code>{path}</code>' in page, (method, path)
    # the signed ones are marked, the open ones too
    assert '<code>/v1/tasks/{task_id}/run</code><span class="auth">signed request</span>' in page
    assert '<code>/v1/health</code><span class="auth open">no key needed</span>' in page
    assert "<code>wait</code></td><td>query</td>" in page  # a parameter of GET /v1/tasks/{task_id}
    for cdn_page in ("/redoc", "/docs/oauth2-redirect"):
        assert http.get(cdn_page).status_code == 404
