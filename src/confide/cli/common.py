"""Shared pieces of the `confide` command groups: error handling, the home directory, safe writes,
the options every platform command takes. Imports stay light: each command module imports what it
needs when it runs, so `confide --help` and every command start fast."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.home import Home
    from confide.client.sdk import Client

EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_URL = "http://127.0.0.1:8470"


def home() -> Home:
    from confide.client.home import Home

    return Home.from_env()


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every Confide error into one clear line and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfideError as exc:
            click.echo(error_line(exc), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def error_line(exc: ConfideError) -> str:
    """The one error format of the CLI: `error: <what> (<where>)`."""
    return f"error: {exc.message} ({exc.where})" if exc.where else f"error: {exc.message}"


def write_new(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise ConfideError(f"cannot write ({exc.strerror})", where=str(path)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def parse_assignments(items: tuple[str, ...], *, what: str) -> dict[str, str]:
    """`NAME=VALUE` options into a dict; a malformed or repeated name is an error naming the option."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfideError(f"expected NAME=VALUE, got {item!r}", where=what)
        if name in out:
            raise ConfideError(f"{name!r} given twice", where=what)
        out[name] = value
    return out


def parse_params(
    items: tuple[str, ...], *, what: str = "--param", from_files: bool = False
) -> dict[str, Any]:
    """`KEY=VALUE` parameters, each VALUE parsed as JSON when it is JSON (else kept as a string).
    With `from_files` (the CLI's own flags only, never a form), `KEY=@PATH` reads VALUE from PATH."""
    import json

    values: dict[str, Any] = {}
    for key, raw in parse_assignments(items, what=what).items():
        if from_files and raw.startswith("@"):
            try:
                raw = Path(raw[1:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfideError(
                    f"cannot read {key}'s value from {raw[1:]!r} ({exc})", where=what
                ) from None
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values


def _client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --identity, --policy, --sim-root, shared by every platform command."""
    for option in reversed(
        [
            click.option(
                "--url", envvar="CONFIDE_URL", default=DEFAULT_URL, show_default=True, help="platform URL"
            ),
            click.option(
                "--identity",
                envvar="CONFIDE_IDENTITY",
                type=click.Path(dir_okay=False, path_type=Path),
                required=True,
                help="your private identity file (confide keygen)",
            ),
            click.option(
                "--policy",
                "policy_path",
                envvar="CONFIDE_POLICY",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="verification policy for the service's evidence (default: $CONFIDE_HOME/policy.toml)",
            ),
            click.option(
                "--sim-root",
                envvar="CONFIDE_SIM_ROOT",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="trust this SIMULATED platform's vendor_root.crt (development only; real vendor roots are built in)",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _open_client(url: str, identity: Path, policy_path: Path | None, sim_root: Path | None) -> Client:
    from confide.client.sdk import Client

    # each command is a new process: reuse the service's verified evidence within the policy's max_age
    return Client(url, identity, policy=policy_path, sim_root=sim_root, say=_say, cache_attestation=True)


def _say(message: str) -> None:
    click.echo(message, err=True)


def with_client(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Open a Client from the common options and pass it as `client`."""

    @_client_options
    @wraps(fn)
    def wrapper(
        url: str, identity: Path, policy_path: Path | None, sim_root: Path | None, **kwargs: Any
    ) -> Any:
        with _open_client(url, identity, policy_path, sim_root) as client:
            return fn(client=client, **kwargs)

    return friendly(wrapper)
