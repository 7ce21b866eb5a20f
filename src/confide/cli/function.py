"""`confide function`: built-ins and your own `run(ctx)` code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client
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
