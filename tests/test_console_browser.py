"""The README's flow through the consoles of three parties, in Debian's Chromium (Playwright): two
hospitals upload a CSV each in their consoles, the lab registers a function and creates a task in
its console, each hospital reads what it approves and approves in its own console (one of them with
the keyboard only), the lab runs the task, sees the result as a table and the audit chain verified;
the README's own task (gbdt-train, created in the lab's console, run once before the approvals and
refused) ends in the results page's plots; a failing task shows its recipient the function's error
text. One hospital's browser runs no JavaScript (its upload is the plain form), the other's shows
the upload's progress. Every control is found by its label or role, every page's controls have an
accessible name, the main flow's forms are reached by Tab; no request leaves the console's own
origin. A screenshot of every page is saved under the test's tmp dir (and copied to
$CONFIDE_SCREENSHOTS when set)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from confide.console.app import Console, create_app
from confide.console.security import Guard
from platform_support import FAILING, ServerProcess, sdk_clients

CHROMIUM = Path("/usr/bin/chromium")
# rebound.test plays a DNS rebinding attacker's name, resolved to 127.0.0.1 inside this browser only
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--host-resolver-rules=MAP rebound.test 127.0.0.1",
]
TIMEOUT_MS = 60_000  # a busy 2-core machine

MERGE_FN = """
def run(ctx):
    a = ctx.inputs["a"].read().decode().splitlines()
    b = ctx.inputs["b"].read().decode().splitlines()
    rows = [a[0]] + a[1:] + b[1:]
    ctx.outputs["out"].write(("\\n".join(r.upper() for r in rows) + "\\n").encode())
"""


# Every control a person uses, and what a screen reader would call it: a <label for>, aria-label,
# aria-labelledby, or (a button) its text. Returns the controls that have none.
UNLABELLED_JS = """() => Array.from(document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button')).filter(el => {
  const text = n => (n && n.textContent || '').trim();
  if (el.labels && Array.from(el.labels).some(l => text(l))) return false;
  if ((el.getAttribute('aria-label') || '').trim()) return false;
  const by = el.getAttribute('aria-labelledby');
  if (by && by.split(/\\s+/).some(id => text(document.getElementById(id)))) return false;
  return !(el.tagName === 'BUTTON' && text(el));
}).map(el => el.outerHTML.slice(0, 160))"""

# What Tab has reached: the focused control's label (or a link's or button's text).
FOCUSED_JS = """() => { const el = document.activeElement;
  if (!el || el === document.body) return '';
  const label = el.labels && el.labels[0];
  return ((label ? label.textContent : el.textContent) || '').trim(); }"""


def tab_reaches(page: Any, wanted: list[str], *, presses: int = 40) -> None:
    """From the top of the page (its first link), Tab alone reaches each of `wanted` (labels or
    button texts), in order."""
    page.locator("a.brand").focus()
    seen = []
    for _ in range(presses):
        page.keyboard.press("Tab")
        seen.append(page.evaluate(FOCUSED_JS))
    order = [seen.index(w) if w in seen else -1 for w in wanted]
    assert -1 not in order and order == sorted(order), f"Tab reached {seen}, wanted {wanted} in order"


def numeric_table(seed: int, rows: int) -> str:
    """A small hospital table for gbdt-train: the outcome depends on age and smoking."""
    import random

    rng = random.Random(seed)
    out = ["age,bmi,smoker,outcome"]
    for _ in range(rows):
        age, bmi, smoker = rng.randint(20, 90), round(rng.gauss(27, 5), 1), rng.randint(0, 1)
        out.append(f"{age},{bmi},{smoker},{int(0.05 * (age - 50) + smoker + rng.gauss(0, 0.5) > 0.5)}")
    return "\n".join(out) + "\n"


@dataclass
class Running:
    console: Console
    server: Any
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.console.guard.launch_url

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.console.guard.port}"


def start_console(client: Any, results_dir: Path) -> Running:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    console = Console(client, Guard(port=int(sock.getsockname()[1])), results_dir=results_dir)
    config = uvicorn.Config(create_app(console), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "console did not start"
        time.sleep(0.02)
    return Running(console, server, thread)


@pytest.fixture(scope="module")
def consoles(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium; .ci/run does)",
            pytrace=False,
        )
    root = tmp_path_factory.mktemp("console-parties")
    names = ("hospital-a", "hospital-b", "lab")
    clients = sdk_clients(server, root / "homes", names)
    running = {n: start_console(c, root / "results" / n) for n, c in zip(names, clients, strict=True)}
    yield running
    for r in running.values():
        r.server.should_exit = True
    for r in running.values():
        r.thread.join(10)
        r.console.close()
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Shots:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.taken: list[Path] = []

    def __call__(self, page: Any, name: str, *, full_page: bool = True) -> None:
        path = self.root / f"{len(self.taken) + 1:02d}-{name}.png"
        page.wait_for_load_state("load")
        # the stylesheet applied (also after the upload script swapped the page in)
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('link[rel=stylesheet]')).every(l => l.sheet)"
        )
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280, f"{name}: wider than the window"
        assert page.evaluate(UNLABELLED_JS) == [], f"{name}: controls without an accessible name"
        page.screenshot(path=str(path), full_page=full_page)
        self.taken.append(path)
        copy_to = os.environ.get("CONFIDE_SCREENSHOTS")
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)


def open_console(browser: Any, running: Running, foreign: list[str], *, javascript: bool = True) -> Any:
    """A fresh browser profile signed in to one party's console; requests to any other origin are
    recorded in `foreign`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=javascript)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on(
        "request",
        lambda req: None if req.url.startswith(running.origin + "/") else foreign.append(req.url),
    )
    page.goto(running.url)
    assert page.url == running.origin + "/"  # the token left the address bar
    return page


