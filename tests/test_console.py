"""`confide ui`'s guard, in front of a real platform (the shared one-worker `server`): a request
without the launch token or session is refused, so is one under a foreign Host name (DNS
rebinding), and a POST without the session's CSRF token, from another site or another origin;
every answer carries the strict headers. And what a page does with the SDK: the approval text is
exactly `describe_manifest`'s, and an approval signs only the digest the page showed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from confide.client.approval import describe_manifest
from confide.console.app import Console, create_app
from confide.console.security import SECURITY_HEADERS, Guard
from platform_support import UPPER, UPPER_FN, ServerProcess, sdk_clients, this_build_dev_policy

PORT = 48123  # the port the guard expects in Host and Origin (TestClient binds nothing)
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def parties(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Any:
    owner, lab = sdk_clients(server, tmp_path_factory.mktemp("homes"), ("owner", "lab"))
    yield owner, lab
    owner.close()
    lab.close()


@pytest.fixture(scope="module")
def console(parties: Any, tmp_path_factory: pytest.TempPathFactory) -> Console:
    owner, _lab = parties
    return Console(owner, Guard(port=PORT), results_dir=tmp_path_factory.mktemp("results"))


@pytest.fixture
def anonymous(console: Console) -> TestClient:
    return TestClient(create_app(console), base_url=BASE, follow_redirects=False)


@pytest.fixture
def browser(console: Console) -> TestClient:
    """A client that opened the launch URL: it holds the session cookie."""
    client = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
    r = client.get(f"/?token={console.guard.token}")
    assert r.status_code == 303, r.text
    return client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def assert_strict_headers(r: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert r.headers.get(name) == value, (name, r.headers.get(name))
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_no_token_no_session_is_refused(anonymous: TestClient, console: Console) -> None:
    for path in ("/", "/service", "/datasets", "/audit", "/static/console.css", "/tasks/" + "0" * 32):
        r = anonymous.get(path)
        assert r.status_code == 403, path
        assert_strict_headers(r)
        assert "confide ui" in r.text
    assert anonymous.get("/?token=" + "x" * len(console.guard.token)).status_code == 403
    assert anonymous.get("/?token=").status_code == 403
    forged = {console.guard.cookie: "0" * 32 + "." + "0" * 64}
    assert anonymous.get("/", cookies=forged).status_code == 403
    other_launch = Guard(port=PORT)  # a session cookie made by another launch's key
    assert anonymous.get("/", cookies={console.guard.cookie: other_launch.new_session()}).status_code == 403
    r = anonymous.post("/functions", data={"csrf": "x", "name": "n"})
    assert r.status_code == 403


def test_token_becomes_a_strict_session_cookie(anonymous: TestClient, console: Console) -> None:
    r = anonymous.get(f"/datasets?token={console.guard.token}")
    assert r.status_code == 303
    assert r.headers["location"] == "/datasets"  # the token leaves the address bar
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{console.guard.cookie}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert console.guard.token not in cookie
    assert_strict_headers(r)
    page = anonymous.get("/datasets")  # the cookie jar now holds the session
    assert page.status_code == 200
    assert_strict_headers(page)
    assert '<link rel="stylesheet" href="/static/console.css">' in page.text
    assert "http://" not in page.text.replace(BASE, "")  # nothing from another origin
    css = anonymous.get("/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "url(" not in css.text and "@import" not in css.text


def test_the_one_script_is_the_packages_and_no_page_has_an_inline_one(browser: TestClient) -> None:
    scripts = []
    for path in ("/", "/datasets", "/functions", "/tasks/new", "/audit", "/service"):
        page = browser.get(path)
        assert page.status_code == 200, path
        scripts += re.findall(r"<script[^>]*>", page.text)
        assert " on" + "submit=" not in page.text and "javascript:" not in page.text
    assert scripts == ['<script src="/static/upload.js" defer>']  # on the datasets page only
    js = browser.get("/static/upload.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "XMLHttpRequest" in js.text and "http" + "://" not in js.text and "eval(" not in js.text
    assert_strict_headers(js)
    for name in ("nope.js", "..%2Fapp.py", "console.css.map", "__init__.py"):
        assert browser.get(f"/static/{name}").status_code == 404, name
    datasets = browser.get("/datasets").text
    assert 'data-progress="upload-progress"' in datasets and '<progress id="upload-progress"' in datasets


def test_foreign_host_is_refused_before_the_token_is_looked_at(
    anonymous: TestClient, console: Console
) -> None:
    r = anonymous.get(f"/?token={console.guard.token}", headers={"host": f"rebound.example:{PORT}"})
    assert r.status_code == 400
    assert "set-cookie" not in r.headers
    assert_strict_headers(r)


def test_upload_checks_the_csv_here_first(browser: TestClient, parties: Any) -> None:
    owner, _lab = parties
    token = csrf_of(browser.get("/datasets").text)
    ragged = b"name,score\nada,1\nbob\n"
    before = len(owner.datasets())
    r = browser.post(
        "/datasets",
        data={"csrf": token, "name": "ragged", "strict": "1"},
        files={"file": ("ragged.csv", ragged, "text/csv")},
    )
    assert r.status_code == 400 and "nothing uploaded" in r.text and "line 3" in r.text
    assert len(owner.datasets()) == before
    r = browser.post(
        "/datasets",
        data={"csrf": token, "name": "ragged"},
        files={"file": ("ragged.csv", ragged, "text/csv")},
    )
    assert r.status_code == 200 and "warning:" in r.text and "line 3" in r.text
    ref = re.search(r'<code class="ref">(cds1:[^<]+)</code>', r.text)
    assert ref, r.text
    assert owner.dataset(ref.group(1)).name == "ragged"
    assert len(owner.datasets()) == before + 1
    no_csrf = browser.post(
        "/datasets", data={"name": "x"}, files={"file": ("x.csv", b"a,b\n1,2\n", "text/csv")}
    )
    assert no_csrf.status_code == 403
    assert len(owner.datasets()) == before + 1


def test_no_websocket_passes_the_guard(browser: TestClient) -> None:
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as closed, browser.websocket_connect("/") as ws:
        ws.receive_text()
    assert closed.value.code == 1008  # the guard's refusal (the router's own would be 1000)


def test_foreign_host_header_is_refused(browser: TestClient) -> None:
    assert browser.get("/").status_code == 200
    for host in (f"evil.example:{PORT}", "127.0.0.1", f"127.0.0.1:{PORT + 1}", f"localhost:{PORT}.evil", ""):
        r = browser.get("/", headers={"host": host})
        assert r.status_code == 400, host
        assert_strict_headers(r)
    assert browser.get("/", headers={"host": f"localhost:{PORT}"}).status_code == 200


def test_state_changes_need_csrf_same_origin(browser: TestClient, parties: Any) -> None:
    owner, _lab = parties
    page = browser.get("/functions")
    assert page.status_code == 200
    token = csrf_of(page.text)
    form = {"name": "upper-console", "outputs": "out", "inputs": "data", "source": UPPER_FN}

    def registered() -> bool:
        return any(f.get("name") == "upper-console" for f in owner.functions())

    refused = [
        ({}, {}),  # no CSRF token
        ({"csrf": "0" * 64}, {}),  # a wrong one
        ({"csrf": Guard(port=PORT).csrf_token("a.b")}, {}),  # another launch's
        ({"csrf": token}, {"sec-fetch-site": "cross-site"}),
        ({"csrf": token}, {"sec-fetch-site": "same-site"}),  # another port of 127.0.0.1
        ({"csrf": token}, {"origin": "http://evil.example"}),
        ({"csrf": token}, {"origin": f"http://127.0.0.1:{PORT + 1}"}),
        ({"csrf": token}, {"origin": "null"}),  # without Fetch Metadata vouching for it
        ({"csrf": token}, {"origin": "null", "sec-fetch-site": "cross-site"}),
    ]
    for extra, headers in refused:
        r = browser.post("/functions", data={**form, **extra}, headers=headers)
        assert r.status_code == 403, (extra, headers, r.text)
        assert_strict_headers(r)
    assert not registered()
    r = browser.put("/functions", content=b"")
    assert r.status_code == 405
    ok = browser.post(
        "/functions", data={**form, "csrf": token}, headers={"sec-fetch-site": "same-origin", "origin": BASE}
    )
    assert ok.status_code == 200, ok.text
    assert "Registered function" in ok.text
    assert registered()


def test_csrf_token_is_bound_to_its_session(browser: TestClient, console: Console) -> None:
    token = csrf_of(browser.get("/functions").text)
    second = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
    assert second.get(f"/?token={console.guard.token}").status_code == 303
    r = second.post("/functions", data={"csrf": token, "name": "x", "outputs": "o", "source": "x"})
    assert r.status_code == 403
    assert csrf_of(second.get("/functions").text) != token


def test_task_page_shows_the_manifest_and_approves_only_what_it_showed(
    browser: TestClient, parties: Any, tmp_path: Path
) -> None:
    owner, lab = parties
    data = tmp_path / "rows.csv"
    data.write_text("name,score\nada,1\n")
    ds = owner.upload_dataset(data)
    fn = lab.register_function(UPPER_FN, name="upper", description="<b>upper</b> & co", outputs=["out"])
    task = lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    inbox = browser.get("/?only=mine")
    assert task in inbox.text
    page = browser.get(f"/tasks/{task}")
    assert page.status_code == 200
    manifest = owner.manifest(task)
    from html import escape

    assert escape(describe_manifest(manifest), quote=True) in page.text
    assert "<b>upper</b>" not in page.text  # another party's text is escaped
    assert escape(UPPER_FN.rstrip(), quote=True) in page.text  # the code, checked against its digest
    sealed = lab.register_function(UPPER_FN, name="upper-sealed", outputs=["out"], confidential=True)
    hidden = lab.create_task(function=sealed, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    hidden_page = browser.get(f"/tasks/{hidden}").text
    assert "code is confidential" in hidden_page and escape(UPPER_FN.rstrip(), quote=True) not in hidden_page
    assert "pending" in page.text
    token = csrf_of(page.text)
    swapped = browser.post(f"/tasks/{task}/approve", data={"csrf": token, "digest": "f" * 64})
    assert swapped.status_code == 400 and "not the reviewed" in swapped.text
    assert owner.fingerprint not in {a.get("party") for a in lab.task(task)["approvals"]}
    r = browser.post(f"/tasks/{task}/approve", data={"csrf": token, "digest": manifest.digest})
    assert r.status_code == 303 and r.headers["location"] == f"/tasks/{task}?done=approved"
    assert owner.fingerprint in {a.get("party") for a in lab.task(task)["approvals"]}
    assert "The signed receipt" not in page.text  # not run yet: no receipt
    assert browser.get("/tasks/not-a-task").status_code == 400
    datasets = browser.get("/datasets").text  # which tasks read each dataset
    assert f'<a href="/tasks/{task}">{task[:8]}</a>' in datasets


def test_withdraw_cancel_and_a_tasks_audit_from_the_console(
    browser: TestClient, parties: Any, tmp_path: Path
) -> None:
    owner, lab = parties
    data = tmp_path / "rows.csv"
    data.write_text("name\nada\n")
    ds = owner.upload_dataset(data)
    fn = lab.register_function(UPPER, name="upper-withdrawn", outputs=["out"])
    task = lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    owner.approve(task)
    page = browser.get(f"/tasks/{task}")
    assert "Withdraw my approval" in page.text and "Cancel task" not in page.text  # not the creator
    assert browser.post(f"/tasks/{task}/withdraw", data={}).status_code == 403  # no CSRF token
    assert owner.fingerprint in {a.get("party") for a in lab.task(task)["approvals"]}
    r = browser.post(f"/tasks/{task}/withdraw", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == f"/tasks/{task}?done=withdrawn"
    assert owner.fingerprint not in {a.get("party") for a in lab.task(task)["approvals"]}
    assert browser.post(f"/tasks/{task}/cancel", data={"csrf": csrf_of(page.text)}).status_code == 400
    assert lab.task(task)["state"] == "created"  # only the creator cancels: the platform said so

    creator = Console(lab, Guard(port=PORT), results_dir=tmp_path / "results")
    web = TestClient(create_app(creator), base_url=BASE, follow_redirects=False)
    assert web.get(f"/?token={creator.guard.token}").status_code == 303
    page = web.get(f"/tasks/{task}")
    assert "Cancel task" in page.text and f'href="/audit?task={task}"' in page.text
    r = web.post(f"/tasks/{task}/cancel", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and lab.task(task)["state"] == "cancelled"
    assert "Cancel task" not in web.get(f"/tasks/{task}").text
    audit = web.get(f"/audit?task={task}")
    assert audit.status_code == 200 and f"event(s) of task {task}" in audit.text
    ids = set(re.findall(r"<td><code>([0-9a-f]{32}|-)</code></td>", audit.text))
    assert ids == {task}  # this task's events only
    assert "task_cancelled" in audit.text or "cancel" in audit.text
    assert web.get("/audit?task=../v1").status_code == 400


def test_a_followed_task_page_waits_for_the_change_and_blocks_no_other_page(
    console: Console, parties: Any, tmp_path: Path
) -> None:
    import threading
    import time

    owner, lab = parties
    data = tmp_path / "rows.csv"
    data.write_text("name\nada\n")
    ds = owner.upload_dataset(data)
    fn = lab.register_function(UPPER, name="upper-sleepy", outputs=["out"])
    task = lab.create_task(
        function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]}, params={"sleep": "5"}
    )
    owner.approve(task)
    lab.run(task)
    deadline = time.monotonic() + 60
    while owner.task(task)["state"] != "running":
        assert time.monotonic() < deadline, "task never ran"
        time.sleep(0.1)
    follower = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
    other = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
    for c in (follower, other):
        assert c.get(f"/?token={console.guard.token}").status_code == 303
    running = other.get(f"/tasks/{task}")
    assert f'content="1; url=/tasks/{task}?follow=running"' in running.text
    followed: dict[str, Any] = {}

    def follow() -> None:
        started = time.monotonic()
        followed["page"] = follower.get(f"/tasks/{task}?follow=running")
        followed["took"] = time.monotonic() - started

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert other.get("/datasets").status_code == 200
    assert time.monotonic() - started < 3, "a following page held up another page"
    thread.join(30)
    assert followed["took"] > 1  # it waited for the run ...
    assert "succeeded" in followed["page"].text  # ... and came back when the state changed
    assert "follow=" not in followed["page"].text


def test_a_new_party_registers_in_its_console(server: ServerProcess, parties: Any, tmp_path: Path) -> None:
    from confide.attest.anchors import load_trust_anchors
    from confide.client.sdk import Client
    from confide.enclave.keys import Identity

    owner, _lab = parties
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    with Client(
        server.url,
        Identity.generate("newcomer"),
        policy=this_build_dev_policy(),
        anchors=anchors,
        home=tmp_path,
    ) as newcomer:
        console = Console(newcomer, Guard(port=PORT), results_dir=tmp_path / "results")
        web = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
        assert web.get(f"/?token={console.guard.token}").status_code == 303
        page = web.get("/")
        assert page.status_code == 200 and "(not registered)" in page.text
        assert "does not know this key" in page.text and newcomer.fingerprint in page.text
        assert web.post("/register", data={"name": "newcomer"}).status_code == 403  # no CSRF token
        assert owner.parties(name="newcomer") == []
        r = web.post("/register", data={"csrf": csrf_of(page.text), "name": "newcomer"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        inbox = web.get("/")
        assert "Waiting for my approval" in inbox.text and "<strong>newcomer</strong>" in inbox.text
        assert [p["fingerprint"] for p in owner.parties(name="newcomer")] == [newcomer.fingerprint]


def test_outputs_are_previewed_as_tables_and_bars(tmp_path: Path) -> None:
    from confide.console.preview import charts, preview

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": {"a": 400, "b": 120}, "label_balance": {"0": 3, "1": 1}, "k": 5}))
    assert [(c.title, c.items) for c in charts(report)] == [
        ("rows", (("a", 400.0), ("b", 120.0))),
        ("label_balance", (("0", 3.0), ("1", 1.0))),
    ]
    shown = preview(report)
    assert shown is not None and shown.kind == "json" and shown.headers == ("key", "value")
    assert ("k", "5") in shown.rows
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"g": "x", "n": 1}, {"g": "y", "m": True}]))
    shown = preview(listed)
    assert shown is not None and shown.headers == ("g", "n", "m") and shown.rows[1] == ("y", "", "true")
    table = tmp_path / "t.csv"
    table.write_text("a,b\n" + "".join(f"{i},{i}\n" for i in range(500)))
    shown = preview(table)
    assert shown is not None and shown.kind == "csv" and len(shown.rows) == 200 and shown.total_rows == 500
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"trees": "x" * 5000}))
    shown = preview(long)
    assert shown is not None and len(shown.rows[0][1]) == 300 and shown.rows[0][1].endswith("…")
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01,\x02")
    assert preview(binary) is None and charts(binary) == []
    assert charts(table) == [] and charts(listed) == []  # bars only for objects of numbers


def test_builtin_reports_are_drawn_with_suppressions_marked(tmp_path: Path) -> None:
    from confide.console.plots import Bars
    from confide.console.reports import views

    def out(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    gbdt = {
        "model": out("model", "{}"),
        "report": out(
            "gbdt.json",
            json.dumps(
                {
                    "label": "outcome",
                    "rows": {"a": 400, "b": 100},
                    "label_balance": {"0": 300, "1": 200},
                    "feature_importance": {"age": 5.5, "bmi": 20.0, "<script>x</script>": 0.0},
                }
            ),
        ),
    }
    html = views("gbdt-train", gbdt, {})["report"].html
    titles = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert titles == ["Class balance of label outcome", "Feature importance", "Rows per input"]
    assert "300 (60.0%)" in html and "200 (40.0%)" in html  # the balance as shares
    ranked = re.findall(r"<title>([^<:]*): [^<]*</title></rect>", html)
    assert ranked[2:5] == ["bmi", "age", "&lt;script&gt;x&lt;/script&gt;"]  # most important first, escaped
    assert "<script>" not in html and "model" not in views("gbdt-train", gbdt, {})  # "{}": no model
    learner = {
        "feature_names": ["age", "bmi"],
        "objective": {"name": "binary:logistic"},
        "gradient_booster": {"model": {"gbtree_model_param": {"num_trees": "20"}}},
    }
    gbdt["model"].write_text(json.dumps({"learner": learner, "version": [3, 2, 0]}))
    model = views("gbdt-train", gbdt, {})["model"]
    assert model.replaces_preview and "binary:logistic, 20 trees) over the features age, bmi" in model.html

    joined = {
        "result": out("result.csv", "region,n,total\nnorth,12,340\nsouth,7,90\n"),
        "report": out("ja.json", json.dumps({"k": 5, "groups": 2, "suppressed_groups": 3})),
    }
    shown = views("join-aggregate", joined, {"group_by": ["region"]})
    assert "2 group(s) released, 3 suppressed" in shown["report"].html
    result = shown["result"].html
    assert "Suppressed groups: <strong>3</strong> (not in this table)" in result
    assert "<figcaption>n by region</figcaption>" in result and "north: 12" in result
    assert "<svg" not in views("join-aggregate", joined, {})["result"].html  # no groups: no bars

    described = {
        "report": out(
            "d.json",
            json.dumps(
                {
                    "k": 5,
                    "rows": 40,
                    "columns": {
                        "age": {"kind": "numeric", "count": 40, "mean": 51.25, "std": 9.5},
                        "rare": {"kind": "text", "count": 3, "suppressed": True},
                        "sex": {
                            "kind": "text",
                            "count": 40,
                            "distinct": 3,
                            "top": [{"value": "f", "count": 21}],
                            "unnamed": 2,
                        },
                    },
                }
            ),
        )
    }
    view = views("describe", described, {})["report"]
    assert view.replaces_preview and "1 of 3 column(s) suppressed" in view.html
    assert (
        '<td>rare</td><td>text</td><td>3</td><td><strong class="suppressed">suppressed</strong>' in view.html
    )
    assert "f (21)" in view.html and "mean 51.25" in view.html

    sql = {"result": out("s.csv", "a,n\nx,9\n"), "report": out("s.json", json.dumps({"k": 5, "rows": 1}))}
    assert "how many is not reported" in views("sql", sql, {})["result"].html

    # what is not the built-in's output shape gets no view (and no error)
    junk = {"report": out("junk.json", "[1, 2"), "result": out("junk.csv", "\x00")}
    for builtin in ("gbdt-train", "join-aggregate", "describe", "sql", None):
        assert views(builtin, junk, {"group_by": "x"}) == {}
    with pytest.raises(ValueError):
        Bars("bad", (("x", -1.0),))


def test_results_page_verifies_decrypts_and_draws(parties: Any, tmp_path: Path) -> None:
    owner, lab = parties
    data = tmp_path / "counts.json"
    data.write_text(json.dumps({"rows": {"a": 4, "b": 2}}))  # UPPER_FN upper-cases it: still JSON
    ds = owner.upload_dataset(data)
    fn = lab.register_function(UPPER_FN, name="upper-json", outputs=["out"])
    task = lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    owner.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    console = Console(lab, Guard(port=PORT), results_dir=tmp_path / "results")
    web = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
    assert web.get(f"/?token={console.guard.token}").status_code == 303
    page = web.get(f"/tasks/{task}/results")
    assert page.status_code == 200, page.text
    assert "checked against the receipt" in page.text
    bars = re.findall(r'<rect class="bar" [^>]*width="([0-9.]+)"[^>]*><title>([^<]*)</title>', page.text)
    assert [(float(w), t) for w, t in bars] == [(420.0, "A: 4"), (210.0, "B: 2")]  # to scale
    assert '<svg class="plot" role="img"' in page.text and "<figcaption>ROWS</figcaption>" in page.text
    download = web.get(f"/tasks/{task}/results/out")
    assert download.status_code == 200 and json.loads(download.content) == {"ROWS": {"A": 4, "B": 2}}
    assert download.headers["content-type"] == "application/octet-stream"
    assert "attachment" in download.headers["content-disposition"]
    assert web.get(f"/tasks/{task}/results/..%2Fx").status_code in (400, 404)
    mine = Console(owner, Guard(port=PORT), results_dir=tmp_path / "owner-results")
    owners_view = TestClient(create_app(mine), base_url=BASE, follow_redirects=False)
    assert owners_view.get(f"/?token={mine.guard.token}").status_code == 303
    page = owners_view.get(f"/tasks/{task}/results")  # the owner approved but receives nothing
    assert page.status_code == 200 and "0 output(s)" in page.text and "<svg" not in page.text
    assert not (tmp_path / "owner-results" / task / "out").exists()


def test_a_join_aggregate_run_shows_its_suppressed_groups(parties: Any, tmp_path: Path) -> None:
    owner, lab = parties
    data = tmp_path / "visits.csv"
    rows = [f"p{i},north,{i}" for i in range(6)] + ["q1,south,5", "q2,south,7"]  # south: 2 < k ids
    data.write_text("id,region,amount\n" + "\n".join(rows) + "\n")
    ds = owner.upload_dataset(data)
    task = lab.join_aggregate(
        inputs={"visits": ds.ref}, key="id", k=3, group_by=["region"], aggregates=[{"op": "count", "as": "n"}]
    )
    owner.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    console = Console(lab, Guard(port=PORT), results_dir=tmp_path / "results")
    web = TestClient(create_app(console), base_url=BASE, follow_redirects=False)
    assert web.get(f"/?token={console.guard.token}").status_code == 303
    page = web.get(f"/tasks/{task}/results")
    assert page.status_code == 200, page.text
    assert "Cohort threshold k = 3: 1 group(s) released, 1 suppressed" in page.text
    assert "Suppressed groups: <strong>1</strong> (not in this table)" in page.text
    assert "<figcaption>n by region</figcaption>" in page.text and "<title>north: 6</title>" in page.text
    assert "south" not in page.text  # a suppressed group is counted, never named


def test_confide_ui_prints_a_token_url_on_loopback(server: ServerProcess, tmp_path: Path) -> None:
    from confide.client.identity_file import save_identity
    from confide.enclave.keys import Identity

    key = tmp_path / "me.key"
    save_identity(Identity.generate("me"), key)
    policy = tmp_path / "policy.toml"
    policy.write_text(this_build_dev_policy().to_toml())
    cmd = [sys.executable, "-m", "confide.cli.main", "ui", "--no-open", "--port", "0", "--url", server.url]
    cmd += ["--identity", str(key), "--policy", str(policy)]
    cmd += ["--sim-root", str(server.data_dir / "platform" / "vendor_root.crt")]
    cmd += ["--results-dir", str(tmp_path / "results")]
    env = {**os.environ, "CONFIDE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        found = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{43})", url)
        assert found, url
        base = f"http://127.0.0.1:{found.group(1)}"
        with httpx.Client(timeout=30) as http:
            _wait_listening(http, base)
            assert http.get(f"{base}/service").status_code == 403
            r = http.get(url)
            assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
            page = http.get(f"{base}/service")
            assert page.status_code == 200, page.text
            assert "SIMULATED" in page.text and "Verified attestation claims" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(http: httpx.Client, base: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            http.get(f"{base}/")
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
