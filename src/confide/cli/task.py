"""`confide task`: create, review, approve, run tasks and fetch their results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from confide.cli.common import EXIT_FAILED, parse_assignments, parse_params, with_client
from confide.cli.output import UsageProblem, emit, iso, named, output_option
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.group(name="task")
def task() -> None:
    """Tasks: create, review, approve, run, fetch results."""


@task.command(name="create")
@click.option(
    "--function",
    "function_ref",
    required=True,
    help="built-in name (gbdt-train), one of your functions as NAME[@VERSION], or a function digest",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    help="NAME=DATASET_REF (repeat): the cds1:... reference the owner's `dataset upload` printed",
)
@click.option(
    "--output",
    "outputs",
    multiple=True,
    help="NAME=RECIPIENT[,RECIPIENT...] (repeat); a recipient is a party name, a .pub file or a fingerprint",
)
@click.option(
    "--max-output",
    "max_outputs",
    multiple=True,
    help="NAME=SIZE: the most bytes output NAME may hold, e.g. 64KiB, 10MB (default 64MiB)",
)
@click.option(
    "--pad",
    "pads",
    multiple=True,
    help="NAME=pow2|SIZE: pad output NAME to a power of two or a multiple of SIZE, so the host sees "
    "only the bucket, not the exact size",
)
@click.option(
    "--error-max-bytes",
    type=click.IntRange(64, 1 << 20),
    default=None,
    help="cap on the function's sealed error text (default 4096); approvers see it",
)
@click.option(
    "--max-runs",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="your approval allows at most this many runs per enclave worker (retries included)",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    help="KEY=VALUE; VALUE parsed as JSON when it parses; KEY=@FILE reads VALUE from FILE",
)
@click.option("--params-json", default=None, help="all parameters as one JSON object")
@with_client
def task_create(
    client: Client,
    function_ref: str,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    max_outputs: tuple[str, ...],
    pads: tuple[str, ...],
    error_max_bytes: int | None,
    max_runs: int,
    params: tuple[str, ...],
    params_json: str | None,
) -> None:
    """Create a task; prints its id. Nothing runs until every owner approved and someone runs it.

    A recipient given by name must match exactly one registered party (names are not unique: if
    several match, the error lists them; give the fingerprint or .pub file). The manifest pins
    each recipient's fingerprint and keys, and every approver sees them before signing."""
    values: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = json.loads(params_json)
        except ValueError as exc:
            raise ConfideError(f"not valid JSON ({exc})", where="--params-json") from None
        if not isinstance(loaded, dict):
            raise ConfideError("must be a JSON object", where="--params-json")
        values.update(loaded)
    values.update(parse_params(params, from_files=True))
    caps = {
        name: parse_size(size, where=f"--max-output {name}")
        for name, size in parse_assignments(max_outputs, what="--max-output").items()
    }
    out_map: dict[str, list[str]] = {}
    for name, refs in parse_assignments(outputs, what="--output").items():
        recipients = [r.strip() for r in refs.split(",") if r.strip()]
        if not recipients:
            raise UsageProblem(f"output {name!r} has no recipient", where="--output")
        out_map[name] = [client.resolve_party(r, where=f"--output {name}") for r in recipients]
    pad_map: dict[str, str | int] = {}
    for name, how in parse_assignments(pads, what="--pad").items():
        pad_map[name] = "pow2" if how.strip().lower() == "pow2" else parse_size(how, where=f"--pad {name}")
    for option, given in (("--max-output", caps), ("--pad", pad_map)):
        unknown = sorted(set(given) - set(out_map))
        if unknown:
            raise UsageProblem(f"no --output named {', '.join(map(repr, unknown))}", where=option)
    task_id = client.create_task(
        function=client.resolve_function(function_ref, where="--function"),
        inputs=parse_assignments(inputs, what="--input"),
        outputs=out_map,
        params=values,
        max_output=caps,
        pad=pad_map,
        error_max_bytes=error_max_bytes,
        max_runs=max_runs,
    )
    click.echo(task_id)


