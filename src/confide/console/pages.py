"""The service (what its evidence proves, against which policy), datasets (upload, checked here
first; list), functions (list, register) and the audit log (its hash chain checked)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from confide.console.app import TASK_ID_RE, Console, form_of, redirect
from confide.console.forms import MAX_BODY_BYTES
from confide.console.html import esc, field, form, notice, page, pre, table, when
from confide.enclave.errors import ConfideError

SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_TASKS_SCANNED = 100


def register_form(console: Console, request: Request) -> str:
    """What the inbox shows while the platform does not know this party's key."""
    frame = console.frame(request)
    body = notice(f"The platform does not know this key yet: {console.name_error}", kind="warning")
    body += (
        "<p>Register this party's public keys under a name (the name is for people: every manifest "
        f"pins your fingerprint <code>{esc(console.client.fingerprint)}</code>, not the name).</p>"
    )
    return body + form(
        frame, "/register", field("name", "Your name on the platform", required=True), label="Register"
    )


def register(console: Console, request: Request) -> Response:
    console.client.register(form_of(request).required("name", "Your name on the platform"))
    console.forget_name()
    return redirect("/")


def service(console: Console, request: Request) -> str:
    c = console.client
    key = c.attest()  # a fresh nonce on every view: what the page shows was verified just now
    claims = key.claims
    rows = [
        ["Service key", f"<code>{esc(key.fingerprint)}</code>"],
        ["Backend", esc(claims.backend) + (" <strong>(SIMULATED)</strong>" if claims.simulated else "")],
        ["Measurement", f'<code class="digest">{esc(claims.measurement)}</code>'],
        ["Signer", f"<code>{esc(claims.signer or '-')}</code>"],
        ["Debug", esc(claims.debug)],
        ["Security version", esc(claims.security_version)],
        ["TCB status", esc(claims.tcb_status or "-")],
        ["Evidence issued", esc(when(claims.issued_at))],
        ["Verified at", esc(when(key.attested_at))],
    ]
    body = notice(f"The service's evidence (fresh nonce) passed your policy ({c.policy.source}).")
    body += table(("Claim", "Value"), rows, caption="Verified attestation claims", empty="")
    body += "<h2>The policy it was checked against</h2>" + pre(c.policy.to_toml(), label="policy")
    return page(console.frame(request), "The enclave service", body, current="/service")


def datasets(console: Console, request: Request) -> str:
    frame = console.frame(request)
    body = ""
    if request.method == "POST":
        body += _upload(console, request)
    c = console.client
    names = c.party_names()
    used = _tasks_by_dataset(console)
    rows = []
    from confide.client.dataset_ref import make_ref

    for d in c.datasets():
        mine = d.get("owner") == c.fingerprint
        ref = make_ref(str(d["dataset_id"]), str(d["owner"]), str(d["ciphertext_sha256"])) if mine else ""
        rows.append(
            [
                esc(d.get("name")),
                esc(names.get(str(d.get("owner"))) or d.get("owner")),
                esc(d.get("rows")),
                esc(", ".join(map(str, (d.get("schema") or {}).get("columns") or ()))),
                esc(d.get("size")),
                esc(when(d.get("created_at"))),
                f"<code>{esc(ref)}</code>" if ref else "-",
                " ".join(
                    f'<a href="/tasks/{esc(t)}">{esc(t[:8])}</a>' for t in used.get(str(d["dataset_id"]), [])
                )
                or "-",
            ]
        )
    body += "<section><h2>Upload a dataset</h2><p>The file is checked and encrypted on this machine; its key is wrapped to the attested service. The platform sees only its name, columns and row count.</p>"
    inner = field("file", "CSV file", kind="file", required=True)
    inner += field("name", "Name", hint="visible to the platform (default: the file name)")
    inner += field("strict", "Refuse to upload a file with CSV problems", kind="checkbox")
    # shown by static/upload.js, which posts the same form and reports how much it has sent
    inner += (
        '<p id="upload-progress-row" hidden><label for="upload-progress">Upload progress</label>'
        '<progress id="upload-progress" max="100" value="0"></progress></p>'
        '<p id="upload-progress-status" class="plot-note" role="status" aria-live="polite"></p>'
    )
    attrs = {"data-progress": "upload-progress", "data-max-bytes": str(MAX_BODY_BYTES - (1 << 20))}
    body += (
        form(frame, "/datasets", inner, label="Upload", multipart=True, button_class="primary", attrs=attrs)
        + "</section>"
    )
    body += "<section><h2>Datasets</h2>"
    body += table(
        ("Name", "Owner", "Rows", "Columns", "Bytes", "Uploaded", "Reference to share", "Used by tasks"),
        rows,
        caption="Datasets you own or that tasks you take part in read",
        empty="No datasets.",
    )
    body += "</section>"
    return page(frame, "Datasets", body, current="/datasets", scripts=("upload.js",))


def _tasks_by_dataset(console: Console) -> dict[str, list[str]]:
    """dataset id -> the tasks (that this party takes part in) whose manifest reads it, the most
    recent MAX_TASKS_SCANNED tasks only."""
    used: dict[str, list[str]] = {}
    tasks = sorted(console.client.tasks(), key=lambda t: t.get("created_at") or 0, reverse=True)
    for t in tasks[:MAX_TASKS_SCANNED]:
        task_id = str(t.get("task_id"))
        try:
            manifest = console.manifest(task_id)
        except ConfideError:
            continue  # shown as refused on the task's own page
        for i in manifest.inputs:
            used.setdefault(i.dataset_id, []).append(task_id)
    return used


