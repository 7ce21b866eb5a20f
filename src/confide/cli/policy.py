"""`confide policy`: verification policies."""

from __future__ import annotations

from pathlib import Path

import click

from confide.cli.common import friendly, home, write_new
from confide.client.policy import (
    POLICY_FORMAT_EXAMPLES,
    Policy,
)
from confide.enclave.config import EnclaveConfig
from confide.enclave.measurement import measure


@click.group()
def policy() -> None:
    """Verification policies."""


@policy.command(name="init")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--dev", is_flag=True, help="accept the local SIMULATED enclave (development only)")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@friendly
def policy_init(out: Path | None, dev: bool, config: Path | None) -> None:
    """Write a policy: production defaults, or with --dev one pinned to this build's measurement that
    accepts simulated evidence."""
    here = home()
    target = out or here.policy_path
    target.parent.mkdir(parents=True, exist_ok=True)
    if dev:
        pol = Policy(
            backends=("sim",),
            measurements=(measure(EnclaveConfig.load(config)).value,),
            allow_simulation=True,
        )
        head = (
            "# DEVELOPMENT policy: accepts the SIMULATED backend, which protects nothing against the host.\n"
        )
    else:
        pol = Policy()
        head = "# Production policy: add the measurements (or auditor keys) you accept.\n"
    tail = "" if dev else POLICY_FORMAT_EXAMPLES
    write_new(target, (head + pol.to_toml() + tail).encode())
    click.echo(f"policy written to {target}")