@task.command(name="show")
@click.argument("task_id")
@output_option
@with_client
def task_show(client: Client, task_id: str, fmt: str) -> None:
    """What the task does, exactly as an approval would cover it, and its state. The function's
    code: `confide function show DIGEST --source` (clear functions only)."""
    info = client.task(task_id)
    manifest = client.manifest(task_id)
    approvers = [str(a.get("party", "?")) for a in info.get("approvals", [])]
    waiting = [fp for fp in manifest.required_approvals() if fp not in approvers]
    if fmt == "json":
        from confide.cli.output import emit_json

        emit_json(
            {
                "task_id": task_id,
                "state": info.get("state"),
                "attempts": info.get("attempts", 0),
                "manifest_sha256": manifest.digest,
                "function": {"name": manifest.function.name, "digest": manifest.function_digest},
                "creator": {"fingerprint": manifest.creator, "name": manifest.name_of(manifest.creator)},
                "approved_by": [{"fingerprint": fp, "name": manifest.name_of(fp)} for fp in approvers],
                "waiting_for": [{"fingerprint": fp, "name": manifest.name_of(fp)} for fp in waiting],
                "created_at": iso(info.get("created_at")),
                "updated_at": iso(info.get("updated_at")),
                "manifest": info.get("manifest"),
            }
        )
        return
    click.echo(client.describe(task_id))
    names = {p.fingerprint: p.name for p in manifest.participants}
    approved = ", ".join(named(fp, names) for fp in approvers) or "nobody yet"
    click.echo(f"state: {info.get('state')} (attempts {info.get('attempts', 0)}); approved by: {approved}")
    if info.get("state") == "running":
        click.echo(state_reason(info))
    if waiting and info.get("state") in ("created", "queued", "failed"):
        click.echo(f"waiting for: {', '.join(named(fp, names) for fp in waiting)}")
    kind = "confidential (sealed to the enclave)" if manifest.confidential else "clear"
    if manifest.function.kind == "python":
        click.echo(f"code ({kind}): confide function show {manifest.function_digest} --source")


@task.command(name="approve")
@click.argument("task_id")
@click.option("--digest", default=None, help="approve only if the manifest digest is exactly this")
@click.option("--yes", is_flag=True, help="do not ask (the summary is still printed)")
@click.option(
    "--max-runs",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="allow at most this many runs per enclave worker (retries after a lost worker included)",
)
@with_client
def task_approve(client: Client, task_id: str, digest: str | None, yes: bool, max_runs: int) -> None:
    """Show the task and sign your approval of exactly that manifest.

    The enclave counts runs per worker in its sealed state; a host that rolls that state back or
    uses another worker gets max-runs more runs each time (docs/PROTOCOL.md, Run limits)."""
    manifest = client.manifest(task_id)
    click.echo(client.describe(task_id))
    if not yes and not click.confirm(f"approve manifest {manifest.digest}?", err=True):
        raise ConfideError("not approved", where=f"task {task_id}")
    client.approve(task_id, expect_digest=digest or manifest.digest, max_runs=max_runs)
    click.echo(f"approved {task_id} (manifest {manifest.digest})")


_EXPECT_HELP = (
    "accept only results of this manifest digest (for scripts running where this party's home, which "
    "records the manifests it created or approved, is not)"
)


def expect_option(fn: Any) -> Any:
    return click.option(
        "--expect-manifest", "expect_manifest", default=None, metavar="DIGEST", help=_EXPECT_HELP
    )(fn)


@task.command(name="run")
@click.argument("task_id")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600, show_default=True)
@expect_option
@with_client
def task_run(client: Client, task_id: str, wait: bool, timeout: float, expect_manifest: str | None) -> None:
    """Queue the task; with --wait, follow it to the end and check its receipt."""
    client.run(task_id)
    click.echo(f"queued {task_id}", err=True)
    if wait:
        _follow(client, task_id, timeout, expect_manifest)


@task.command(name="wait")
@click.argument("task_id")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600, show_default=True)
@expect_option
@with_client
def task_wait(client: Client, task_id: str, timeout: float, expect_manifest: str | None) -> None:
    """Follow a task until it succeeds or fails; exits 1 if it failed."""
    _follow(client, task_id, timeout, expect_manifest)


def state_reason(info: dict[str, Any], *, now: float | None = None) -> str:
    """Why the task is in its state, from what the platform reports (its worker's lease, attempts)."""
    import time

    state = info.get("state")
    attempt = info.get("attempts", 0)
    if state == "running":
        owner = info.get("lease_owner") or "a worker"
        expires = info.get("lease_expires")
        if not isinstance(expires, (int, float)):
            return f"running on {owner} (attempt {attempt})"
        left = expires - (time.time() if now is None else now)
        if left >= 0:
            return (
                f"running on {owner} (attempt {attempt}); its lease runs {left:.0f} s more and is "
                "renewed while the worker lives"
            )
        return (
            f"running on {owner} (attempt {attempt}), but its lease expired {-left:.0f} s ago: the worker "
            "is gone, and a server will queue the task again"
        )
    if state == "queued":
        return f"queued (attempt {attempt + 1} next): waiting for a free enclave worker"
    if state == "created":
        return "created: nothing runs until every owner approved it and someone runs it (task run)"
    return ""


