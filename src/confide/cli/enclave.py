"""`confide measure`, `platform`, `enclave`: the local enclave runtime and its simulated platform."""

from __future__ import annotations

import json
from pathlib import Path

import click

from confide.cli.common import friendly, home, write_new
from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import ConfideError
from confide.enclave.measurement import measure


@click.command(name="measure")
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), default=None, help="enclave config (TOML)"
)
@click.option("--json", "as_json", is_flag=True, help="print the full measured manifest")
@friendly
def measure_cmd(config: Path | None, as_json: bool) -> None:
    """Print the measurement of the installed enclave runtime."""
    m = measure(EnclaveConfig.load(config))
    if as_json:
        click.echo(json.dumps({"measurement": m.value, "manifest": m.manifest}, indent=2))
    else:
        click.echo(m.value)


@click.group()
def platform() -> None:
    """The simulated TEE platform of this installation."""


@platform.command(name="init")
@friendly
def platform_init() -> None:
    """Create the simulated vendor root, platform attestation key and platform secret."""
    plat = home().platform()
    click.echo(f"simulated platform at {plat.directory} (SIMULATION: no protection against the host)")


@click.group()
def enclave() -> None:
    """Start the enclave runtime and talk to it."""


@enclave.command(name="evidence")
@click.option("--nonce", required=True, help="hex nonce to bind")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@friendly
def enclave_evidence(nonce: str, out: Path, config: Path | None) -> None:
    """Start an enclave and write its evidence for NONCE."""
    try:
        raw = bytes.fromhex(nonce)
    except ValueError:
        raise ConfideError("not valid hex", where="--nonce") from None
    with home().start_enclave(config) as enc:
        write_new(out, enc.evidence(raw))
        click.echo(
            f"evidence of enclave {enc.info['fingerprint']} (measurement {enc.info['measurement']}) -> {out}"
        )


@enclave.command(name="info")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@friendly
def enclave_info(config: Path | None) -> None:
    """Start an enclave and print what it says about itself (unverified: use `verify` for trust)."""
    with home().start_enclave(config) as enc:
        click.echo(json.dumps({**enc.info, "start_seconds": round(enc.start_seconds, 3)}, indent=2))