def submit(page: Any, button: str, *, keyboard: bool = False) -> None:
    """Press a form's button; the page it leads to must not be a refusal (failing fast with its
    text instead of waiting for what will not come)."""
    control = page.get_by_role("button", name=button)
    if keyboard:
        control.focus()
        page.keyboard.press("Enter")
    else:
        control.click()
    page.wait_for_load_state("load")
    refused = page.locator(".notice.error")
    if page.title().startswith("Refused") and refused.count():
        raise AssertionError(f"{button}: {refused.first.inner_text()}")


def upload(page: Any, path: Path, name: str) -> str:
    """Upload in the datasets page: with JavaScript the page's script posts it and shows progress
    (no navigation: wait for the answer it shows), without, the plain form."""
    page.get_by_role("link", name="Datasets").click()
    page.wait_for_url("**/datasets")
    page.get_by_label("CSV file").set_input_files(str(path))
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Upload").click()
    page.locator("code.ref, .notice.error").first.wait_for()
    refused = page.locator(".notice.error")
    assert not refused.count(), refused.first.inner_text()
    ref = page.locator("code.ref").inner_text()
    assert ref.startswith("cds1:")
    return ref


def open_task(page: Any, task_id: str) -> None:
    page.get_by_role("link", name="Inbox").click()
    page.get_by_role("link", name="Show only what needs me").click()
    page.wait_for_url("**/?only=mine")
    page.get_by_role("link", name=task_id).click()


