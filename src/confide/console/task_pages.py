"""The inbox, a task (what an approval covers, who approved, Approve / Reject / Run, the receipt and
the error text), creating a task, and a task's results (verified, decrypted, previewed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from confide.console.app import Console, form_of, redirect, task_id_of
from confide.console.html import Frame, esc, field, form, notice, page, pre, select, state_badge, table, when
from confide.console.preview import preview
from confide.console.reports import views
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.enclave.manifest import Manifest

ACTIVE = ("queued", "running")
DONE_MESSAGES = {
    "approved": "Your approval of this exact manifest was signed on this machine and sent.",
    "rejected": "You rejected this task.",
    "queued": "The task is queued; this page follows it.",
    "created": "Task created; your approval as its creator was signed on this machine.",
    "cancelled": "You cancelled this task: the platform will not queue it again.",
    "withdrawn": "Your approval was withdrawn: the enclave refuses the task until you approve again.",
}
SECTIONS = (
    ("Running", ("queued", "running")),
    ("Done", ("succeeded",)),
    ("Failed", ("failed",)),
    ("Waiting for others", ("created",)),
    ("Closed", ("cancelled", "rejected")),
)


class TaskRows:
    """Table rows for task summaries, with the names of parties and functions fetched once."""

    def __init__(self, console: Console) -> None:
        self.names = console.client.party_names()
        self.functions = {str(f["digest"]): f for f in console.client.functions()}

    def __call__(self, rows: list[dict[str, Any]]) -> list[list[str]]:
        out = []
        for r in rows:
            tid = str(r.get("task_id"))
            fn = self.functions.get(str(r.get("function_digest")))
            fn_name = (
                f"{fn.get('name')}@{fn.get('version')}" if fn else str(r.get("function_digest", ""))[:16]
            )
            creator = self.names.get(str(r.get("creator"))) or str(r.get("creator"))
            out.append(
                [
                    f'<a href="/tasks/{esc(tid)}">{esc(tid)}</a>',
                    state_badge(r.get("state")),
                    esc(fn_name),
                    esc(creator),
                    esc(when(r.get("updated_at"))),
                ]
            )
        return out


HEADERS = ("Task", "State", "Function", "Creator", "Updated")


def inbox(console: Console, request: Request) -> str:
    from confide.console.pages import register_form

    c = console.client
    if console.party_name() is None:
        return page(console.frame(request), "Register", register_form(console, request), current="/")
    pending = c.tasks(pending=True)
    rows_of = TaskRows(console)
    only_mine = request.query_params.get("only") == "mine"
    body = '<p><a href="/?only=mine">Show only what needs me</a> · <a href="/">Show all</a></p>'
    body += "<section><h2>Waiting for my approval</h2>"
    body += table(
        HEADERS,
        rows_of(pending),
        caption="Tasks waiting for my approval",
        empty="Nothing waits for your approval.",
    )
    body += "</section>"
    everything = [] if only_mine else c.tasks()
    if not only_mine:
        mine = {str(t.get("task_id")) for t in pending}
        rest = [t for t in everything if str(t.get("task_id")) not in mine]
        for title, states in SECTIONS:
            rows = [t for t in rest if t.get("state") in states]
            body += f"<section><h2>{esc(title)}</h2>"
            body += table(HEADERS, rows_of(rows), caption=f"{title} tasks", empty="None.")
            body += "</section>"
    active = any(t.get("state") in ACTIVE for t in everything)
    return page(console.frame(request), "Inbox", body, current="/", refresh_s=3 if active else None)


def _approvals(manifest: Manifest, info: dict[str, Any]) -> str:
    approvers = {str(a.get("party")) for a in info.get("approvals", [])}
    rejected = {str(r.get("party")): r for r in info.get("rejections") or []}
    names = {p.fingerprint: p.name for p in manifest.participants}
    rows = []
    for fp in manifest.required_approvals():
        if fp in rejected:
            status = f"rejected: {esc(rejected[fp].get('reason') or '')}"
        else:
            status = "approved" if fp in approvers else "<strong>pending</strong>"
        rows.append([esc(names.get(fp, fp)), f"<code>{esc(fp)}</code>", status])
    return table(
        ("Party", "Fingerprint", "Approval"),
        rows,
        caption="Approvals the enclave requires",
        empty="No approvals required.",
    )


def _receipt(console: Console, task_id: str, info: dict[str, Any], manifest: Manifest) -> str:
    c = console.client
    if not info.get("receipt"):
        return "<p>No receipt yet.</p>"
    try:
        body = c.receipt(task_id, info)
    except ConfideError as exc:
        return notice(f"receipt NOT accepted: {exc.message} ({exc.where})", kind="error")
    import json

    out = notice(
        f"Receipt verified: signed by the attested service {c.service.fingerprint}, for manifest "
        f"{body.get('manifest_sha256')}, run {body.get('run')} of at most {body.get('max_runs')}."
    )
    out += "<details><summary>The signed receipt (what <code>confide task receipt</code> prints)</summary>"
    out += pre(json.dumps(body, indent=2), label="receipt") + "</details>"
    if body.get("status") == "ok":
        mine = [o.name for o in manifest.outputs if c.fingerprint in o.recipients]
        if mine:
            out += (
                f'<p><a href="/tasks/{esc(task_id)}/results">Results for me ({esc(", ".join(mine))})</a></p>'
            )
        return out
    err = body.get("error") or {}
    out += notice(
        f"The task failed in the enclave ({err.get('check', '?')}): {err.get('message', '')}", kind="error"
    )
    try:
        text = c.error_report(task_id, info)
    except ConfideError as exc:
        return out + f"<p>The function's error text is not for you: {esc(exc.message)}</p>"
    if text:
        out += "<h3>The function's error (sealed to you by the enclave)</h3>" + pre(
            text.rstrip(), label="error text"
        )
    return out


def task_page(console: Console, request: Request) -> str:
    from confide.cli.task import state_reason
    from confide.client.approval import describe_manifest

    c = console.client
    task_id = task_id_of(request)
    info = c.task(task_id)
    manifest = console.manifest(task_id)
    frame = console.frame(request)
    state = str(info.get("state"))
    body = ""
    done = DONE_MESSAGES.get(request.query_params.get("done", ""))
    if done and (request.query_params.get("done") != "queued" or state in ACTIVE):
        body += notice(done)
    body += f"<p>State: {state_badge(state)} (attempts {esc(info.get('attempts', 0))}) {esc(state_reason(info))}</p>"
    if info.get("message"):
        body += f"<p>Platform says: {esc(info['message'])}</p>"
    receipt = "<section><h2>Receipt</h2>" + _receipt(console, task_id, info, manifest) + "</section>"
    if info.get("receipt"):  # what happened first, once something did
        body += receipt
    body += "<section><h2>Approvals</h2>" + _approvals(manifest, info) + "</section>"
    body += (
        "<section><h2>What an approval covers</h2><p>Exactly what <code>confide task show</code> prints; "
        "the enclave checks every approval against this manifest's digest.</p>"
        + pre(describe_manifest(manifest), label="task manifest")
        + _source(console, manifest)
        + "</section>"
    )
    body += "<section><h2>Actions</h2>" + _actions(frame, task_id, info, manifest) + "</section>"
    body += f'<p><a href="/audit?task={esc(task_id)}">Audit events of this task</a></p>'
    if not info.get("receipt"):
        body += receipt
    if state not in ACTIVE:
        return page(frame, f"Task {task_id}", body)
    # following a running task: the next load waits in `follow` until the state changes
    return page(frame, f"Task {task_id}", body, refresh_s=1, refresh_url=f"/tasks/{task_id}?follow={state}")


def _source(console: Console, manifest: Manifest) -> str:
    """The function's code when it is readable, checked against the digest the manifest pins."""
    ref = manifest.function.name if manifest.function.kind == "builtin" else manifest.function_digest
    try:
        source = console.function_source(ref)
    except ConfideError as exc:
        return notice(f"the function's source is NOT shown: {exc.message} ({exc.where})", kind="error")
    if source is None:
        return "<p>The function's code is confidential: sealed to the enclave, readable by nobody else.</p>"
    return (
        "<details><summary>The function's source (checked against the digest above)</summary>"
        + pre(source.rstrip(), label="function source")
        + "</details>"
    )


