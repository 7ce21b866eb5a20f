"""`confide keygen`, `encrypt`, `decrypt`: identities and sealed files on your own machine."""

from __future__ import annotations

import json
from pathlib import Path

import click

from confide.cli.common import friendly, parse_assignments
from confide.client.identity_file import save_identity
from confide.client.progress import byte_progress
from confide.client.sealing import decrypt_file, encrypt_file, open_reader
from confide.enclave.keys import Identity, load_public


@click.command()
@click.argument("name")
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@friendly
def keygen(name: str, out_dir: Path) -> None:
    """Create a party identity: NAME.key (private, mode 0600) and NAME.pub (one shareable line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate(name)
    save_identity(ident, out_dir / f"{name}.key")
    (out_dir / f"{name}.pub").write_text(ident.public.to_line() + "\n", encoding="utf-8")
    click.echo(f"identity {name}: fingerprint {ident.fingerprint}")
    click.echo(f"private key: {out_dir / (name + '.key')} (keep it secret)")
    click.echo(f"public line: {out_dir / (name + '.pub')}")


@click.command()
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


@click.command()
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
