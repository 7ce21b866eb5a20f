"""`confide dataset`: datasets encrypted on your machine, keys wrapped to the attested service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client

if TYPE_CHECKING:
    from confide.client.sdk import Client, DatasetRef


@click.group(name="dataset")
def dataset() -> None:
    """Datasets: encrypted on your machine, key wrapped to the attested service."""


@dataset.command(name="upload")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", default=None, help="visible name (default: the file name)")
@click.option(
    "--strict",
    is_flag=True,
    help="refuse to upload a file with CSV problems (default: print them as warnings and upload)",
)
@click.option(
    "--pme-keys",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="for a Parquet file with modular encryption: a JSON file of its master keys (id -> base64 "
    "key), sealed with the file so that only the enclave's sandbox can open it",
)
@click.option(
    "--key-material",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="with --pme-keys: parquet-mr's external key material file (default: the "
    "_KEY_MATERIAL_FOR_<name>.json beside PATH, if there is one)",
)
@click.option(
    "--secret",
    is_flag=True,
    help="a private key or other secret (the sign built-in's key): no CSV check, and the platform "
    "is shown no header line or row count, only the sealed file's size",
)
@click.option(
    "--min-k",
    type=int,
    default=None,
    help="a standing rule sealed with the data: the enclave lets only join-aggregate, sql or describe "
    "with a cohort threshold of at least K read this dataset, whatever is approved later",
)
@with_client
def dataset_upload(
    client: Client,
    path: Path,
    name: str | None,
    strict: bool,
    pme_keys: Path | None,
    key_material: Path | None,
    secret: bool,
    min_k: int | None,
) -> None:
    """Encrypt PATH, wrap its key to the attested service, upload; prints the dataset reference to share.

    PATH is checked on this machine first (empty or binary file, rows whose field count differs from
    the header's, a numeric column with some non-numeric values), each problem named by line: once
    sealed, nobody but the enclave can read the file to find them. A Parquet file is read here
    instead (its columns and row count are what the platform sees); one with modular encryption
    (PME) is opened here with the --pme-keys first."""
    from confide.client import pme_dataset
    from confide.client.csv_check import check_csv
    from confide.enclave.errors import ConfideError

    if key_material is not None and pme_keys is None:
        raise click.UsageError("--key-material goes with --pme-keys", ctx=click.get_current_context())
    if secret:
        if pme_keys is not None or strict or min_k is not None:
            raise click.UsageError("--secret goes alone", ctx=click.get_current_context())
        from confide.client.custody import upload_key

        _uploaded(upload_key(client, path, name=name))
        return
    if pme_dataset.is_parquet(path) or pme_keys is not None:
        keys = pme_dataset.load_master_keys(pme_keys) if pme_keys is not None else None
        ref = client.upload_dataset(path, name=name, master_keys=keys, key_material=key_material, min_k=min_k)
        _uploaded(ref)
        return
    report = check_csv(path) if path.suffix.lower() not in (".npy", ".npz") else None  # arrays: no CSV
    for problem in report.problems if report is not None else ():
        where = f"{path}:{problem.line}" if problem.line is not None else str(path)
        click.echo(f"{'error' if strict else 'warning'}: {problem.message} ({where})", err=True)
    if report is not None and report.problems and strict:
        raise ConfideError(
            f"{len(report.problems)} CSV problem(s) found; nothing was uploaded (--strict)", where=str(path)
        )
    _uploaded(client.upload_dataset(path, name=name, min_k=min_k))


@dataset.command(name="upload-password")
@click.option("--name", default="password", show_default=True, help="visible name")
@with_client
def dataset_upload_password(client: Client, name: str) -> None:
    """Upload one password for the password-check built-in, typed at a hidden prompt (or one line on
    standard input): it is padded to 8 KiB and sealed here, so the platform sees neither it nor its
    length; prints the dataset reference."""
    from confide.client.custody import upload_password

    password = click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    _uploaded(upload_password(client, password, name=name))


def _uploaded(ref: DatasetRef) -> None:
    click.echo(
        f"dataset {ref.dataset_id} uploaded; share this reference (it pins you as the owner and "
        "the ciphertext's digest):",
        err=True,
    )
    click.echo(ref.ref)


@dataset.command(name="show")
@click.argument("dataset_id")
@with_client
def dataset_show(client: Client, dataset_id: str) -> None:
    """Visible metadata of a dataset (owner, columns, rows, ciphertext digest)."""
    ref = client.dataset(dataset_id)
    click.echo(json.dumps({**ref.__dict__, "columns": list(ref.columns)}, indent=2))


# ---- the everyday verbs: list, delete ----------------------------------------------------------------


@dataset.command(name="list")
@click.option("--mine", is_flag=True, help="only datasets you own")
@click.option("--json", "as_json", is_flag=True, help="same as -o json")
@click.option("-o", "--output-format", "output_format", type=click.Choice(("table", "json")), default=None)
@with_client
def dataset_list(client: Client, mine: bool, as_json: bool, output_format: str | None) -> None:
    """Datasets you own, and those read by tasks you take part in (metadata only: name, owner,
    columns, rows, ciphertext size and digest)."""
    from confide.cli.output import emit, iso, named, pick_format

    fmt = pick_format(as_json, output_format)
    rows = client.datasets()
    if mine:
        rows = [r for r in rows if r.get("owner") == client.fingerprint]
    names = client.party_names()
    for r in rows:
        r["owner_name"] = names.get(str(r.get("owner")))
        r["created_at"] = iso(r.get("created_at"))
        r["owner_shown"] = named(r.get("owner"), names)
        r["columns"] = ", ".join(map(str, (r.get("schema") or {}).get("columns") or ()))
    if fmt == "json":
        for r in rows:
            r.pop("owner_shown", None)
    emit(
        fmt,
        rows,
        columns=(
            ("dataset_id", "DATASET"),
            ("name", "NAME"),
            ("owner_shown", "OWNER"),
            ("rows", "ROWS"),
            ("columns", "COLUMNS"),
            ("size", "BYTES"),
            ("created_at", "UPLOADED"),
        ),
        empty="no datasets",
    )


@dataset.command(name="delete")
@click.argument("dataset_id")
@click.option("--yes", is_flag=True, help="do not ask")
@with_client
def dataset_delete(client: Client, dataset_id: str, yes: bool) -> None:
    """Delete your dataset from the platform: its record, its key envelope (the data key wrapped
    to the enclave service) and its ciphertext in the blob store. Tasks that would read it fail
    if run after.

    \b
    What this does NOT do:
      - recall anything already derived from it: outputs of tasks that ran on it stay with their
        recipients;
      - bind a hostile platform: it may have kept copies of the ciphertext and the key envelope.
        The ciphertext alone is useless without the data key; the envelope opens only inside the
        attested service, which uses it only for a task whose manifest you signed, so such copies
        let it re-run at most tasks you already approved (and withdrawn approvals it kept).
      - erase your own copy, or a copy a participant downloaded (the ciphertext is readable to
        participants of tasks that read it; it is useless to them without the key)."""
    from confide.enclave.errors import ConfideError

    if not yes and not click.confirm(f"delete dataset {dataset_id} from the platform?", err=True):
        raise ConfideError("not deleted", where=f"dataset {dataset_id}")
    reply = client.delete_dataset(dataset_id)
    blob = (
        "ciphertext removed from the blob store"
        if reply.get("blob_removed")
        else "ciphertext kept (still referenced)"
    )
    click.echo(f"deleted dataset {dataset_id}; {blob}")
