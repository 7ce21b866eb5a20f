"""The operator's status page (``GET /status``, HTML) and the same figures at ``GET /metrics``
(the Prometheus text exposition format, written by ``prometheus_client``).

Both are UNAUTHENTICATED, like ``/v1/health``: a monitoring system scrapes them without a party key,
and nothing in them calls `authenticated_party`. So they show only the platform's own figures, which
anyone who can reach the port may read: workers (id, state, measurement, whether provisioned), the
service's fingerprint and backend, counts of tasks per state, the queue depth, tasks finished in the
last 5 minutes, failed runs of the last hour by category (a fixed vocabulary; anything else is
``other``), and whether the database and the blob store answer. Never a party's name or
fingerprint, a dataset or task id, a function, a parameter, an error text, a worker's message (it may
quote paths), the database URL (it may hold a password), or sizes of what parties stored (the blob
store's free space is rounded down to whole GiB).

What an outsider still learns from them: how many tasks exist and in which state, when workers are
busy (task timing, to the page's refresh), and which failure categories occur.

Each figure is one cheap query on the read-only session (`Database.reading`): ``SELECT 1``; the
workers table; tasks grouped by state (``ix_tasks_state_queued_at``); finished tasks of the window
grouped by state; failed runs of the window grouped by category.
"""

from __future__ import annotations

import html
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from confide.enclave.sandbox.api import CATEGORIES
from confide.host.api.common import log
from confide.host.api.state import Platform
from confide.host.db import Task, TaskRun, Worker
from confide.host.scheduler import STATES, WORKER_LOST

FINISHED_WINDOW_S = 300  # "throughput": tasks that reached succeeded/failed in the last 5 minutes
FAILURES_WINDOW_S = 3600  # "recent failures": failed runs of the last hour
REFRESH_S = 10  # the page reloads itself (a meta refresh: no JavaScript)
GIB = 1 << 30
# Categories a run may end with (the sandbox's fixed vocabulary, the enclave's refusal, the host's
# own): any other value is counted as "other", so a label never carries free text.
KNOWN_CATEGORIES = frozenset(CATEGORIES) | {"refused", "enclave-refused", "platform", WORKER_LOST, "error"}
WORKER_STATES = ("starting", "provisioning", "ready", "busy", "failed", "stopped")
# No origin but this one, no script: the page is plain HTML with an inline style sheet.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


# ---- the figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    state: str
    measurement: str | None
    provisioned: bool
    restarts: int
    state_age_s: float  # since its last state change


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str  # what failed (an exception's class, never its text: it may quote a URL), or facts
    latency_s: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    service_fingerprint: str | None
    backend: str | None
    simulated: bool | None
    database: Health
    blobstore: Health
    blob_free_bytes: int | None  # rounded down to whole GiB
    workers: list[WorkerRow] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)  # every state of scheduler.STATES
    finished: dict[str, int] = field(default_factory=dict)  # succeeded/failed in FINISHED_WINDOW_S
    failures: dict[str, int] = field(default_factory=dict)  # category -> failed runs in FAILURES_WINDOW_S

    @property
    def queue_depth(self) -> int:
        return self.tasks.get("queued", 0)

    @property
    def finished_total(self) -> int:
        return sum(self.finished.values())


def _category(value: str | None) -> str:
    return value if value in KNOWN_CATEGORIES else "other"


def _blobstore_health(platform: Platform) -> tuple[Health, int | None]:
    root = platform.blobs.root
    try:
        for sub in (root / "sha256", platform.blobs.tmp_dir):
            if not (sub.is_dir() and os.access(sub, os.W_OK | os.X_OK)):
                return Health(False, f"{sub.name}/ is missing or not writable"), None
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return Health(False, type(exc).__name__), None
    return Health(True, f"writable, {free // GIB} GiB free"), free // GIB * GIB


