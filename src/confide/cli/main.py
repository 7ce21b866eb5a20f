"""The `confide` command. Every failure prints `error: <what> (<where>)` and exits non-zero:
1 for a refused or failed operation, 2 for bad usage; never a traceback."""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from confide import __version__
from confide.attest import detect_hardware, verify_evidence
from confide.attest.anchors import anchors_from_directory, merge_anchors
from confide.attest.pccs import pccs_from_env
from confide.attest.report import certificate_collateral, claims_lines
from confide.cli.common import EXIT_FAILED, friendly, home, write_new
from confide.cli.gramine import gramine as gramine_group
from confide.cli.platform_cmds import COMMANDS as TASK_COMMANDS
from confide.cli.serve import serve as serve_command
from confide.client.local import parse_assignments, run_function
from confide.client.policy import (
    POLICY_FORMAT_EXAMPLES,
    Policy,
    check_endorsement,
    evaluate,
    make_endorsement,
)
from confide.client.progress import byte_progress
from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity, load_public
from confide.enclave.measurement import measure
from confide.enclave.sealed_file import decrypt_file, encrypt_file, open_reader


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="confide")
def main() -> None:
    """Confide: confidential computing among parties who do not trust each other.

    The default TEE backend is a SIMULATION: it gives no protection against the host.
    """


# ---- keys and sealed files ----------------------------------------------------------------------