def follow(console: Console, request: Request) -> None:
    """Before a task page that follows a running task: wait until it leaves the state it was in
    (at most FOLLOW_WAIT_S). A failure here only ends the wait: the page itself says what is wrong."""
    state = request.query_params.get("follow", "")
    if state not in ACTIVE:
        return
    try:
        console.follow(task_id_of(request), state)
    except ConfideError:
        return


def _actions(f: Frame, task_id: str, info: dict[str, Any], manifest: Manifest) -> str:
    me = f.fingerprint
    state = str(info.get("state"))
    approvers = {str(a.get("party")) for a in info.get("approvals", [])}
    rejected = {str(r.get("party")) for r in info.get("rejections") or []}
    open_state = state in ("created", "queued", "failed")
    out = ""
    if me in manifest.required_approvals() and me not in approvers and me not in rejected and open_state:
        out += form(
            f,
            f"/tasks/{task_id}/approve",
            f'<input type="hidden" name="digest" value="{esc(manifest.digest)}">'
            f"<p>Approving signs, on this machine with your key, manifest sha256 "
            f'<code class="digest">{esc(manifest.digest)}</code> for at most 3 run(s) per enclave worker.</p>',
            label="Approve",
            button_class="primary",
        )
    if (
        me in {p.fingerprint for p in manifest.participants}
        and me not in rejected
        and open_state
        and me != manifest.creator
    ):
        out += form(
            f,
            f"/tasks/{task_id}/reject",
            field("reason", "Reason for rejecting (shown to the other participants)"),
            label="Reject",
            button_class="danger",
        )
    if state in ("created", "failed"):
        waiting = [fp for fp in manifest.required_approvals() if fp not in approvers]
        note = (
            f"<p>Still waiting for {len(waiting)} approval(s): the enclave refuses to run it until every "
            "one is in (and signs a receipt saying which is missing).</p>"
            if waiting
            else ""
        )
        out += form(f, f"/tasks/{task_id}/run", note, label="Run" if state == "created" else "Run again")
    if me in approvers and state in ("created", "queued", "failed") and me != manifest.creator:
        out += form(
            f,
            f"/tasks/{task_id}/withdraw",
            "<p>Withdrawing deletes your approval: the enclave, which checks every required approval, "
            "then refuses the task (a copy the platform kept would still verify: see "
            "<code>confide task withdraw --help</code>).</p>",
            label="Withdraw my approval",
        )
    if me == manifest.creator and state in ("created", "queued", "failed"):
        out += form(
            f,
            f"/tasks/{task_id}/cancel",
            "<p>Cancelling stops the platform from queueing the task again.</p>",
            label="Cancel task",
            button_class="danger",
        )
    return out or "<p>Nothing for you to do on this task now.</p>"