def take_snapshot(platform: Platform) -> Snapshot:
    """Every figure of the page, read now (one query each; none when the database is down)."""
    t = time.time()
    described = platform.pool.describe() if platform.pool is not None else {}
    blob_health, free = _blobstore_health(platform)
    base: dict[str, Any] = {
        "taken_at": t,
        "service_fingerprint": described.get("fingerprint"),
        "backend": described.get("backend"),
        "simulated": described.get("simulated"),
        "blobstore": blob_health,
        "blob_free_bytes": free,
    }
    db = platform.db
    try:
        with db.reading() as s:
            start = time.perf_counter()
            s.execute(text("SELECT 1")).scalar()
            latency = time.perf_counter() - start
            workers = [
                WorkerRow(
                    worker_id=row.worker_id,
                    state=row.state,
                    measurement=row.measurement,
                    provisioned=row.service is not None,
                    restarts=row.restarts,
                    state_age_s=max(0.0, t - row.heartbeat),
                )
                for row in s.execute(
                    select(
                        Worker.worker_id,
                        Worker.state,
                        Worker.measurement,
                        Worker.service,
                        Worker.restarts,
                        Worker.heartbeat,
                    ).order_by(Worker.worker_id)
                )
            ]
            tasks = dict.fromkeys(STATES, 0)
            for state, n in s.execute(select(Task.state, func.count()).group_by(Task.state)):
                tasks[state] = tasks.get(state, 0) + int(n)
            finished = {"succeeded": 0, "failed": 0}
            for state, n in s.execute(
                select(Task.state, func.count())
                .where(Task.state.in_(tuple(finished)), Task.updated_at >= t - FINISHED_WINDOW_S)
                .group_by(Task.state)
            ):
                finished[state] = int(n)
            failures: dict[str, int] = {}
            for category, n in s.execute(
                select(TaskRun.category, func.count())
                .where(TaskRun.status != "ok", TaskRun.ended_at >= t - FAILURES_WINDOW_S)
                .group_by(TaskRun.category)
            ):
                key = _category(category)
                failures[key] = failures.get(key, 0) + int(n)
    except SQLAlchemyError as exc:
        log.warning("status: the database did not answer: %s", exc)
        return Snapshot(**base, database=Health(False, f"{type(exc).__name__} ({db.dialect})"))
    return Snapshot(
        **base,
        database=Health(True, f"{db.dialect}, SELECT 1 in {latency * 1000:.1f} ms", latency),
        workers=workers,
        tasks=tasks,
        finished=finished,
        failures=dict(sorted(failures.items())),
    )


# ---- /metrics ---------------------------------------------------------------------------------------


class SnapshotCollector:
    """A prometheus_client collector over one snapshot (a fresh registry per scrape)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Any]:
        snap = self.snap
        service = InfoMetricFamily("confide_service", "The enclave service this server's workers hold.")
        service.add_metric(
            [],
            {
                "fingerprint": snap.service_fingerprint or "",
                "backend": snap.backend or "",
                "simulated": "" if snap.simulated is None else str(snap.simulated).lower(),
            },
        )
        yield service
        yield _gauge(
            "confide_service_provisioned",
            "1 when a service key exists.",
            snap.service_fingerprint is not None,
        )

        by_state = GaugeMetricFamily("confide_workers", "Enclave workers by state.", labels=["state"])
        counts = dict.fromkeys(WORKER_STATES, 0)
        for w in snap.workers:
            counts[w.state] = counts.get(w.state, 0) + 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        info = InfoMetricFamily("confide_worker", "One enclave worker: state and measurement.")
        provisioned = GaugeMetricFamily(
            "confide_worker_provisioned", "1 when the worker holds the service key.", labels=["worker"]
        )
        restarts = GaugeMetricFamily(
            "confide_worker_restarts", "Enclave restarts of the worker.", labels=["worker"]
        )
        age = GaugeMetricFamily(
            "confide_worker_state_age_seconds",
            "Seconds since the worker's last state change.",
            labels=["worker"],
        )
        for w in snap.workers:
            info.add_metric([], {"worker": w.worker_id, "state": w.state, "measurement": w.measurement or ""})
            provisioned.add_metric([w.worker_id], int(w.provisioned))
            restarts.add_metric([w.worker_id], w.restarts)
            age.add_metric([w.worker_id], round(w.state_age_s, 3))
        yield from (info, provisioned, restarts, age)

        if snap.database.ok:
            yield _gauge("confide_queue_depth", "Tasks queued and not yet claimed.", snap.queue_depth)
            yield _by_label("confide_tasks", "Tasks by state.", "state", snap.tasks)
            yield _by_label(
                "confide_tasks_finished_recent",
                f"Tasks that reached a final state in the last {FINISHED_WINDOW_S} s.",
                "state",
                snap.finished,
            )
            yield _by_label(
                "confide_task_failures_recent",
                f"Failed runs in the last {FAILURES_WINDOW_S} s by category (attempts lost with a worker too).",
                "category",
                snap.failures,
            )
        yield _gauge("confide_database_up", "1 when the database answered SELECT 1.", snap.database.ok)
        if snap.database.ok:
            yield _gauge("confide_database_latency_seconds", "Time of SELECT 1.", snap.database.latency_s)
        yield _gauge(
            "confide_blobstore_up", "1 when the blob store's folders are writable.", snap.blobstore.ok
        )
        if snap.blob_free_bytes is not None:
            yield _gauge(
                "confide_blobstore_free_bytes",
                "Free space on the blob store's file system, rounded down to whole GiB.",
                snap.blob_free_bytes,
            )


def _gauge(name: str, doc: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _by_label(name: str, doc: str, label: str, counts: Mapping[str, int]) -> GaugeMetricFamily:
    """One gauge per label value (tasks per state, failures per category)."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    for value, n in counts.items():
        family.add_metric([value], n)
    return family


