"""`confide verify` and `endorse`: evidence from real TEEs (or the simulation) checked against a policy."""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path

import click

from confide.attest import detect_hardware, verify_evidence
from confide.attest.anchors import anchors_from_directory, merge_anchors
from confide.attest.pccs import pccs_from_env
from confide.attest.report import certificate_collateral, claims_lines
from confide.cli.common import friendly, home, write_new
from confide.client.policy import (
    check_endorsement,
    evaluate,
    make_endorsement,
)
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfideError(f"cannot read {what} ({exc.strerror})", where=str(path)) from None


def _read_evidence(path: Path) -> bytes:
    """Evidence as stored: raw bytes (quotes, reports, sim JSON) or base64 text (Nitro documents)."""
    data = _read(path, "evidence")
    try:
        return base64.b64decode(b"".join(data.split()), validate=True) if data[:1] != b"{" else data
    except (binascii.Error, ValueError):
        return data


@click.command()
@click.argument("evidence", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--nonce", default=None, help="hex nonce the evidence must bind")
@click.option("--at", "at", type=int, default=None, help="verify as of this UNIX time (default: now)")
@click.option(
    "--collateral",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SGX/TDX: DCAP collateral JSON (dcap-qvl's layout); SEV-SNP: the VCEK/VLEK certificate",
)
@click.option(
    "--cert",
    "certs",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="SEV-SNP: VCEK/VLEK certificate (DER or PEM), optionally ASK/ARK too, or a certificate table "
    "(configfs-tsm auxblob)",
)
@click.option(
    "--pccs",
    "pccs_url",
    default=None,
    metavar="URL",
    help="SGX/TDX: fetch collateral from this PCCS when --collateral is not given (default: "
    "$CONFIDE_PCCS_URL, else none); cached under $CONFIDE_HOME/cache/pccs",
)
@click.option("--endorsement", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--roots",
    multiple=True,
    type=click.Path(path_type=Path),
    help="extra trust-anchor file or folder (Intel SGX root, AMD ASK+ARK bundles, AWS Nitro root); the "
    "vendor roots shipped with Confide are always trusted",
)
@click.option("--json", "as_json", is_flag=True)
@friendly
def verify(
    evidence: Path,
    policy_path: Path | None,
    nonce: str | None,
    at: int | None,
    collateral: Path | None,
    certs: tuple[Path, ...],
    pccs_url: str | None,
    endorsement: tuple[Path, ...],
    roots: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Verify EVIDENCE (format detected: sim, SGX/TDX quote, SEV-SNP report, Nitro document, or a
    provider's envelope) and check it against a policy. Exit 0 and print the claims, or exit 1 with
    the reason."""
    here = home()
    policy = here.policy(policy_path)
    when = at if at is not None else int(time.time())
    try:
        nonce_bytes = bytes.fromhex(nonce) if nonce is not None else None
    except ValueError:
        raise ConfideError("not valid hex", where="--nonce") from None
    anchors = merge_anchors(here.anchors(), *(anchors_from_directory(r) for r in roots))
    raw = _read_evidence(evidence)
    coll = _read(collateral, "collateral") if collateral else None
    if certs:
        if coll is not None:
            raise ConfideError(
                "give the SEV-SNP certificate with --cert or --collateral, not both", where="--cert"
            )
        if detect_hardware(raw).name != "sev-snp":
            raise ConfideError("--cert applies to SEV-SNP evidence only", where="--cert")
        coll = certificate_collateral([(str(p), _read(p, "certificate")) for p in certs])
    pccs = pccs_from_env(pccs_url, cache_dir=here.root / "cache" / "pccs")
    claims = verify_evidence(raw, at=when, anchors=anchors, collateral=coll, pccs=pccs)
    endorsed = tuple(check_endorsement(_read(p, "endorsement"), where=str(p)) for p in endorsement)
    evaluate(policy, claims, at=when, nonce=nonce_bytes, endorsements=endorsed)
    if as_json:
        click.echo(
            json.dumps({"verified": True, "policy": policy.source, "claims": claims.to_json()}, indent=2)
        )
        return
    click.echo(f"OK: {claims.backend} evidence verified and accepted by {policy.source}")
    for line in claims_lines(claims):
        click.echo(f"  {line}")
    if claims.simulated:
        click.echo("  WARNING: simulated evidence - no protection against the host", err=True)


@click.command()
@click.argument("measurement")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--statement", default="", help="what the auditor reviewed")
@friendly
def endorse(measurement: str, identity: Path, out: Path, statement: str) -> None:
    """As an auditor, sign MEASUREMENT; policies listing your key then accept it."""
    write_new(out, make_endorsement(measurement, Identity.load(identity), statement))
    click.echo(f"endorsement of {measurement} written to {out}")