def _follow(client: Client, task_id: str, timeout: float, expect_manifest: str | None = None) -> None:
    info = client.wait(
        task_id,
        timeout=timeout,
        on_state=lambda i: click.echo(f"  {task_id}: {state_reason(i) or i.get('state')}", err=True),
    )
    if not info.get("receipt"):
        why = f": {info['message']}" if info.get("message") else ""
        raise ConfideError(f"task {info.get('state')} without a receipt{why}", where=f"task {task_id}")
    body = client.receipt(task_id, info, expect_manifest=expect_manifest)
    if body.get("status") == "ok":
        click.echo(
            f"task {task_id} succeeded; receipt signed by service {client.service.fingerprint} verified"
        )
        return
    _report_failure(client, task_id, info, body, expect_manifest)


def _report_failure(
    client: Client,
    task_id: str,
    info: dict[str, Any],
    body: dict[str, Any],
    expect_manifest: str | None = None,
) -> None:
    """Say why the task failed: the enclave's signed error, and the function's own error text (its
    traceback) when it is sealed to us. Exits 1."""
    err = body.get("error") or {}
    text = _error_text(client, task_id, info, expect_manifest)
    if text:
        click.echo(f"the function's error (sealed to you by the enclave):\n{text.rstrip()}", err=True)
    click.echo(
        f"error: task {task_id} failed in the enclave ({err.get('check', '?')}): {err.get('message', '')}",
        err=True,
    )
    raise SystemExit(EXIT_FAILED)


def _error_text(
    client: Client, task_id: str, info: dict[str, Any], expect_manifest: str | None = None
) -> str | None:
    try:
        return client.error_report(task_id, info, expect_manifest=expect_manifest)
    except ConfideError as exc:
        click.echo(f"warning: cannot show the function's error text ({exc})", err=True)
        return None


