"""`confide service`: the platform's enclave service, attested against your policy."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client

if TYPE_CHECKING:
    from confide.client.sdk import Client


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
