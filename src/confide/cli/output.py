"""How commands print data: `--json` (or `-o json`) for scripts, a table (`-o table`, the default)
for people. Times are ISO 8601 in UTC; a fingerprint is shown with the name its party registered.

`rich` is imported only when a table is printed, so that `--help` and `-o json` stay fast."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import wraps
from typing import Any

import click

from confide.enclave.errors import ConfideError

FORMATS = ("table", "json")


def output_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds `-o/--output-format json|table` and `--json`; passes `fmt` ("json" or "table")."""

    @click.option(
        "-o",
        "--output-format",
        "output_format",
        type=click.Choice(FORMATS),
        default=None,
        help="json for scripts, table for people (default table)",
    )
    @click.option("--json", "as_json", is_flag=True, help="same as -o json")
    @wraps(fn)
    def wrapper(*args: Any, output_format: str | None, as_json: bool, **kwargs: Any) -> Any:
        return fn(*args, fmt=pick_format(as_json, output_format), **kwargs)

    from confide.cli.common import friendly

    return friendly(wrapper)


class UsageProblem(ConfideError):
    """Bad input on the command line (as opposed to a refusal): exit 2."""

    exit_code = 2


def pick_format(as_json: bool, output_format: str | None) -> str:
    if as_json and output_format == "table":
        raise UsageProblem("--json and -o table contradict each other", where="-o")
    return "json" if as_json else (output_format or "table")


def iso(t: Any) -> str:
    """A Unix time as ISO 8601 UTC (seconds); '' for none."""
    if t is None or isinstance(t, bool) or not isinstance(t, int | float):
        return ""
    try:
        return datetime.fromtimestamp(float(t), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(t)


def with_iso(obj: Any, keys: Sequence[str] = ("created_at", "updated_at", "time")) -> Any:
    """A copy of a JSON object (or list of them) with its Unix times also given as ISO strings."""
    if isinstance(obj, list):
        return [with_iso(o, keys) for o in obj]
    if not isinstance(obj, Mapping):
        return obj
    out = dict(obj)
    for key in keys:
        if key in out and isinstance(out[key], int | float) and not isinstance(out[key], bool):
            out[key] = iso(out[key])
    return out


def named(fingerprint: str | None, names: Mapping[str, str]) -> str:
    """`Name (fingerprint)`, or the fingerprint alone when the platform knows no name."""
    if not fingerprint:
        return ""
    name = names.get(fingerprint)
    return f"{clean(name)} ({fingerprint})" if name else fingerprint


def clean(text: Any) -> str:
    """Text from the platform with control characters shown escaped (a name cannot redraw a line)."""
    s = "" if text is None else str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def emit(
    fmt: str,
    data: Any,
    *,
    columns: Sequence[tuple[str, str]] = (),
    rows: Sequence[Mapping[str, Any]] | None = None,
    title: str | None = None,
    empty: str = "nothing to show",
) -> None:
    """JSON: `data` as is. Table: `rows` (default `data`) under `columns` ((key, header) pairs)."""
    if fmt == "json":
        emit_json(data)
        return
    items = list(rows if rows is not None else data)
    if not items:
        click.echo(empty, err=True)
        return
    table(items, columns, title=title)


def table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], *, title: str | None
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)
    for _, header in columns:
        t.add_column(header, overflow="fold")
    for row in rows:
        t.add_row(*(clean(row.get(key, "")) for key, _ in columns), end_section=False)
    Console(width=_width(), soft_wrap=False, markup=False, highlight=False).print(t)


def pairs(fmt: str, data: Mapping[str, Any], fields: Sequence[tuple[str, str]]) -> None:
    """One object: JSON, or `label: value` lines."""
    if fmt == "json":
        emit_json(data)
        return
    width = max(len(label) for _, label in fields)
    for key, label in fields:
        click.echo(f"{label + ':':<{width + 1}} {clean(data.get(key, ''))}")


def _width() -> int:
    import shutil

    return max(80, shutil.get_terminal_size((160, 24)).columns)