def approve(console: Console, request: Request) -> Response:
    task_id = task_id_of(request)
    digest = form_of(request).required("digest", "manifest digest")
    console.client.approve(task_id, expect_digest=digest)
    return redirect(f"/tasks/{task_id}?done=approved")


def reject(console: Console, request: Request) -> Response:
    task_id = task_id_of(request)
    reason = form_of(request).get("reason").strip() or None
    console.client.reject_task(task_id, reason=reason)
    return redirect(f"/tasks/{task_id}?done=rejected")


def cancel(console: Console, request: Request) -> Response:
    task_id = task_id_of(request)
    form_of(request)
    console.client.cancel(task_id)
    return redirect(f"/tasks/{task_id}?done=cancelled")


def withdraw(console: Console, request: Request) -> Response:
    task_id = task_id_of(request)
    form_of(request)
    console.client.withdraw(task_id)
    return redirect(f"/tasks/{task_id}?done=withdrawn")


def run(console: Console, request: Request) -> Response:
    task_id = task_id_of(request)
    form_of(request)
    console.client.run(task_id)
    return redirect(f"/tasks/{task_id}?done=queued")


def new_task(console: Console, request: Request) -> Response | str:
    from confide.enclave import manifest as mf

    c = console.client
    if request.method == "POST":
        return _create(console, request)
    frame = console.frame(request)
    options = [(b, f"{b} (built-in)") for b in sorted(mf.BUILTINS)]
    options += [
        (str(f["digest"]), f"{f.get('name')}@{f.get('version')} {str(f['digest'])[:12]}")
        for f in c.functions()
        if f.get("kind") != "builtin"
    ]
    inner = select("function", "Function", options)
    inner += field(
        "inputs",
        "Inputs",
        kind="textarea",
        hint="one NAME=DATASET_REFERENCE per line (the cds1:... reference the owner shared)",
        required=True,
    )
    inner += field(
        "outputs",
        "Outputs",
        kind="textarea",
        hint="one NAME=RECIPIENT[,RECIPIENT] per line; a recipient is a party name or fingerprint",
        required=True,
    )
    inner += field(
        "params",
        "Parameters",
        kind="textarea",
        hint="one KEY=VALUE per line; VALUE is parsed as JSON when it parses",
    )
    body = "<p>The manifest is built and your approval as its creator signed on this machine.</p>"
    body += form(frame, "/tasks/new", inner, label="Create task", button_class="primary")
    return page(frame, "New task", body, current="/tasks/new")


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _create(console: Console, request: Request) -> Response:
    from confide.cli.common import parse_assignments, parse_params

    c = console.client
    f = form_of(request)
    outputs: dict[str, list[str]] = {}
    for name, refs in parse_assignments(_lines(f.get("outputs")), what="Outputs").items():
        recipients = [r.strip() for r in refs.split(",") if r.strip()]
        if not recipients:
            raise ConfideError(f"output {name!r} has no recipient", where="Outputs")
        outputs[name] = [c.resolve_party(r, where=f"output {name}") for r in recipients]
    task_id = c.create_task(
        function=c.resolve_function(f.required("function", "Function"), where="Function"),
        inputs=parse_assignments(_lines(f.get("inputs")), what="Inputs"),
        outputs=outputs,
        params=parse_params(_lines(f.get("params")), what="Parameters"),
    )
    return redirect(f"/tasks/{task_id}?done=created")