@task.command(name="results")
@click.argument("task_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@expect_option
@with_client
def task_results(client: Client, task_id: str, out_dir: Path, expect_manifest: str | None) -> None:
    """Download the outputs addressed to you, check them against the receipt, decrypt into --out.
    For a task that failed in its function: show the function's error text (sealed to you), exit 1."""
    info = client.task(task_id)
    if info.get("receipt"):
        body = client.receipt(task_id, info, expect_manifest=expect_manifest)
        if body.get("status") != "ok":
            _report_failure(client, task_id, info, body, expect_manifest)
    result = client.results(task_id, out_dir, expect_manifest=expect_manifest)
    sizes = {str(o.get("name")): o for o in result.receipt.get("outputs", [])}
    for name, path in result.outputs.items():
        stored = sizes.get(name, {}).get("size")
        note = ""
        if isinstance(stored, int) and stored != path.stat().st_size:
            note = f" (padded to {stored} bytes for the host)"
        click.echo(f"{name}: {path} ({path.stat().st_size} bytes){note}")
    head = result.receipt.get("audit_head")
    if isinstance(head, dict):
        click.echo(f"receipt signs the audit log up to event {head.get('seq')} (checked)")


@task.command(name="logs")
@click.argument("task_id")
@with_client
def task_logs(client: Client, task_id: str) -> None:
    """What happened to the task: each run and attempt (worker, outcome, times), why it is in its
    state, and, if its function failed, the function's own error text (traceback), which the
    enclave sealed to the task's creator and output recipients; the host sees only its category."""

    def at(t: Any) -> str:
        return iso(t) or "-"

    info = client.task(task_id)
    click.echo(f"task {task_id}: {info.get('state')}")
    reason = state_reason(info)
    if reason:
        click.echo(f"  {reason}")
    if info.get("message"):
        click.echo(f"  platform: {info['message']}")
    for r in info.get("history") or []:
        outcome = r.get("status") or "?"
        if r.get("category") and r.get("category") != "ok":
            outcome += f" ({r['category']})"
        click.echo(
            f"  run {r.get('run')} attempt {r.get('attempt')} on {r.get('worker') or '-'}: {outcome}; "
            f"started {at(r.get('started_at'))}, ended {at(r.get('ended_at'))}"
        )
    if not info.get("receipt"):
        return
    body = client.receipt(task_id, info)
    err = body.get("error") or {}
    if body.get("status") == "ok":
        click.echo("  receipt: ok, signed by the attested service")
        return
    click.echo(f"  receipt: failed in the enclave ({err.get('check', '?')}): {err.get('message', '')}")
    text = _error_text(client, task_id, info)
    if text:
        click.echo("function error (sealed to you by the enclave):")
        click.echo(text.rstrip())


@task.command(name="receipt")
@click.argument("task_id")
@expect_option
@with_client
def task_receipt(client: Client, task_id: str, expect_manifest: str | None) -> None:
    """Print the task's receipt after checking the service's signature and the manifest digest."""
    click.echo(json.dumps(client.receipt(task_id, expect_manifest=expect_manifest), indent=2))


@task.command(name="reject")
@click.argument("task_id")
@click.option("--reason", default=None, help="why (shown to the other participants)")
@with_client
def task_reject(client: Client, task_id: str, reason: str | None) -> None:
    """Refuse a task you were added to: final; it can no longer run, your approval (if any) is
    withdrawn, and its participants lose access to your datasets' ciphertext through it. The
    platform enforces this; a run that already happened is not undone."""
    info = client.reject_task(task_id, reason=reason)
    click.echo(f"rejected {task_id} (state {info.get('state')})")


# ---- the everyday verbs: list, cancel, withdraw ------------------------------------------------------

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip


def parse_size(text: str, *, where: str) -> int:
    """`64KiB`, `10MB`, `1048576` -> bytes (KB/MB/GB are powers of 10; KiB/MiB/GiB and K/M/G of 2)."""
    import re

    from confide.enclave.task_fields import MAX_OUTPUT_BYTES

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise UsageProblem(f"not a size: {text!r} (examples: 65536, 64KiB, 10MB)", where=where)
    size = int(float(m.group(1)) * _UNITS[unit])
    if not 1 <= size <= MAX_OUTPUT_BYTES:
        raise UsageProblem(f"size must be 1 byte .. 1 TiB, got {text!r}", where=where)
    return size


@task.command(name="list")
@click.option("--pending", is_flag=True, help="only tasks waiting for your approval")
@click.option("--state", "states", multiple=True, help="only tasks in this state (repeat)")
@output_option
@with_client
def task_list(client: Client, pending: bool, states: tuple[str, ...], fmt: str) -> None:
    """Tasks you take part in (creator, data owner, recipient), oldest first; --pending: those
    that need your approval, which you have not given yet."""
    rows = client.tasks(pending=pending)
    if states:
        rows = [r for r in rows if r.get("state") in states]
    names = client.party_names()
    functions = {str(f["digest"]): f for f in client.functions()}
    for r in rows:
        fn = functions.get(str(r.get("function_digest")))
        r["function_name"] = r.get("function_name") or (fn.get("name") if fn else None)
        r["function"] = (
            f"{r['function_name']}@{fn.get('version')}" if fn else r.get("function_digest", "")[:16]
        )
        r["creator_name"] = names.get(str(r.get("creator")))
        r["created"] = named(r.get("creator"), names)
        r["created_at"] = iso(r.get("created_at"))
        r["updated_at"] = iso(r.get("updated_at"))
    emit(
        fmt,
        rows,
        columns=(
            ("task_id", "TASK"),
            ("state", "STATE"),
            ("function", "FUNCTION"),
            ("created", "CREATOR"),
            ("created_at", "CREATED"),
            ("updated_at", "UPDATED"),
        ),
        empty="no tasks waiting for your approval" if pending else "no tasks",
    )


@task.command(name="cancel")
@click.argument("task_id")
@with_client
def task_cancel(client: Client, task_id: str) -> None:
    """As the task's creator, cancel a task that is not running or done (created, queued, or
    failed): the platform never queues or runs it again.

    \b
    What this does NOT guarantee: the platform is untrusted, and a hostile one still holds the
    approvals given so far and could run the task anyway. A data owner who wants the enclave itself
    to refuse the task withdraws their approval (confide task withdraw)."""
    reply = client.cancel(task_id)
    click.echo(f"cancelled {task_id} (was {reply.get('was')})")


@task.command(name="withdraw")
@click.argument("task_id")
@with_client
def task_withdraw(client: Client, task_id: str) -> None:
    """Withdraw your approval of a task that has not run: the platform deletes it, and the enclave,
    which checks every required approval itself, then refuses to run the task.

    \b
    What this cannot do:
      - undo a run that already happened (its outputs went to their recipients);
      - stop a run in progress (refused: withdraw after it ends);
      - bind a hostile platform: it could have kept a copy of your signed approval and present it
        later. The approval covers only this exact manifest; for certainty, delete the dataset
        (confide dataset delete) or never approve."""
    reply = client.withdraw(task_id)
    click.echo(f"withdrew your approval of {task_id} (task {reply.get('state')})")
