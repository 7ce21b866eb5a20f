"""`confide model`: ONNX models, sealed on their owner's machine, keys wrapped to the attested service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from confide.cli.common import friendly, with_client

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.group(name="model")
def model() -> None:
    """Models for the `infer` built-in: uploaded like datasets, used only in tasks their owner approves."""


@model.command(name="upload")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", default=None, help="visible name (default: the file name)")
@click.option(
    "--layout",
    type=click.Choice(["auto", "inline", "external"]),
    default="auto",
    show_default=True,
    help="external: ONNX's external-data layout (weights apart from the graph), which the infer "
    "built-in's split mode needs for a model larger than the enclave's memory budget; auto: "
    "external above 64 MiB",
)
@with_client
def model_upload(client: Client, path: Path, name: str | None, layout: str) -> None:
    """Check PATH is an ONNX model, seal it here, wrap its key to the attested service, upload; prints
    the reference to share. Its input/output names and shapes, parameter count and FLOPs are visible
    to everyone (`confide model inspect` shows them first); its weights are not. A PyTorch model is
    exported first on your machine: torch.onnx.export(model.eval(), example, "model.onnx")."""
    ref = client.upload_model(path, name=name, layout=layout)
    click.echo(f"model {ref.dataset_id} uploaded; share this reference:", err=True)
    click.echo(ref.ref)


@model.command(name="inspect")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@friendly
def model_inspect(path: Path) -> None:
    """The metadata an upload of PATH makes visible to the platform and every party (JSON)."""
    from confide.enclave.errors import ConfideError
    from confide.infer.model_meta import model_meta

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfideError(f"cannot read model ({exc.strerror})", where=str(path)) from None
    click.echo(json.dumps(model_meta(data, where=str(path)), indent=2))
