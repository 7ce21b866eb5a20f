"""`confide party`: parties registered on a platform."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client

if TYPE_CHECKING:
    from confide.client.sdk import Client


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
