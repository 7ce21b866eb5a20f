"""`confide` commands for a party using a platform: register, attest the service, upload datasets,
register functions, create, inspect, approve and run tasks, fetch results, check receipts and the
audit log. Each command talks to the platform through `confide.Client`; each checks what it can
itself (evidence, digests, signatures) and trusts the platform with nothing.

Common options come from the environment too: CONFIDE_URL, CONFIDE_IDENTITY, CONFIDE_POLICY,
CONFIDE_SIM_ROOT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from confide.attest.anchors import load_trust_anchors, merge_anchors
from confide.cli.common import EXIT_FAILED, friendly, home
from confide.client import Client
from confide.client.local import parse_assignments
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity

DEFAULT_URL = "http://127.0.0.1:8470"


def _client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --identity, --policy, --sim-root, shared by every platform command."""
    for option in reversed(
        [
            click.option(
                "--url", envvar="CONFIDE_URL", default=DEFAULT_URL, show_default=True, help="platform URL"
            ),
            click.option(
                "--identity",
                envvar="CONFIDE_IDENTITY",
                type=click.Path(dir_okay=False, path_type=Path),
                required=True,
                help="your private identity file (confide keygen)",
            ),
            click.option(
                "--policy",
                "policy_path",
                envvar="CONFIDE_POLICY",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="verification policy for the service's evidence (default: $CONFIDE_HOME/policy.toml)",
            ),
            click.option(
                "--sim-root",
                envvar="CONFIDE_SIM_ROOT",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="trust this SIMULATED platform's vendor_root.crt (development only; real vendor roots are built in)",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _open_client(url: str, identity: Path, policy_path: Path | None, sim_root: Path | None) -> Client:
    h = home()
    anchors = h.anchors()
    if sim_root is not None:
        anchors = merge_anchors(anchors, load_trust_anchors(sim=[sim_root]))
    return Client(url, Identity.load(identity), policy=h.policy(policy_path), anchors=anchors, say=_say)


def _say(message: str) -> None:
    click.echo(message, err=True)


def with_client(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Open a Client from the common options and pass it as `client`."""

    @_client_options
    @wraps(fn)
    def wrapper(
        url: str, identity: Path, policy_path: Path | None, sim_root: Path | None, **kwargs: Any
    ) -> Any:
        with _open_client(url, identity, policy_path, sim_root) as client:
            return fn(client=client, **kwargs)

    return friendly(wrapper)


# ---- parties and the service ---------------------------------------------------------------------


@click.group(name="party")
def party() -> None:
    """Parties registered on a platform."""


@party.command(name="register")
@click.option("--name", required=True, help="the name other parties will see")
@with_client
def party_register(client: Client, name: str) -> None:
    """Register your public keys with the platform (no password: calls are signed with your key)."""
    client.register(name)
    click.echo(f"registered {name!r} as {client.fingerprint}")


@click.group(name="service")
def service() -> None:
    """The platform's enclave service."""


@service.command(name="attest")
@click.option("--json", "as_json", is_flag=True, help="print the verified claims as JSON")
@with_client
def service_attest(client: Client, as_json: bool) -> None:
    """Verify the service's evidence (fresh nonce) against your policy and print what it proves."""
    key = client.attest()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "service": key.public.to_line(),
                    "fingerprint": key.fingerprint,
                    "claims": key.claims.to_json(),
                },
                indent=2,
            )
        )
        return
    c = key.claims
    click.echo(f"service key {key.fingerprint} accepted by your policy")
    click.echo(
        f"  backend {c.backend}{' (SIMULATED: no protection against the host)' if c.simulated else ''}"
    )
    click.echo(f"  measurement {c.measurement}  debug {c.debug}  security version {c.security_version}")


# ---- datasets and functions ----------------------------------------------------------------------


@click.group(name="dataset")
def dataset() -> None:
    """Datasets: encrypted on your machine, key wrapped to the attested service."""


@dataset.command(name="upload")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", default=None, help="visible name (default: the file name)")
@with_client
def dataset_upload(client: Client, path: Path, name: str | None) -> None:
    """Encrypt PATH, wrap its key to the attested service, upload; prints the dataset id to share."""
    ref = client.upload_dataset(path, name=name)
    click.echo(ref.dataset_id)


@dataset.command(name="show")
@click.argument("dataset_id")
@with_client
def dataset_show(client: Client, dataset_id: str) -> None:
    """Visible metadata of a dataset (owner, columns, rows, ciphertext digest)."""
    ref = client.dataset(dataset_id)
    click.echo(json.dumps({**ref.__dict__, "columns": list(ref.columns)}, indent=2))


@click.group(name="function")
def function() -> None:
    """Functions: built-ins, or your own `run(ctx)` Python code (optionally confidential)."""


@function.command(name="register")
@click.argument("source", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", required=True)
@click.option("--version", "version", default="1", show_default=True)
@click.option("--description", default="", help="what the function does (data owners approve this)")
@click.option("--requires", "requirements", multiple=True, help="declared dependency (numpy, pandas, ...)")
@click.option(
    "--output", "outputs", multiple=True, required=True, help="name of an output it writes (repeat)"
)
@click.option("--input", "inputs", multiple=True, help="name of an input it reads (repeat; default: any)")
@click.option("--confidential", is_flag=True, help="seal the source to the enclave: nobody else reads it")
@with_client
def function_register(
    client: Client,
    source: Path,
    name: str,
    version: str,
    description: str,
    requirements: tuple[str, ...],
    outputs: tuple[str, ...],
    inputs: tuple[str, ...],
    confidential: bool,
) -> None:
    """Register SOURCE (a Python file defining run(ctx)); prints its digest."""
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfideError(f"cannot read function source ({exc})", where=str(source)) from None
    digest = client.register_function(
        text,
        name=name,
        version=version,
        description=description,
        requirements=requirements,
        inputs=inputs or ("*",),
        outputs=outputs,
        confidential=confidential,
    )
    click.echo(digest)


# ---- tasks ---------------------------------------------------------------------------------------


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


@click.command(name="audit")
@click.option("--task", "task_id", default=None, help="only this task's events")
@with_client
def audit(client: Client, task_id: str | None) -> None:
    """Audit events you may see, with their hash chain checked."""
    for ev in client.audit(task_id):
        click.echo(
            f"{ev.get('seq'):>6} {ev.get('time')} {ev.get('kind'):<18} {ev.get('actor', '')[:20]:<20} {ev.get('detail', '')}"
        )


COMMANDS = (party, service, dataset, function, task, audit)