def test_three_parties_through_their_consoles(
    consoles: dict[str, Running], browser: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    shots = Shots(tmp_path)
    foreign: list[str] = []
    a = open_console(browser, consoles["hospital-a"], foreign)
    b = open_console(browser, consoles["hospital-b"], foreign, javascript=False)  # the plain forms
    lab = open_console(browser, consoles["lab"], foreign)
    try:
        # Keyboard: the first Tab reaches the console's own home link, then the main navigation.
        a.keyboard.press("Tab")
        assert a.evaluate("document.activeElement.textContent") == "Confide"
        a.keyboard.press("Tab")
        assert a.evaluate("document.activeElement.textContent") == "Inbox"
        shots(a, "inbox-empty")

        (tmp_path / "a.csv").write_text("name,score\nada,1\ngrace,2\n")
        (tmp_path / "b.csv").write_text("name,score\nalan,3\n")
        ref_a = upload(a, tmp_path / "a.csv", "cohort-a")
        progress = a.locator("#upload-progress")  # the script showed how much it sent: all of it
        assert progress.is_visible() and "all" in a.locator("#upload-progress-status").inner_text()
        sent = float(progress.get_attribute("max") or 0)
        assert (
            sent > len("name,score\nada,1\ngrace,2\n")
            and a.evaluate("document.getElementById('upload-progress').value") == sent
        )
        shots(a, "datasets-uploaded")
        tab_reaches(a, ["CSV file", "Name", "Refuse to upload a file with CSV problems", "Upload"])
        # checked here before anything is sent: over the limit (made small for the test), no request
        a.locator("form[data-progress]").evaluate("f => f.setAttribute('data-max-bytes', '10')")
        a.get_by_label("CSV file").set_input_files(str(tmp_path / "a.csv"))
        owned = len(consoles["hospital-a"].console.client.datasets())
        a.get_by_role("button", name="Upload").click()
        assert "over the console's" in a.locator("#upload-progress-status").inner_text()
        assert len(consoles["hospital-a"].console.client.datasets()) == owned
        ref_b = upload(b, tmp_path / "b.csv", "cohort-b")
        assert b.locator("#upload-progress").is_hidden()  # no script ran: the plain form posted

        lab.get_by_role("link", name="Functions").click()
        lab.get_by_label("Name", exact=True).fill("merge-upper")
        lab.get_by_label("Outputs").fill("out")
        lab.get_by_label("Inputs").fill("a,b")
        lab.get_by_label("Description").fill("joins both cohorts and upper-cases them")
        lab.get_by_label("Source", exact=True).fill(MERGE_FN)
        submit(lab, "Register")
        assert "Registered function" in lab.get_by_role("status").first.inner_text()
        shots(lab, "functions")
        digest = next(
            f["digest"] for f in consoles["lab"].console.client.functions() if f["name"] == "merge-upper"
        )

        lab.get_by_role("link", name="New task").click()
        lab.get_by_label("Function").select_option(digest)
        lab.get_by_label("Inputs").fill(f"a={ref_a}\nb={ref_b}")
        lab.get_by_label("Outputs").fill("out=lab")
        shots(lab, "new-task")
        tab_reaches(lab, ["Function", "Inputs", "Outputs", "Parameters", "Create task"])
        submit(lab, "Create task")
        assert "Task created" in lab.get_by_role("status").first.inner_text()
        task_id = lab.url.rsplit("/", 1)[1].split("?")[0]
        assert len(task_id) == 32

        # Each hospital reads exactly what it approves, the digest it signs, then approves.
        for page, how in ((a, "mouse"), (b, "keyboard")):
            open_task(page, task_id)
            manifest = page.get_by_label("task manifest").inner_text()
            assert "Function 'merge-upper' version 1 (Python)" in manifest
            assert "Inputs (the enclave unlocks each only with its owner's approval):" in manifest
            shown_digest = page.locator("form code.digest").inner_text()
            assert f"manifest sha256: {shown_digest}" in manifest
            if page is a:
                shots(page, "task-to-approve")
                shots(page, "task-to-approve-window", full_page=False)  # docs/img/console.png
                page.get_by_text("The function's source").click()  # <details>: the code it approves
                assert 'ctx.outputs["out"].write' in page.get_by_label("function source").inner_text()
                tab_reaches(
                    page,
                    ["Approve", "Reason for rejecting (shown to the other participants)", "Reject"],
                    presses=60,
                )
            submit(page, "Approve", keyboard=how == "keyboard")
            assert "signed on this machine" in page.get_by_role("status").first.inner_text()

        lab.goto(f"{consoles['lab'].origin}/tasks/{task_id}")
        submit(lab, "Run")
        lab.get_by_text("Receipt verified").wait_for(timeout=60_000)  # the page follows the task
        assert "succeeded" in lab.locator(".state").first.inner_text()
        shots(lab, "task-succeeded")
        lab.get_by_text("The signed receipt").click()  # <details>: opens with a click or Enter
        receipt = lab.get_by_label("receipt", exact=True).inner_text()
        assert f'"task_id": "{task_id}"' in receipt and '"status": "ok"' in receipt
        lab.get_by_role("link", name="Results for me").click()
        table = lab.get_by_role("table")
        table.wait_for()
        cells = table.inner_text()
        assert "NAME" in cells and "ADA" in cells and "GRACE" in cells and "ALAN" in cells
        assert "checked against the receipt" in lab.get_by_role("status").first.inner_text()
        shots(lab, "results")
        with lab.expect_download() as fetched:
            lab.get_by_role("link", name="Download out").click()
        saved = fetched.value.path()
        assert Path(saved).read_text() == "NAME,SCORE\nADA,1\nGRACE,2\nALAN,3\n"

        lab.get_by_role("link", name="Inbox").click()
        done = lab.get_by_role("table", name="Done tasks")
        assert task_id in done.inner_text() and "merge-upper@1" in done.inner_text()
        shots(lab, "inbox")

        lab.get_by_role("link", name="Audit log").click()
        status = lab.get_by_role("status").first.inner_text()
        assert status.startswith("Hash chain verified:") and "event(s)" in status
        assert task_id in lab.get_by_role("table").inner_text()
        shots(lab, "audit")

        lab.get_by_role("link", name="Service").click()
        assert "SIMULATED" in lab.get_by_role("alert").first.inner_text()
        assert "Verified attestation claims" in lab.get_by_role("table").inner_text()
        shots(lab, "service")

        # The README's task: gbdt-train on both hospitals' tables, created in the lab's console, run
        # once before anyone approved (the enclave refuses), then approved and run: its plots.
        a_client = consoles["hospital-a"].console.client
        b_client = consoles["hospital-b"].console.client
        (tmp_path / "ha.csv").write_text(numeric_table(1, 160))
        (tmp_path / "hb.csv").write_text(numeric_table(2, 120))
        gbdt_a, gbdt_b = (
            a_client.upload_dataset(tmp_path / "ha.csv"),
            b_client.upload_dataset(tmp_path / "hb.csv"),
        )
        lab.get_by_role("link", name="New task").click()
        lab.get_by_label("Function").select_option("gbdt-train")
        lab.get_by_label("Inputs").fill(f"a={gbdt_a.ref}\nb={gbdt_b.ref}")
        lab.get_by_label("Outputs").fill("model=lab\nreport=lab")
        lab.get_by_label("Parameters").fill("label=outcome\nrounds=20")
        submit(lab, "Create task")
        gbdt = lab.url.rsplit("/", 1)[1].split("?")[0]
        assert "Still waiting for 2 approval(s)" in lab.get_by_role("main").inner_text()
        submit(lab, "Run")
        lab.get_by_text("The task failed in the enclave").wait_for(timeout=60_000)
        assert "failed" in lab.locator(".state").first.inner_text()
        shots(lab, "task-refused")
        for owner in (a_client, b_client):
            owner.approve(gbdt)
        lab.goto(f"{consoles['lab'].origin}/tasks/{gbdt}")
        submit(lab, "Run again")
        lab.get_by_role("link", name="Results for me").wait_for(timeout=120_000)
        lab.get_by_role("link", name="Results for me").click()
        lab.locator("svg.plot").first.wait_for()
        captions = lab.locator("figcaption").all_inner_texts()
        assert captions == ["Class balance of label outcome", "Feature importance", "Rows per input"]
        assert lab.get_by_role("img", name="Feature importance").count() == 1  # the SVG's title
        shots(lab, "results-gbdt")
        lab.locator("figure.chart").first.scroll_into_view_if_needed()
        shots(lab, "results-gbdt-window", full_page=False)  # docs/img/console-results.png
        lab.goto(f"{consoles['lab'].origin}/tasks/{gbdt}")
        lab.get_by_role("link", name="Audit events of this task").click()
        assert f"of task {gbdt}" in lab.get_by_role("status").first.inner_text()

        # A failing task: its recipient (the lab) reads the function's error text, decrypted here.
        lab_client = consoles["lab"].console.client
        failing = lab_client.register_function(FAILING, name="failing", outputs=["out"])
        (tmp_path / "secret.csv").write_text("name\nzed\n")
        ds = a_client.upload_dataset(tmp_path / "secret.csv")
        bad = lab_client.create_task(
            function=failing, inputs={"data": ds.ref}, outputs={"out": [lab_client.fingerprint]}
        )
        a_client.approve(bad)
        lab.goto(f"{consoles['lab'].origin}/tasks/{bad}")
        submit(lab, "Run")
        error = lab.get_by_label("error text")
        error.wait_for(timeout=60_000)
        assert "ValueError: the function broke: name\nzed" in error.inner_text()
        shots(lab, "task-failed")
        a.goto(f"{consoles['hospital-a'].origin}/tasks/{bad}")
        assert "not for you" in a.get_by_text("error text").first.inner_text()
        assert a.get_by_label("error text").count() == 0

        assert foreign == []
        assert len(shots.taken) >= 11
        print(f"screenshots: {shots.root} ({len(shots.taken)}); flow took {time.monotonic() - started:.1f} s")
    except BaseException:
        for name, page in (("hospital-a", a), ("hospital-b", b), ("lab", lab)):  # what each showed
            (tmp_path / f"failed-{name}.html").write_text(page.content())
            page.screenshot(path=str(tmp_path / f"failed-{name}.png"), full_page=True)
        print(f"pages at the failure: {tmp_path}/failed-*")
        raise


def test_the_servers_api_docs_page_needs_no_other_site(
    server: ServerProcess, browser: Any, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    asked: list[str] = []
    page.on("request", lambda req: asked.append(req.url))
    page.goto(f"{server.url}/docs")
    assert page.get_by_role("heading", level=1).inner_text().startswith("Confide platform API")
    assert page.get_by_role("heading", name="tasks", exact=True).count() == 1
    assert page.locator("section.op").count() > 20
    assert [u for u in asked if not u.startswith(server.url + "/")] == []
    Shots(tmp_path)(page, "api-docs")
    context.close()


def test_the_browser_is_refused_without_token_under_a_rebound_name_and_cross_site(
    consoles: dict[str, Running], browser: Any, tmp_path: Path
) -> None:
    running = consoles["hospital-b"]
    port = running.console.guard.port
    client = running.console.client
    before = {f["name"] for f in client.functions()}
    stranger = browser.new_context()
    page = stranger.new_page()
    r = page.goto(running.origin + "/")  # no token, no cookie
    assert r is not None and r.status == 403 and "Not signed in" in page.content()
    r = page.goto(f"http://rebound.test:{port}/?token={running.console.guard.token}")  # DNS rebinding
    assert r is not None and r.status == 400 and "Wrong host name" in page.content()
    assert "set-cookie" not in r.headers and stranger.cookies() == []
    stranger.close()

    # A signed-in browser visits an attacker's pages: one on another port of 127.0.0.1 (the same
    # site, so the cookie goes along) and one on another site; each posts a form to the console.
    foreign: list[str] = []
    victim = open_console(browser, running, foreign)
    attack = (
        f'<form method="post" action="{running.origin}/functions"><input name="name" value="evil">'
        '<input name="outputs" value="o"><input name="source" value="def run(ctx): pass"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    for evil, why in (
        (f"http://127.0.0.1:{port + 1}/", "another site (same-site)"),
        ("http://evil.test/", ""),
    ):
        victim.context.route(evil + "**", lambda route: route.fulfill(body=attack, content_type="text/html"))
        with victim.expect_response(f"{running.origin}/functions") as answered:
            victim.goto(evil + "attack.html")
        assert answered.value.status == 403, evil
        victim.wait_for_load_state("load")
        refusal = victim.content()
        assert why in refusal if why else "Not signed in" in refusal  # SameSite=Strict: no cookie
    assert {f["name"] for f in client.functions()} == before  # nothing was registered
    Shots(tmp_path)(victim, "refused-cross-site")
    victim.context.close()
