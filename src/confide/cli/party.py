"""`confide party`: parties registered on a platform, and `confide whoami`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client
from confide.cli.output import emit, emit_json, iso, output_option, pairs

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.group(name="party")
def party() -> None:
    """Parties registered on a platform. A name is free text ("Hospital A") chosen by its party
    and not unique; the fingerprint (a digest of the party's keys) is what manifests pin."""


@party.command(name="register")
@click.option("--name", required=True, help='the name other parties will see (free text: "Hospital A")')
@with_client
def party_register(client: Client, name: str) -> None:
    """Register your public keys with the platform (no password: calls are signed with your key)."""
    client.register(name)
    click.echo(f"registered {name!r} as {client.fingerprint}")


@party.command(name="rename")
@click.argument("new_name", metavar="NEW")
@output_option
@with_client
def party_rename(client: Client, new_name: str, fmt: str) -> None:
    """Change the name other parties see (a signed call, recorded in the audit log). Manifests
    already written keep the old name; they pin your fingerprint either way."""
    from confide.cli.output import UsageProblem
    from confide.client.api_auth import check_party_name
    from confide.enclave.errors import ConfideError
    from confide.enclave.task_fields import party_name

    try:
        check_party_name(new_name)
        party_name(new_name, "NEW")
    except ConfideError:
        raise UsageProblem(
            "a party name is 1..128 printable characters without surrounding spaces", where="NEW"
        ) from None
    reply = client.rename(new_name)
    if fmt == "json":
        emit_json(reply)
        return
    click.echo(f"renamed {client.fingerprint} from {reply.get('previous')!r} to {reply.get('name')!r}")


@party.command(name="list")
@click.option("--name", default=None, help="only parties registered with exactly this name")
@output_option
@with_client
def party_list(client: Client, name: str | None, fmt: str) -> None:
    """Registered parties: name, fingerprint, when they registered (every party sees this list)."""
    rows = client.parties(name=name)
    for r in rows:
        r["created_at"] = iso(r.get("created_at"))
        r["you"] = "yes" if r.get("fingerprint") == client.fingerprint else ""
    emit(
        fmt,
        rows,
        columns=(
            ("name", "NAME"),
            ("fingerprint", "FINGERPRINT"),
            ("created_at", "REGISTERED"),
            ("you", "YOU"),
        ),
        empty="no parties" + (f" named {name!r}" if name else ""),
    )


@click.command(name="whoami")
@output_option
@with_client
def whoami(client: Client, fmt: str) -> None:
    """Your fingerprint and the name the platform has for you."""
    info = {**client.whoami(), "url": client.api.url}
    pairs(fmt, info, (("name", "name"), ("fingerprint", "fingerprint"), ("url", "platform")))


party.add_command(whoami)
