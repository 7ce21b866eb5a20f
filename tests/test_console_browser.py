"""The README's flow through the consoles of three parties, in Debian's Chromium (Playwright): two
hospitals upload a CSV each in their consoles, the lab registers a function and creates a task in
its console, each hospital reads what it approves and approves in its own console (one of them with
the keyboard only), the lab runs the task, sees the result as a table and the audit chain verified;
a failing task shows its recipient the function's error text. Every control is found by its label
or role; no request leaves the console's own origin. A screenshot of every page is saved under the
test's tmp dir (and copied to $CONFIDE_SCREENSHOTS when set)."""

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
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 60_000  # a busy 2-core machine

MERGE_FN = """
def run(ctx):
    a = ctx.inputs["a"].read().decode().splitlines()
    b = ctx.inputs["b"].read().decode().splitlines()
    rows = [a[0]] + a[1:] + b[1:]
    ctx.outputs["out"].write(("\\n".join(r.upper() for r in rows) + "\\n").encode())
"""


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
        page.wait_for_load_state("load")  # the stylesheet applied
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280, f"{name}: wider than the window"
        page.screenshot(path=str(path), full_page=full_page)
        self.taken.append(path)
        copy_to = os.environ.get("CONFIDE_SCREENSHOTS")
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)


def open_console(browser: Any, running: Running, foreign: list[str]) -> Any:
    """A fresh browser profile signed in to one party's console; requests to any other origin are
    recorded in `foreign`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
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
    page.get_by_role("link", name="Datasets").click()
    page.wait_for_url("**/datasets")
    page.get_by_label("CSV file").set_input_files(str(path))
    page.get_by_label("Name", exact=True).fill(name)
    submit(page, "Upload")
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
    a, b, lab = (open_console(browser, consoles[n], foreign) for n in ("hospital-a", "hospital-b", "lab"))
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
        shots(a, "datasets-uploaded")
        ref_b = upload(b, tmp_path / "b.csv", "cohort-b")

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

        # A failing task: its recipient (the lab) reads the function's error text, decrypted here.
        lab_client = consoles["lab"].console.client
        a_client = consoles["hospital-a"].console.client
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
        assert len(shots.taken) >= 9
        print(f"screenshots: {shots.root} ({len(shots.taken)}); flow took {time.monotonic() - started:.1f} s")
    except BaseException:
        for name, page in (("hospital-a", a), ("hospital-b", b), ("lab", lab)):  # what each showed
            (tmp_path / f"failed-{name}.html").write_text(page.content())
            page.screenshot(path=str(tmp_path / f"failed-{name}.png"), full_page=True)
        print(f"pages at the failure: {tmp_path}/failed-*")
        raise
