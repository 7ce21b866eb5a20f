"""Shared pieces of the `confide` command groups: error handling, the home directory, safe writes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from confide.client.local import Home
from confide.enclave.errors import ConfideError

EXIT_FAILED = 1


def home() -> Home:
    return Home(Path(os.environ.get("CONFIDE_HOME", Path.home() / ".confide")))


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every Confide error into one clear line and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfideError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def write_new(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise ConfideError(f"cannot write ({exc.strerror})", where=str(path)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