def render_metrics(snap: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap))  # type: ignore[arg-type]
    return bytes(generate_latest(registry))


# ---- /status ----------------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; --ink: #1b2430; --muted: #5b6675; --line: #d9dee5; --bg: #f5f7fa;
        --ok: #1f7a3f; --bad: #b3261e; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #14213d; color: #fff; padding: 16px 28px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header p { margin: 4px 0 0; color: #c9d3e3; font-size: 13px; }
main { padding: 20px 28px 28px; max-width: 1100px; }
.banner { background: #fff4d6; border: 1px solid #e0b85a; color: var(--warn); padding: 8px 12px;
          border-radius: 6px; font-weight: 600; margin-bottom: 16px; }
.cards { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 12px; margin-bottom: 20px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .n { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .l { color: var(--muted); font-size: 13px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
          margin-bottom: 16px; }
h2 { font-size: 16px; margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; }
code { font: 12.5px ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; word-break: break-all; }
.ok { color: var(--ok); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.two section { margin-bottom: 0; }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 13px; margin-top: 16px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _health(h: Health, figure: str) -> str:
    word = '<span class="ok">ok</span>' if h.ok else '<span class="bad">down</span>'
    return f'<td data-figure="{figure}">{word}</td><td>{_e(h.detail)}</td>'


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def render_page(snap: Snapshot) -> str:
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.taken_at))
    banner = ""
    if snap.simulated:
        banner = (
            '<div class="banner" role="status">SIMULATED enclave backend: no hardware protection; '
            "for development only.</div>"
        )
    db_ok = snap.database.ok
    na = "–"  # figures the database did not give

    def figure(name: str, value: int, label: str) -> str:
        shown = str(value) if db_ok else na
        return f'<div class="card"><div class="n" data-figure="{name}">{shown}</div><div class="l">{label}</div></div>'

    cards = "".join(
        (
            figure("queue-depth", snap.queue_depth, "queued tasks"),
            figure("running", snap.tasks.get("running", 0), "running tasks"),
            figure(
                "finished-recent", snap.finished_total, f"finished in the last {FINISHED_WINDOW_S // 60} min"
            ),
            figure(
                "failures-recent",
                sum(snap.failures.values()),
                f"failed runs in the last {FAILURES_WINDOW_S // 60} min",
            ),
        )
    )
    workers = (
        "".join(
            f'<tr data-worker="{_e(w.worker_id)}"><td><code>{_e(w.worker_id)}</code></td>'
            f'<td data-figure="worker-state">{_e(w.state)}</td>'
            f'<td data-figure="worker-provisioned">{"yes" if w.provisioned else "no"}</td>'
            f"<td><code>{_e(w.measurement or na)}</code></td>"
            f'<td class="num">{w.restarts}</td><td>{_e(_age(w.state_age_s))}</td></tr>'
            for w in snap.workers
        )
        or '<tr><td colspan="6" class="muted">no workers have registered</td></tr>'
    )
    tasks = "".join(
        f'<tr><td>{_e(state)}</td><td class="num" data-figure="tasks-{_e(state)}">{n if db_ok else na}</td></tr>'
        for state, n in ((s, snap.tasks.get(s, 0)) for s in (snap.tasks or STATES))
    )
    failures = (
        "".join(
            f'<tr><td>{_e(c)}</td><td class="num" data-figure="failures-{_e(c)}">{n}</td></tr>'
            for c, n in snap.failures.items()
        )
        or f'<tr><td colspan="2" class="muted">{"none" if db_ok else na}</td></tr>'
    )
    finished = ", ".join(f"{n} {s}" for s, n in snap.finished.items()) if db_ok else na
    service = (
        f"<code data-figure='service-fingerprint'>{_e(snap.service_fingerprint)}</code>"
        if snap.service_fingerprint
        else '<span class="bad" data-figure="service-fingerprint">not provisioned yet</span>'
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_S}">
<link rel="icon" href="data:,">
<title>Confide platform status</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>Confide platform status</h1>
<p>Operator view: the platform's own figures only, no party data. Refreshes every {REFRESH_S} s.
Also at <code>/metrics</code> (Prometheus).</p></header>
<main>
{banner}
<section aria-labelledby="svc"><h2 id="svc">Service</h2>
<table><tbody>
<tr><th scope="row">Service key</th><td>{service}</td></tr>
<tr><th scope="row">Backend</th><td data-figure="backend">{_e(snap.backend or na)}</td></tr>
</tbody></table></section>
<div class="cards">{cards}</div>
<section aria-labelledby="wk"><h2 id="wk">Workers</h2>
<table><thead><tr><th scope="col">Worker</th><th scope="col">State</th><th scope="col">Provisioned</th>
<th scope="col">Measurement</th><th scope="col" class="num">Restarts</th><th scope="col">State since</th></tr></thead>
<tbody>{workers}</tbody></table></section>
<div class="two">
<section aria-labelledby="ts"><h2 id="ts">Tasks per state</h2>
<table><tbody>{tasks}</tbody></table>
<p class="muted">Finished in the last {FINISHED_WINDOW_S // 60} min: <span data-figure="finished-by-state">{_e(finished)}</span></p>
</section>
<section aria-labelledby="fl"><h2 id="fl">Failed runs in the last {FAILURES_WINDOW_S // 60} min, by category</h2>
<table><tbody>{failures}</tbody></table></section>
</div>
<section aria-labelledby="hl" style="margin-top:16px"><h2 id="hl">Health</h2>
<table><tbody>
<tr><th scope="row">Database</th>{_health(snap.database, "database")}</tr>
<tr><th scope="row">Blob store</th>{_health(snap.blobstore, "blobstore")}</tr>
</tbody></table></section>
<footer>Taken at {taken}.</footer>
</main>
</body>
</html>
"""


# ---- the routes ---------------------------------------------------------------------------------------


def add_status_routes(app: FastAPI, platform: Platform) -> None:
    @app.get("/status", tags=["operator"], response_class=HTMLResponse)
    def status_page() -> HTMLResponse:
        """The operator's status page. UNAUTHENTICATED (like /v1/health): the platform's own
        figures only, no party data and no secrets (see this module's docstring)."""
        return HTMLResponse(render_page(take_snapshot(platform)), headers=SECURITY_HEADERS)

    @app.get("/metrics", tags=["operator"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """The status page's figures in the Prometheus text format. UNAUTHENTICATED (like
        /v1/health): no party data and no secrets."""
        return Response(
            render_metrics(take_snapshot(platform)),
            media_type=CONTENT_TYPE_LATEST,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )
