"""The operator's status page (GET /status) and GET /metrics of a real `confide serve`: the figures
follow the tasks (queue depth, tasks per state, throughput, failures by category), /metrics parses
with prometheus_client's parser, a curious outsider without a key reads neither party data nor
secrets in them, and Debian's Chromium (driven by Playwright) renders the page without asking any
other origin for anything."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from confide.host.api import Platform, create_app
from confide.host.blobstore import BlobStore
from confide.host.db import Database, Task, TaskRun, now, sqlite_url
from confide.host.db import Party as PartyRow
from confide.host.scheduler import Scheduler
from platform_support import (
    FAILING,
    PATIENTS,
    UPPER,
    Party,
    ServerProcess,
    approve,
    create_task,
    register_function,
    service_key,
    upload_dataset,
    wait_task,
)

CHROMIUM = Path("/usr/bin/chromium")
SECRET_PARAM = "param-value-7f3a9c"
DATASET_NAME = "cohort-name-41d2e0"


class World:
    """A hospital owns the data; a lab owns the functions, creates the tasks and receives the output."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.hospital = Party(server.url, "st-elsewhere-hospital").register()
        self.lab = Party(server.url, "acme-research-lab").register()
        self.service = service_key(self.hospital)
        self.upper = register_function(self.lab, UPPER, name="upper-secret-fn")
        self.failing = register_function(self.lab, FAILING, name="failing-secret-fn")
        self.secrets: list[str] = []  # what must never appear on the status page or /metrics
        self.secrets += [self.hospital.name, self.lab.name, self.hospital.fp, self.lab.fp]
        self.secrets += [self.upper.digest, self.failing.digest, "upper-secret-fn", "failing-secret-fn"]
        self.secrets += [SECRET_PARAM, DATASET_NAME, str(server.data_dir)]
        self.ran: list[str] = []

    def task(self, *, failing: bool = False, sleep: float = 0) -> str:
        ds = upload_dataset(self.hospital, PATIENTS, self.service, name=DATASET_NAME)
        manifest = create_task(
            self.lab,
            self.service,
            self.failing if failing else self.upper,
            ds,
            [self.lab],
            params={"suffix": SECRET_PARAM, "sleep": str(sleep)},
        )
        approve(self.hospital, manifest)
        self.secrets += [manifest.task_id, manifest.digest, ds.dataset_id, ds.ciphertext_sha256]
        return manifest.task_id

    def run(self, task_id: str) -> None:
        self.lab.ok("POST", f"/v1/tasks/{task_id}/run", {})
        self.ran.append(task_id)

    def ensure_history(self) -> None:
        """A succeeded and a failed task (when this test runs alone)."""
        if not self.ran:
            for failing in (False, True):
                task_id = self.task(failing=failing)
                self.run(task_id)
                wait_task(self.lab, task_id)

    def state(self, task_id: str) -> str:
        return str(self.lab.ok("GET", f"/v1/tasks/{task_id}")["state"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = ServerProcess(tmp_path_factory.mktemp("status") / "data", workers=1).start()
    yield World(server)
    server.stop()


def outsider(world: World) -> httpx.Client:
    """No key, no headers: anyone who can reach the port."""
    return httpx.Client(base_url=world.server.url, timeout=30)


def metrics(world: World) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics parsed by prometheus_client's text parser: {(sample name, labels): value}."""
    with outsider(world) as http:
        r = http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def figure(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def page(world: World) -> str:
    with outsider(world) as http:
        r = http.get("/status")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    return r.text


def test_the_figures_follow_the_tasks(world: World) -> None:
    m = metrics(world)
    assert figure(m, "confide_database_up") == 1 and figure(m, "confide_blobstore_up") == 1
    assert figure(m, "confide_service_provisioned") == 1
    assert figure(m, "confide_workers", state="ready") == 1
    workers = [k for k in m if k[0] == "confide_worker_provisioned"]
    assert len(workers) == 1 and m[workers[0]] == 1
    assert figure(m, "confide_queue_depth") == 0 and figure(m, "confide_tasks", state="succeeded") == 0
    html = page(world)
    assert 'data-figure="queue-depth">0<' in html and 'data-figure="worker-provisioned">yes<' in html

    # a created task counts as created; one that sleeps keeps the only worker busy while a second is queued
    slow = world.task(sleep=6)
    assert figure(metrics(world), "confide_tasks", state="created") == 1
    world.run(slow)
    wait_task(world.lab, slow, states=("running",))
    queued = world.task()
    world.run(queued)
    assert world.state(queued) == "queued"
    m = metrics(world)
    html = page(world)
    # it was queued before and after both reads (states only move forward), so both saw it queued
    assert world.state(queued) == "queued", "the slow task ended before the figures were read"
    assert figure(m, "confide_queue_depth") == 1 and figure(m, "confide_tasks", state="queued") == 1
    assert figure(m, "confide_tasks", state="running") == 1
    assert figure(m, "confide_workers", state="busy") == 1
    assert 'data-figure="queue-depth">1<' in html and 'data-figure="running">1<' in html
    assert 'data-figure="tasks-queued">1<' in html

    for task_id in (slow, queued):
        assert wait_task(world.lab, task_id)["state"] == "succeeded"
    m = metrics(world)
    assert figure(m, "confide_queue_depth") == 0 and figure(m, "confide_tasks", state="succeeded") == 2
    assert figure(m, "confide_tasks_finished_recent", state="succeeded") == 2
    assert not [k for k in m if k[0] == "confide_task_failures_recent"]
    assert 'data-figure="finished-recent">2<' in page(world)

    # a function that raises: one failed run, category "exception" (the sandbox's fixed vocabulary)
    failing = world.task(failing=True)
    world.run(failing)
    assert wait_task(world.lab, failing)["state"] == "failed"
    m = metrics(world)
    assert figure(m, "confide_tasks", state="failed") == 1
    assert figure(m, "confide_task_failures_recent", category="exception") == 1
    assert figure(m, "confide_tasks_finished_recent", state="failed") == 1
    html = page(world)
    assert 'data-figure="failures-exception">1<' in html and 'data-figure="failures-recent">1<' in html
    assert 'data-figure="tasks-failed">1<' in html


def test_metrics_is_the_prometheus_text_format(world: World) -> None:
    with outsider(world) as http:
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "confide_service_info": "gauge",  # an info metric: the text format has no info type
        "confide_service_provisioned": "gauge",
        "confide_workers": "gauge",
        "confide_worker_info": "gauge",
        "confide_worker_provisioned": "gauge",
        "confide_queue_depth": "gauge",
        "confide_tasks": "gauge",
        "confide_tasks_finished_recent": "gauge",
        "confide_database_up": "gauge",
        "confide_blobstore_up": "gauge",
        "confide_blobstore_free_bytes": "gauge",
    }
    assert {name: families[name].type for name in expected} == expected
    for line in text.splitlines():  # every line is a comment (# HELP / # TYPE) or a sample
        assert line.startswith(("# HELP confide_", "# TYPE confide_", "confide_")), line
    worker = families["confide_worker_info"].samples[0].labels
    assert len(worker["measurement"]) == 64 and worker["state"] in ("ready", "busy")
    fingerprint = families["confide_service_info"].samples[0].labels["fingerprint"]
    assert fingerprint == world.service.fingerprint
    assert families["confide_blobstore_free_bytes"].samples[0].value % (1 << 30) == 0  # whole GiB


def test_a_curious_outsider_reads_no_party_data(world: World) -> None:
    """Played by someone without a key: both pages answer (no authentication), and after tasks of two
    parties ran, neither shows a party's name or fingerprint, a dataset's id or name, a task id,
    a function, a parameter's value, a digest of what parties stored, or the server's paths."""
    world.ensure_history()
    with outsider(world) as http:
        answers = {path: http.get(path) for path in ("/status", "/metrics")}
        assert http.get("/v1/tasks").status_code == 401  # the same outsider is refused party data
    assert world.ran  # tasks ran: their ids, digests and datasets are on the list
    for path, r in answers.items():
        assert r.status_code == 200, (path, r.text)
        for secret in world.secrets:
            assert secret not in r.text, f"{path} shows {secret!r}"
    # the page carries no script and names no origin: the CSP says so too
    status = answers["/status"]
    assert "<script" not in status.text and "http://" not in status.text and "https://" not in status.text
    csp = status.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    # the service's own fingerprint is shown: it is public (GET /v1/service)
    assert world.service.fingerprint in status.text


def test_the_page_in_chromium(world: World, tmp_path: Path) -> None:
    """Debian's Chromium loads /status: the figures are visible, every request goes to the server
    itself, and the page is saved as a screenshot."""
    assert CHROMIUM.exists(), (
        "Chromium not found at /usr/bin/chromium: apt-get install chromium (.ci/run does)"
    )
    from playwright.sync_api import sync_playwright

    world.ensure_history()
    m = metrics(world)
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            tab = context.new_page()
            tab.on("request", lambda req: requests.append(req.url))
            started = time.perf_counter()
            response = tab.goto(f"{world.server.url}/status", wait_until="load")
            render_s = time.perf_counter() - started
            assert response is not None and response.status == 200
            assert tab.title() == "Confide platform status"

            def shown(name: str) -> str:
                return tab.locator(f'[data-figure="{name}"]').first.inner_text().strip()

            assert shown("queue-depth") == str(int(figure(m, "confide_queue_depth")))
            assert shown("tasks-succeeded") == str(int(figure(m, "confide_tasks", state="succeeded")))
            assert shown("tasks-failed") == str(int(figure(m, "confide_tasks", state="failed")))
            assert shown("failures-exception") == str(
                int(figure(m, "confide_task_failures_recent", category="exception"))
            )
            assert shown("worker-provisioned") == "yes"
            assert shown("database") == "ok" and shown("blobstore") == "ok"
            assert tab.locator("tr[data-worker]").count() == 1
            assert tab.get_by_text("SIMULATED enclave backend").is_visible()
            shot = tmp_path / "status-page.png"
            tab.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            docs_copy = os.environ.get("CONFIDE_STATUS_SCREENSHOT")  # docs/img/status-page.png is made so
            if docs_copy:
                Path(docs_copy).write_bytes(shot.read_bytes())
            print(f"status page: loaded and rendered in {render_s * 1000:.0f} ms; screenshot {shot}")
        finally:
            browser.close()
    assert requests, "the browser recorded no request"
    foreign = [u for u in requests if not (u.startswith(world.server.url + "/") or u.startswith("data:"))]
    assert foreign == [], f"the page asked other origins: {foreign}"


# ---- in process: both databases, odd values, and a store that is down -------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def app_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "confide.db")
    else:
        url = request.getfixturevalue("pg_cluster").create_database()
    db = Database(url)
    db.migrate()
    blobs = BlobStore(tmp_path / "blobs")
    yield Platform(db=db, blobs=blobs, scheduler=Scheduler(db, blobs, lease_seconds=60))
    db.dispose()


HOSTILE_CATEGORY = "<b>patient ann, weight 61</b>"  # a category outside the fixed vocabulary


def _fill(platform: Platform) -> None:
    """Rows as the scheduler leaves them: 2 queued, 1 running, 1 failed an hour and a half ago, 1 failed
    now by 'exception', and a run whose category is free text."""
    t = now()
    with platform.db.transaction() as s:
        s.add(PartyRow(fingerprint="a" * 4 + "-aaaa" * 7, name="st-elsewhere", identity="x", created_at=t))
        s.flush()
        rows = [("queued", t), ("queued", t), ("running", t), ("failed", t - 5400), ("failed", t)]
        for i, (state, at) in enumerate(rows):
            task_id = f"{i:032x}"
            s.add(
                Task(
                    task_id=task_id,
                    creator="a" * 4 + "-aaaa" * 7,
                    manifest="{}",
                    manifest_sha256="0" * 64,
                    function_digest="0" * 64,
                    state=state,
                    attempts=1,
                    runs=1,
                    created_at=at,
                    updated_at=at,
                )
            )
            s.flush()
            if state == "failed":
                category = "exception" if at == t else "cpu-limit"
                s.add(
                    TaskRun(
                        task_id=task_id,
                        run_no=1,
                        attempt=1,
                        worker="w",
                        status="error",
                        category=category,
                        started_at=at,
                        ended_at=at,
                    )
                )
        s.add(
            TaskRun(
                task_id=f"{2:032x}",
                run_no=1,
                attempt=1,
                worker="w",
                status="error",
                category=HOSTILE_CATEGORY,
                started_at=t,
                ended_at=t,
            )
        )


def test_figures_on_both_databases_and_odd_categories(app_platform: Platform) -> None:
    _fill(app_platform)
    with TestClient(create_app(app_platform)) as http:
        text = http.get("/metrics").text
        html = http.get("/status").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("confide_queue_depth", ())] == 2
    assert samples[("confide_tasks", (("state", "failed"),))] == 2
    assert samples[("confide_tasks_finished_recent", (("state", "failed"),))] == 1  # not the old one
    failures = {
        dict(k[1])["category"]: v for k, v in samples.items() if k[0] == "confide_task_failures_recent"
    }
    assert failures == {"exception": 1, "other": 1}  # cpu-limit was an hour and a half ago
    assert samples[("confide_service_provisioned", ())] == 0  # no workers in this process
    for page in (text, html):
        assert "patient" not in page and "<b>" not in page and "st-elsewhere" not in page
    assert 'data-figure="failures-other">1<' in html and 'data-figure="queue-depth">2<' in html


def test_a_database_that_is_down_is_shown_without_its_url(tmp_path: Path) -> None:
    hidden = tmp_path / "secret-dir-9e1c"
    db = Database(sqlite_url(hidden / "missing" / "confide.db"))  # the folder does not exist
    blobs = BlobStore(tmp_path / "blobs")
    (tmp_path / "blobs" / "tmp").rmdir()  # and the blob store lost its upload folder
    platform = Platform(db=db, blobs=blobs, scheduler=Scheduler(db, blobs, lease_seconds=60))
    with TestClient(create_app(platform)) as http:
        metrics_r, status_r = http.get("/metrics"), http.get("/status")
    assert metrics_r.status_code == 200 and status_r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics_r.text)}
    assert families["confide_database_up"].samples[0].value == 0
    assert families["confide_blobstore_up"].samples[0].value == 0
    assert "confide_tasks" not in families and "confide_queue_depth" not in families  # no figures made up
    for r in (metrics_r, status_r):
        assert "secret-dir-9e1c" not in r.text and "Traceback" not in r.text
    assert 'data-figure="database"><span class="bad">down' in status_r.text
    assert "OperationalError (sqlite)" in status_r.text and "tmp/ is missing" in status_r.text
    assert 'data-figure="queue-depth">–<' in status_r.text
    db.dispose()
