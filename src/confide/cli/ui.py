"""`confide ui`: this party's web console on 127.0.0.1, next to its key."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.command(name="ui")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="port on 127.0.0.1 (0: a free one)",
)
@click.option("--no-open", is_flag=True, help="do not open a browser (print the URL only)")
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("confide-results"),
    show_default=True,
    help="where results are decrypted (one folder per task)",
)
@with_client
def ui(client: Client, port: int, no_open: bool, results_dir: Path) -> None:
    """Serve your web console on 127.0.0.1 (never another address) until Ctrl-C.

    It does what the party commands do, through the same SDK, in this process: your key signs
    approvals here and never reaches the browser. Open the printed URL: its secret token, made at
    this launch, is exchanged for a session cookie; without one every request is refused."""
    import socket

    from confide.console.app import Console, serve
    from confide.console.security import Guard

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise ConfideError(f"cannot listen ({exc.strerror})", where=f"127.0.0.1:{port}") from None
    sock.listen(64)
    guard = Guard(port=int(sock.getsockname()[1]))
    console = Console(client, guard, results_dir=results_dir)
    click.echo(f"Confide console for {client.fingerprint}: {guard.launch_url}", err=True)
    click.echo(
        "(the token in the URL is the key to this console: do not share it; Ctrl-C stops it)", err=True
    )
    click.echo(guard.launch_url)
    if not no_open:
        import webbrowser

        webbrowser.open(guard.launch_url)
    try:
        serve(console, sock)
    finally:
        console.close()
        sock.close()
