"""`confide task`: create, review, approve, run tasks and fetch their results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from confide.cli.common import EXIT_FAILED, parse_assignments, with_client
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.group(name="task")
def task() -> None:
    """Tasks: create, review, approve, run, fetch results."""


@task.command(name="create")
@click.option(
    "--function", "function_ref", required=True, help="built-in name (gbdt-train) or function digest"
)
@click.option("--input", "inputs", multiple=True, help="NAME=DATASET_ID (repeat)")
@click.option("--output", "outputs", multiple=True, help="NAME=FINGERPRINT[,FINGERPRINT...] (repeat)")
@click.option("--param", "params", multiple=True, help="KEY=VALUE; VALUE parsed as JSON when it parses")
@click.option("--params-json", default=None, help="all parameters as one JSON object")
@with_client
def task_create(
    client: Client,
    function_ref: str,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    params: tuple[str, ...],
    params_json: str | None,
) -> None:
    """Create a task; prints its id. Nothing runs until every owner approved and someone runs it."""
    values: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = json.loads(params_json)
        except ValueError as exc:
            raise ConfideError(f"not valid JSON ({exc})", where="--params-json") from None
        if not isinstance(loaded, dict):
            raise ConfideError("must be a JSON object", where="--params-json")
        values.update(loaded)
    for key, raw in parse_assignments(params, what="--param").items():
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    out_map = {
        name: [fp.strip() for fp in fps.split(",") if fp.strip()]
        for name, fps in parse_assignments(outputs, what="--output").items()
    }
    task_id = client.create_task(
        function=function_ref,
        inputs=parse_assignments(inputs, what="--input"),
        outputs=out_map,
        params=values,
    )
    click.echo(task_id)


@task.command(name="show")
@click.argument("task_id")
@with_client
def task_show(client: Client, task_id: str) -> None:
    """What the task does, exactly as an approval would cover it, and its state."""
    info = client.task(task_id)
    click.echo(client.describe(task_id))
    approved = ", ".join(a.get("party", "?") for a in info.get("approvals", [])) or "nobody yet"
    click.echo(f"state: {info.get('state')} (attempts {info.get('attempts', 0)}); approved by: {approved}")


@task.command(name="approve")
@click.argument("task_id")
@click.option("--digest", default=None, help="approve only if the manifest digest is exactly this")
@click.option("--yes", is_flag=True, help="do not ask (the summary is still printed)")
@with_client
def task_approve(client: Client, task_id: str, digest: str | None, yes: bool) -> None:
    """Show the task and sign your approval of exactly that manifest."""
    manifest = client.manifest(task_id)
    click.echo(client.describe(task_id))
    if not yes and not click.confirm(f"approve manifest {manifest.digest}?", err=True):
        raise ConfideError("not approved", where=f"task {task_id}")
    client.approve(task_id, expect_digest=digest or manifest.digest)
    click.echo(f"approved {task_id} (manifest {manifest.digest})")


@task.command(name="run")
@click.argument("task_id")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600, show_default=True)
@with_client
def task_run(client: Client, task_id: str, wait: bool, timeout: float) -> None:
    """Queue the task; with --wait, follow it to the end and check its receipt."""
    client.run(task_id)
    click.echo(f"queued {task_id}", err=True)
    if wait:
        _follow(client, task_id, timeout)


@task.command(name="wait")
@click.argument("task_id")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600, show_default=True)
@with_client
def task_wait(client: Client, task_id: str, timeout: float) -> None:
    """Follow a task until it succeeds or fails; exits 1 if it failed."""
    _follow(client, task_id, timeout)


def _follow(client: Client, task_id: str, timeout: float) -> None:
    info = client.wait(
        task_id,
        timeout=timeout,
        on_state=lambda i: click.echo(
            f"  {task_id}: {i.get('state')} (attempt {i.get('attempts', 0)})", err=True
        ),
    )
    body = client.receipt(task_id, info)
    if body.get("status") == "ok":
        click.echo(
            f"task {task_id} succeeded; receipt signed by service {client.service.fingerprint} verified"
        )
        return
    err = body.get("error") or {}
    click.echo(
        f"error: task {task_id} failed in the enclave ({err.get('check', '?')}): {err.get('message', '')}",
        err=True,
    )
    raise SystemExit(EXIT_FAILED)


@task.command(name="results")
@click.argument("task_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@with_client
def task_results(client: Client, task_id: str, out_dir: Path) -> None:
    """Download the outputs addressed to you, check them against the receipt, decrypt into --out."""
    result = client.results(task_id, out_dir)
    for name, path in result.outputs.items():
        click.echo(f"{name}: {path}")


@task.command(name="receipt")
@click.argument("task_id")
@with_client
def task_receipt(client: Client, task_id: str) -> None:
    """Print the task's receipt after checking the service's signature and the manifest digest."""
    click.echo(json.dumps(client.receipt(task_id), indent=2))
