"""`confide dataset`: datasets encrypted on your machine, keys wrapped to the attested service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client

if TYPE_CHECKING:
    from confide.client.sdk import Client


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
