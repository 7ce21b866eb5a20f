"""A decrypted output as a table a person can read: CSV, or JSON (a list of objects, an object, or
a list of lists); anything else gets no preview (it is still downloadable)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.console.plots import Bars

MAX_PREVIEW_BYTES = 4 << 20
MAX_ROWS = 200
MAX_CELL_CHARS = 300  # a longer value is cut in the preview (the download has it whole)


@dataclass(frozen=True)
class Preview:
    kind: str  # "csv" | "json"
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    total_rows: int  # rows in the output; `rows` holds at most MAX_ROWS of them


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def _bounded(headers: list[str], rows: list[list[str]], kind: str) -> Preview:
    width = max([len(headers), *(len(r) for r in rows)], default=0)
    headers = headers + [""] * (width - len(headers))
    shown = tuple(tuple(map(_cut, r + [""] * (width - len(r)))) for r in rows[:MAX_ROWS])
    return Preview(kind, tuple(headers), shown, len(rows))


def _from_json(value: Any) -> Preview | None:
    if isinstance(value, Mapping):
        return _bounded(["key", "value"], [[str(k), _cell(v)] for k, v in value.items()], "json")
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        keys: list[str] = []
        for item in value:
            keys += [str(k) for k in item if str(k) not in keys]
        return _bounded(keys, [[_cell(item.get(k, "")) for k in keys] for item in value], "json")
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return _bounded([], [[_cell(c) for c in row] for row in value], "json")
    return None


def preview(path: Path) -> Preview | None:
    try:
        if path.stat().st_size > MAX_PREVIEW_BYTES:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    stripped = text.strip()
    if not stripped:
        return None
    if stripped[0] in "[{":
        try:
            return _from_json(json.loads(stripped))
        except ValueError:
            pass
    lines = stripped.splitlines()
    if "\0" in text or "," not in lines[0]:
        return None
    try:
        table = [row for row in csv.reader(io.StringIO(stripped)) if row]
    except csv.Error:
        return None
    return _bounded(table[0], table[1:], "csv")


def is_count(value: Any) -> bool:
    """A finite non-negative number (not a bool): what a bar can show."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def charts(path: Path) -> list[Bars]:
    """Bars for each member of a JSON object output that is itself an object of 2 to MAX_ROWS
    non-negative numbers (gbdt-train's ``rows`` and ``label_balance``, for one)."""
    try:
        if path.stat().st_size > MAX_PREVIEW_BYTES:
            return []
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(value, Mapping):
        return []
    out = []
    for key, member in value.items():
        if (
            isinstance(member, Mapping)
            and 2 <= len(member) <= MAX_ROWS
            and all(map(is_count, member.values()))
        ):
            out.append(Bars(str(key), tuple((str(k), float(v)) for k, v in member.items())))
    return out
