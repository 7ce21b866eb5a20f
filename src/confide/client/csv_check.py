"""Local checks of a CSV file before it is encrypted and uploaded (`confide dataset upload`).

Once a dataset is sealed, nobody but the enclave reads it: a ragged row or a stray "n/a" in a numeric
column shows up only as a failed task, after every owner approved it. So the owner's own machine reads
the file first and names the line of each problem: an empty file, a binary (non-text) file, rows whose
field count differs from the header's, and type drift (a column numeric on most rows but not on some).

Nothing here leaves the owner's machine. Only the stdlib `csv` module is used (no pandas import: the
command must start fast).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from confide.enclave.errors import ConfideError

MAX_LISTED = 3  # problems of one kind listed by line; the rest are counted
MAX_VALUE_SHOWN = 24
NUL_PROBE_BYTES = 64 << 10


@dataclass(frozen=True)
class CsvProblem:
    message: str
    line: int | None = None  # 1-based physical line in the file, where one applies

    def __str__(self) -> str:
        return f"{self.message} (line {self.line})" if self.line is not None else self.message


@dataclass
class CsvReport:
    path: Path
    columns: tuple[str, ...] = ()
    rows: int = 0
    problems: list[CsvProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _NotText(Exception):
    def __init__(self, problem: CsvProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass
class _Column:
    numeric: int = 0
    other: int = 0
    first_other: list[tuple[int, str]] = field(default_factory=list)


def _lines(fh: BinaryIO) -> Iterator[str]:
    """Decoded lines of the file; a line that is not UTF-8 or holds a NUL byte stops the check."""
    for lineno, raw in enumerate(fh, 1):
        if b"\x00" in raw:
            raise _NotText(CsvProblem("not a text file (NUL byte): binary data, not CSV", lineno))
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _NotText(
                CsvProblem(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", lineno)
            ) from None
        yield text


def _is_number(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return not math.isnan(number) or value.strip().lower() == "nan"


def _shown(value: str) -> str:
    return repr(value if len(value) <= MAX_VALUE_SHOWN else value[: MAX_VALUE_SHOWN - 1] + "…")


def _listed(items: list[tuple[int, str]], extra: int) -> str:
    parts = [f"line {line} ({_shown(value)})" for line, value in items]
    text = ", ".join(parts)
    return f"{text} and {extra} more" if extra > 0 else text


def check_csv(path: Path) -> CsvReport:
    """Read `path` once and report every problem found (see the module docstring)."""
    path = Path(path)
    report = CsvReport(path)
    try:
        size = path.stat().st_size
        if size == 0:
            report.problems.append(CsvProblem("the file is empty"))
            return report
        with open(path, "rb") as fh:
            if b"\x00" in fh.read(NUL_PROBE_BYTES):
                fh.seek(0)
                line = 1 + fh.read(NUL_PROBE_BYTES).split(b"\x00", 1)[0].count(b"\n")
                report.problems.append(CsvProblem("not a text file (NUL byte): binary data, not CSV", line))
                return report
            fh.seek(0)
            try:
                _scan(report, csv.reader(_lines(fh), strict=True))
            except _NotText as exc:
                report.problems.append(exc.problem)
    except OSError as exc:
        raise ConfideError(f"cannot read dataset ({exc.strerror})", where=str(path)) from None
    return report


def _scan(report: CsvReport, reader: Any) -> None:  # a csv.reader (its type is private)
    header: list[str] | None = None
    ragged: list[tuple[int, int]] = []
    n_ragged = 0
    columns: list[_Column] = []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = row
                report.columns = tuple(header)
                columns = [_Column() for _ in header]
                blank = [i + 1 for i, name in enumerate(header) if not name.strip()]
                if blank:
                    report.problems.append(
                        CsvProblem(f"header has an empty column name (column {blank[0]})", reader.line_num)
                    )
                dupes = sorted({n for n in header if header.count(n) > 1 and n.strip()})
                if dupes:
                    report.problems.append(
                        CsvProblem(f"header names column {dupes[0]!r} more than once", reader.line_num)
                    )
                continue
            report.rows += 1
            if len(row) != len(header):
                n_ragged += 1
                if len(ragged) < MAX_LISTED:
                    ragged.append((reader.line_num, len(row)))
            for col, value in zip(columns, row, strict=False):
                value = value.strip()
                if not value:
                    continue  # a missing value is not drift
                if _is_number(value):
                    col.numeric += 1
                else:
                    col.other += 1
                    if len(col.first_other) < MAX_LISTED:
                        col.first_other.append((reader.line_num, value))
    except csv.Error as exc:
        report.problems.append(CsvProblem(f"not valid CSV ({exc})", reader.line_num))
        return
    if header is None:
        report.problems.append(CsvProblem("the file holds only blank lines"))
        return
    if report.rows == 0:
        report.problems.append(CsvProblem("no data rows after the header", reader.line_num))
    for line, n in ragged:
        report.problems.append(CsvProblem(f"row has {n} field(s), the header has {len(header)}", line))
    if n_ragged > len(ragged):
        report.problems.append(CsvProblem(f"{n_ragged - len(ragged)} more row(s) with a wrong field count"))
    for name, col in zip(header, columns, strict=True):
        if col.numeric and col.other and col.numeric > col.other:
            listed = _listed(col.first_other, col.other - len(col.first_other))
            report.problems.append(
                CsvProblem(
                    f"type drift: column {name!r} is numeric on {col.numeric} row(s) but not at {listed}"
                )
            )