@main.command()
@click.argument("name")
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@friendly
def keygen(name: str, out_dir: Path) -> None:
    """Create a party identity: NAME.key (private, mode 0600) and NAME.pub (one shareable line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate(name)
    ident.save(out_dir / f"{name}.key")
    (out_dir / f"{name}.pub").write_text(ident.public.to_line() + "\n", encoding="utf-8")
    click.echo(f"identity {name}: fingerprint {ident.fingerprint}")
    click.echo(f"private key: {out_dir / (name + '.key')} (keep it secret)")
    click.echo(f"public line: {out_dir / (name + '.pub')}")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "recipients", multiple=True, required=True, help="recipient public line or .pub file")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--meta", multiple=True, help="metadata KEY=VALUE (authenticated, not secret)")
@click.option("--chunk-size", type=click.IntRange(1 << 10, 64 << 20), default=1 << 20, show_default=True)
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a terminal)")
@friendly
def encrypt(
    source: Path,
    recipients: tuple[str, ...],
    out: Path,
    meta: tuple[str, ...],
    chunk_size: int,
    progress: bool | None,
) -> None:
    """Seal a file to one or more recipients (chunked AES-256-GCM, key wrapped with HPKE)."""
    pubs = [load_public(r) for r in recipients]
    metadata = parse_assignments(meta, what="--meta")
    size = source.stat().st_size if source.exists() else 0
    with byte_progress(f"sealing {source.name}", size, force=bool(progress)) as advance:
        header = encrypt_file(
            source, out, recipients=pubs, metadata=metadata, chunk_size=chunk_size, progress=advance
        )
    click.echo(
        f"sealed {source} -> {out} for {', '.join(p.fingerprint for p in pubs)} (header {header.digest.hex()[:16]})"
    )


@main.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--progress/--no-progress", default=None)
@friendly
def decrypt(source: Path, identity: Path, out: Path, progress: bool | None) -> None:
    """Open a sealed file addressed to IDENTITY. On any failure nothing is written."""
    ident = Identity.load(identity)
    fh, reader = open_reader(source)
    fh.close()
    with byte_progress(f"opening {source.name}", reader.plaintext_size, force=bool(progress)) as advance:
        reader = decrypt_file(source, out, identity=ident, progress=advance)
    click.echo(
        f"opened {source} -> {out} ({reader.plaintext_size} bytes, metadata {json.dumps(reader.header.metadata)})"
    )


# ---- measurement, evidence, policy ---------------------------------------------------------------


@main.command(name="measure")
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


@main.command()
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


@main.command()
@click.argument("measurement")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--statement", default="", help="what the auditor reviewed")
@friendly
def endorse(measurement: str, identity: Path, out: Path, statement: str) -> None:
    """As an auditor, sign MEASUREMENT; policies listing your key then accept it."""
    write_new(out, make_endorsement(measurement, Identity.load(identity), statement))
    click.echo(f"endorsement of {measurement} written to {out}")


@main.group()
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


@main.group()
def platform() -> None:
    """The simulated TEE platform of this installation."""


@platform.command(name="init")
@friendly
def platform_init() -> None:
    """Create the simulated vendor root, platform attestation key and platform secret."""
    plat = home().platform()
    click.echo(f"simulated platform at {plat.directory} (SIMULATION: no protection against the host)")


@main.group()
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


# ---- the local flow ----------------------------------------------------------------------------------


@main.command()
@click.argument("function", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "inputs", multiple=True, help="NAME=SEALED_FILE")
@click.option("--output", "outputs", multiple=True, help="NAME=OUT_FILE")
@click.option("--to", "recipients", multiple=True, required=True, help="recipient public line or .pub file")
@click.option("--param", "params", multiple=True, help="KEY=VALUE (VALUE parsed as JSON when it is JSON)")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--receipt", type=click.Path(dir_okay=False, path_type=Path), default=None)
@friendly
def run(
    function: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    recipients: tuple[str, ...],
    params: tuple[str, ...],
    identity: Path,
    policy_path: Path | None,
    config: Path | None,
    receipt: Path | None,
) -> None:
    """Run FUNCTION (def run(ctx)) in an attested enclave on sealed inputs; outputs are sealed to --to."""
    here = home()
    ident = Identity.load(identity)
    pubs = [load_public(r) for r in recipients]
    try:
        source = function.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfideError(f"cannot read function ({exc})", where=str(function)) from None
    in_map = {k: Path(v) for k, v in parse_assignments(inputs, what="--input").items()}
    out_map = {k: Path(v) for k, v in parse_assignments(outputs, what="--output").items()}
    for name, path in in_map.items():
        if not path.is_file():
            raise ConfideError("no such file", where=f"--input {name}={path}")
    param_map: dict[str, Any] = {}
    for key, value in parse_assignments(params, what="--param").items():
        try:
            param_map[key] = json.loads(value)
        except ValueError:
            param_map[key] = value
    pol = here.policy(policy_path)
    receipt_path = receipt or (next(iter(out_map.values())).with_suffix(".receipt.json") if out_map else None)
    error_path = receipt_path.with_suffix(".error.sealed") if receipt_path else None
    click.echo("starting the enclave…", err=True)
    with here.start_enclave(config) as enc:
        outcome = run_function(
            enc,
            source=source,
            inputs=in_map,
            outputs=out_map,
            recipients=pubs,
            params=param_map,
            identity=ident,
            policy=pol,
            anchors=here.anchors(),
            error_report=error_path,
            say=lambda msg: click.echo(msg, err=True),
        )
    if outcome.claims.simulated:
        click.echo("WARNING: ran on the SIMULATED backend - no protection against the host", err=True)
    if not outcome.ok:
        click.echo(
            f"error: function failed ({outcome.category}); inputs untouched, no output written; "
            f"details sealed to you in {error_path}",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    assert outcome.receipt is not None
    if receipt_path is not None:
        write_new(receipt_path, outcome.receipt["raw"].encode())
    click.echo(
        f"ran {function.name} in enclave {outcome.claims.measurement[:16]}… in {outcome.duration_s:.3f} s"
    )
    for name, path in out_map.items():
        click.echo(f"  output {name}: {path} (sealed to {', '.join(p.fingerprint for p in pubs)})")
    if receipt_path is not None:
        click.echo(f"  receipt: {receipt_path} (signed by the enclave, verified)")


for _command in TASK_COMMANDS:
    main.add_command(_command)
main.add_command(serve_command)
main.add_command(gramine_group)

if __name__ == "__main__":
    main()