def _upload(console: Console, request: Request) -> str:
    from confide.client.csv_check import check_csv

    f = form_of(request)
    upload = f.files.get("file")
    if upload is None or not upload.data:
        raise ConfideError("choose a non-empty file", where="CSV file")
    stem = SAFE_NAME_RE.sub("_", Path(upload.filename).stem)[:64] or "dataset"
    name = f.get("name").strip() or stem
    with tempfile.TemporaryDirectory(prefix="confide-console-") as tmp:
        path = Path(tmp) / f"{stem}.csv"
        path.write_bytes(upload.data)
        report = check_csv(path)
        problems = [
            f"{p.message} (line {p.line})" if p.line is not None else p.message for p in report.problems
        ]
        if problems and f.get("strict"):
            raise ConfideError(
                f"{len(problems)} CSV problem(s), nothing uploaded: " + "; ".join(problems),
                where=upload.filename,
            )
        ref = console.client.upload_dataset(path, name=name)
    out = "".join(notice(f"warning: {p}", kind="warning") for p in problems)
    out += notice(f"Uploaded {name!r}: {ref.rows} rows, columns {', '.join(ref.columns)}.")
    out += f'<p>Share this reference with task creators: <code class="ref">{esc(ref.ref)}</code></p>'
    return out


def functions(console: Console, request: Request) -> str:
    frame = console.frame(request)
    c = console.client
    body = ""
    if request.method == "POST":
        f = form_of(request)
        digest = c.register_function(
            f.required("source", "Source"),
            name=f.required("name", "Name"),
            version=f.get("version").strip() or "1",
            outputs=[o.strip() for o in f.required("outputs", "Outputs").split(",") if o.strip()],
            inputs=[i.strip() for i in (f.get("inputs").strip() or "*").split(",") if i.strip()],
            description=f.get("description").strip(),
            confidential=bool(f.get("confidential")),
        )
        body += notice(f"Registered function {f.get('name')!r}: digest {digest}.")
    names = c.party_names()
    rows = [
        [
            esc(fn.get("name")),
            esc(fn.get("version")),
            _brief(str(fn.get("description") or "")),
            esc(fn.get("kind")),
            esc(names.get(str(fn.get("owner"))) or fn.get("owner") or "- (built in)"),
            "confidential" if fn.get("confidential") else "clear",
            f"<code>{esc(fn.get('digest'))}</code>",
        ]
        for fn in c.functions()
    ]
    body += "<section><h2>Functions</h2>"
    body += table(
        ("Name", "Version", "Description", "Kind", "Owner", "Code", "Digest"),
        rows,
        caption="Functions you can use",
        empty="No functions.",
    )
    body += "</section><section><h2>Register a function</h2>"
    inner = field("name", "Name", required=True)
    inner += field("version", "Version", value="1")
    inner += field("outputs", "Outputs", hint="comma-separated output names", required=True)
    inner += field("inputs", "Inputs", value="*", hint="comma-separated input names, * for any")
    inner += field("description", "Description")
    inner += field("source", "Source", kind="textarea", hint="a Python file defining run(ctx)", required=True)
    inner += field("confidential", "Confidential: seal the source to the attested service", kind="checkbox")
    body += form(frame, "/functions", inner, label="Register", button_class="primary") + "</section>"
    return page(frame, "Functions", body, current="/functions")


def _brief(text: str, *, chars: int = 160) -> str:
    """A long description's first sentence, the rest behind a <details> (the built-ins' texts say
    every parameter: a screenful each)."""
    if len(text) <= chars:
        return esc(text)
    cut = text.find(". ", 0, chars)
    cut = cut + 1 if cut > 0 else text.rfind(" ", 0, chars)
    if cut <= 0:
        cut = chars
    return f"{esc(text[:cut])} <details><summary>More</summary>{esc(text[cut:].strip())}</details>"


def _compact(detail: object) -> str:
    import json

    if not detail:
        return ""
    return json.dumps(detail, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def audit(console: Console, request: Request) -> str:
    from confide.client.audit_pins import PinStore

    c = console.client
    task_id = request.query_params.get("task") or None
    if task_id is not None and not TASK_ID_RE.fullmatch(task_id):
        raise ConfideError("not a task id (32 hex digits)", where=f"task {task_id[:40]!r}")
    events = c.audit(task_id)  # raises (shown as a refusal) when the chain or the pins do not check
    names = c.party_names()
    pin = PinStore(c.home.root / "audit-pins.json").platform(c.service.fingerprint).get("head") or {}
    scope = f"of task {task_id}" if task_id else "visible to you"
    body = notice(
        f"Hash chain verified: {len(events)} event(s) {scope}, every hash and link checked; "
        f"pinned head: event {pin.get('seq', '-')}."
    )
    if task_id:
        body += '<p><a href="/audit">All events visible to you</a></p>'
    if pin.get("sha256"):
        body += f'<p>Pinned head sha256 <code class="digest">{esc(pin.get("sha256"))}</code></p>'
    rows = [
        [
            esc(ev.get("seq")),
            esc(when(ev.get("time"))),
            esc(ev.get("kind")),
            f'<span class="wrap">{esc(names.get(str(ev.get("actor"))) or ev.get("actor") or "-")}</span>',
            f"<code>{esc(ev.get('task_id') or '-')}</code>",
            f'<span class="wrap">{esc(_compact(ev.get("detail")))}</span>',
        ]
        for ev in reversed(events)
    ]
    body += table(
        ("Event", "Time", "Kind", "Actor", "Task", "Detail"),
        rows,
        caption=f"Audit events {scope}, newest first",
        empty="No events.",
    )
    return page(console.frame(request), "Audit log", body, current="/audit")
