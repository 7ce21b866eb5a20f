"""`confide function`: built-ins and your own `run(ctx)` code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from confide.cli.common import home, parse_assignments, parse_params, with_client
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.sdk import Client


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
@click.option(
    "--try",
    "samples",
    multiple=True,
    metavar="INPUT=SAMPLE",
    help="dry run first on a sample file per input, in a local enclave's sandbox (repeat); "
    "nothing is registered if it fails",
)
@click.option("--param", "params", multiple=True, help="KEY=VALUE for the dry run (VALUE parsed as JSON)")
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
    samples: tuple[str, ...],
    params: tuple[str, ...],
) -> None:
    """Register SOURCE (a Python file defining run(ctx)); prints its digest.

    SOURCE is compiled here first and must define a top-level `def run(ctx)`: a syntax error is
    named by line before anything is sent. With --try, the function first runs on your sample files
    in a local enclave (the same runtime and sandbox as the platform's, simulated backend), and is
    registered only if it succeeds; its traceback is shown if it fails."""
    from confide.client.function_check import check_function_source

    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfideError(f"cannot read function source ({exc})", where=str(source)) from None
    check_function_source(text, filename=str(source))
    if params and not samples:
        raise ConfideError("--param is for the dry run: give --try INPUT=SAMPLE too", where="--param")
    if samples:
        _dry_run(client, text, source, samples, params, inputs, outputs)
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


def _dry_run(
    client: Client,
    text: str,
    source: Path,
    samples: tuple[str, ...],
    params: tuple[str, ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
) -> None:
    from confide.client.function_check import dry_run

    sample_map = {k: Path(v) for k, v in parse_assignments(samples, what="--try").items()}
    undeclared = sorted(set(sample_map) - set(inputs)) if inputs else []
    if undeclared:
        raise ConfideError(f"input {undeclared[0]!r} is not declared with --input", where="--try")
    click.echo(
        f"dry run of {source.name} on {len(sample_map)} sample(s) in a local enclave's sandbox "
        "(simulated backend; nothing is sent)…",
        err=True,
    )
    result = dry_run(
        text,
        samples=sample_map,
        outputs=outputs,
        params=parse_params(params),
        identity=client.identity,
        home=home(),
    )
    if not result.ok:
        if result.error_text:
            click.echo(result.error_text.rstrip(), err=True)
        raise ConfideError(
            f"dry run failed ({result.category}); nothing was registered", where=f"--try on {source}"
        )
    written = ", ".join(f"{name} {size} bytes" for name, size in result.outputs.items())
    click.echo(f"dry run ok in {result.duration_s:.2f} s: {written}", err=True)


# ---- the everyday verbs: list, show ------------------------------------------------------------------


@function.command(name="list")
@click.option("--mine", is_flag=True, help="only functions you own")
@click.option("--json", "as_json", is_flag=True, help="same as -o json")
@click.option("-o", "--output-format", "output_format", type=click.Choice(("table", "json")), default=None)
@with_client
def function_list(client: Client, mine: bool, as_json: bool, output_format: str | None) -> None:
    """Built-ins, the functions you own or registered, and those of tasks you take part in."""
    from confide.cli.output import emit, iso, named, pick_format

    fmt = pick_format(as_json, output_format)
    rows = client.functions()
    if mine:
        rows = [r for r in rows if r.get("owner") == client.fingerprint]
    names = client.party_names()
    for r in rows:
        r["owner_name"] = names.get(str(r.get("owner"))) if r.get("owner") else None
        r["created_at"] = iso(r.get("created_at"))
        r["ref"] = f"{r.get('name')}@{r.get('version')}"
        r["owner_shown"] = named(r.get("owner"), names) if r.get("owner") else "(built-in)"
        r["code"] = "confidential" if r.get("confidential") else "clear"
    if fmt == "json":
        for r in rows:
            for key in ("owner_shown", "ref", "code"):
                r.pop(key, None)
    emit(
        fmt,
        rows,
        columns=(
            ("ref", "FUNCTION"),
            ("digest", "DIGEST"),
            ("owner_shown", "OWNER"),
            ("code", "CODE"),
            ("created_at", "REGISTERED"),
        ),
        empty="no functions",
    )


@function.command(name="show")
@click.argument("ref", metavar="NAME[@VERSION]|DIGEST")
@click.option("--source", "show_source", is_flag=True, help="print the code (clear functions only)")
@click.option("--json", "as_json", is_flag=True, help="same as -o json")
@click.option("-o", "--output-format", "output_format", type=click.Choice(("table", "json")), default=None)
@with_client
def function_show(
    client: Client, ref: str, show_source: bool, as_json: bool, output_format: str | None
) -> None:
    """A function's descriptor (what approvers see); with --source, its code, checked against the
    digest the descriptor pins. A confidential function's code is sealed to the enclave: nobody
    else, the platform included, can read it, so there is no source to show."""
    from confide.cli.output import emit_json, pairs, pick_format

    fmt = pick_format(as_json, output_format)
    digest = client.resolve_function(ref, own=False, where="NAME[@VERSION]|DIGEST")
    descriptor, confidential, source = client.function_source(digest)
    info = {
        **descriptor.to_json(),
        "digest": descriptor.digest,
        "confidential": confidential,
    }
    if descriptor.owner:
        info["owner_name"] = client.party(descriptor.owner)[0]
    if show_source and confidential:
        raise ConfideError(
            f"function {descriptor.name!r} is confidential: its code is sealed to the enclave and "
            "nobody else can read it",
            where="--source",
        )
    if fmt == "json":
        if show_source:
            info["source"] = source
        emit_json(info)
        return
    if show_source:
        click.echo(source, nl=not (source or "").endswith("\n"))
        return
    info["code"] = "confidential (sealed to the enclave)" if confidential else "clear (--source shows it)"
    info["inputs"] = ", ".join(descriptor.inputs)
    info["outputs"] = ", ".join(descriptor.outputs)
    info["requirements"] = ", ".join(descriptor.requirements) or "none"
    info["owner"] = f"{info.get('owner_name')} ({descriptor.owner})" if descriptor.owner else "(built-in)"
    pairs(
        fmt,
        info,
        (
            ("name", "name"),
            ("version", "version"),
            ("digest", "digest"),
            ("kind", "kind"),
            ("owner", "owner"),
            ("code", "code"),
            ("inputs", "inputs"),
            ("outputs", "outputs"),
            ("requirements", "requires"),
            ("description", "description"),
        ),
    )