def results(console: Console, request: Request) -> str:
    c = console.client
    task_id = task_id_of(request)
    result = c.results(task_id, console.task_dir(task_id))
    sizes = {str(o.get("name")): o for o in result.receipt.get("outputs", [])}
    head = result.receipt.get("audit_head") or {}
    body = notice(
        f"{len(result.outputs)} output(s) checked against the receipt signed by the attested service "
        f"{c.service.fingerprint} and decrypted on this machine; the receipt signs the audit log up to "
        f"event {head.get('seq')} (checked)."
    )
    manifest = console.manifest(task_id)
    builtin = manifest.function.name if manifest.function.kind == "builtin" else None
    shown_views = views(builtin, result.outputs, manifest.params)
    for name, path in sorted(result.outputs.items()):
        digest = sizes.get(name, {}).get("sha256", "")
        body += f"<section><h2>Output {esc(name)}</h2><p>{esc(path.stat().st_size)} bytes, sealed sha256 <code>{esc(digest)}</code> "
        body += f'<a href="/tasks/{esc(task_id)}/results/{esc(name)}" download>Download {esc(name)}</a></p>'
        view = shown_views.get(name)
        if view is not None:
            body += view.html
        shown = None if view is not None and view.replaces_preview else preview(path)
        if shown is not None:
            more = (
                f" (first {len(shown.rows)} of {shown.total_rows} rows)"
                if shown.total_rows > len(shown.rows)
                else ""
            )
            body += table(
                shown.headers,
                ([esc(v) for v in row] for row in shown.rows),
                caption=f"{name} ({shown.kind}){more}",
                empty="(no rows)",
            )
        elif view is None:
            body += "<p>No preview (not CSV or JSON).</p>"
        body += "</section>"
    return page(console.frame(request), f"Results of task {task_id}", body)


def download(console: Console, request: Request) -> Response:
    from confide.enclave.task_fields import IDENT_RE

    task_id = task_id_of(request)
    name = str(request.path_params.get("name", ""))
    if not IDENT_RE.fullmatch(name):
        raise ConfideError("not an output name", where=f"output {name[:40]!r}")
    path = console.task_dir(task_id) / name
    if not path.is_file():
        console.client.results(task_id, console.task_dir(task_id))
    if not path.is_file():
        raise ConfideError("no such output for you", where=f"output {name}")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{task_id}-{name}")
