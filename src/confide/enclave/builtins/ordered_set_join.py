"""Built-in ordered-set-join v1: a streaming merge join of two or more inputs sorted by their ids.

Inputs: two or more UTF-8 CSV files with a header, each sorted ascending by its id column. Params:
``column`` (required: the id column's name, one for every input, or an object input name -> column
name), ``columns`` (a list of ``input.column`` references, default none: the columns that ``joined``
carries next to each common id), ``max_id_chars`` (1024: a longer id is an error), ``max_field_chars``
(65536: a longer field is an error).

Ids are normalised exactly like psi's (builtins/psi.py): surrounding whitespace stripped, Unicode
NFC, then case-folded; an id that is empty after that is no id (never a member, and exempt from the
order). The rule is written out here, not imported from psi.py: the approved descriptor's
source_sha256 covers this one file, so everything the built-in runs is in it
(tests/test_builtin_ordered_join.py checks both give the same membership). "Sorted" means: in each
input the normalised ids of successive data rows are strictly ascending in Unicode code point order
(the order of their UTF-8 bytes, e.g. ``LC_ALL=C sort``, or Python's ``sorted``), so no id appears
twice. The inputs are read row by row and merged: memory stays the same whatever their size. An
input out of order, with an id twice, with a row of the wrong width or not UTF-8 is refused naming
the input and line (never quoting an id).

Outputs, whichever of these the manifest names (the enclave refuses any other): ``size`` (JSON
{"size": n, "inputs": [names]}: how many ids are in every input), ``members_<input>`` (a CSV with one
column ``member``, 1 or 0 per data row of <input>, in its row order; the manifest must seal it to that
input's owner only), ``joined`` (a CSV: column ``id``, the common normalised ids in ascending order,
then one column ``input.column`` per entry of params.columns holding that input's cell for the id).
Runs in the sandbox; only the standard library.
"""

import csv
import io
import json
import unicodedata
from collections.abc import Iterator
from typing import Any, NoReturn

NAME = "ordered-set-join"
MEMBERS = "members_"
DEFAULT_MAX_ID = 1024
DEFAULT_MAX_FIELD = 1 << 16
MAX_LINE = 1 << 22  # bytes of one physical line


def _fail(message: str) -> NoReturn:
    raise ValueError(f"{NAME}: {message}")


def _int(given: dict[str, Any], key: str, default: int, high: int) -> int:
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        _fail(f"{key} must be an integer in 1..{high}, got {value!r}")
    return int(value)


def _params(given: dict[str, Any], inputs: list[str]) -> dict[str, Any]:
    unknown = sorted(set(given) - {"column", "columns", "max_id_chars", "max_field_chars"})
    if unknown:
        _fail(f"unknown parameter(s) {', '.join(unknown)}")
    column = given.get("column")
    if isinstance(column, str) and column:
        ids = {name: column for name in inputs}
    elif isinstance(column, dict) and column and all(isinstance(v, str) and v for v in column.values()):
        if sorted(column) != inputs:
            _fail(f"column names inputs {sorted(column)}, but the task's inputs are {inputs}")
        ids = dict(column)
    else:
        _fail("parameter 'column' (the id column: a name, or input name -> name) is required")
    refs = given.get("columns", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        _fail(f"columns must be a list of 'input.column' references, got {refs!r}")
    if len(set(refs)) != len(refs):
        _fail("columns names a column twice")
    carried: list[tuple[str, str]] = []
    for ref in refs:
        inp, dot, col = ref.partition(".")
        if not dot or inp not in inputs or not col:
            _fail(f"columns: {ref!r} is not 'input.column' for one of the inputs {inputs}")
        carried.append((inp, col))
    return {
        "ids": ids,
        "carried": carried,
        "max_id": _int(given, "max_id_chars", DEFAULT_MAX_ID, 1 << 20),
        "max_field": _int(given, "max_field_chars", DEFAULT_MAX_FIELD, 1 << 24),
    }


def normalise(cell: str) -> str:
    """psi's rule: strip, NFC, casefold ("" stays "")."""
    return unicodedata.normalize("NFC", cell.strip()).casefold()


class _Lines:
    """The input's physical lines as text for csv.reader, each checked to be UTF-8 (the BOM of line
    1 dropped). A line of only spaces and tabs where a row would start is no row, as pandas reads it
    for psi (``at_row_start`` is set by the reader's user after each row); ``number`` is the last
    line handed out."""

    def __init__(self, name: str, fh: Any) -> None:
        self.name, self.fh, self.number, self.at_row_start = name, fh, 0, True

    def __iter__(self) -> Iterator[str]:
        while True:
            raw = self.fh.readline(MAX_LINE + 1)
            if not raw:
                return
            self.number += 1
            if len(raw) > MAX_LINE:
                _fail(f"input {self.name!r}, line {self.number}: longer than {MAX_LINE} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _fail(
                    f"input {self.name!r}, line {self.number}: not UTF-8 text (byte {exc.start} of the line)"
                )
            if self.number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if self.at_row_start and not text.rstrip("\r\n").strip(" \t"):
                continue  # a blank line: no row
            self.at_row_start = False
            yield text


class _Side:
    """One input, read row by row: ``head`` is the current (normalised id, row) or None at the end.
    Leaving a row writes its membership bit; rows with an empty id are passed over with bit 0."""

    def __init__(self, name: str, fh: Any, column: str, p: dict[str, Any], bits: Any) -> None:
        self.name, self.bits, self.max_id = name, bits, p["max_id"]
        self.lines = _Lines(name, fh)
        self.reader = csv.reader(iter(self.lines), strict=True)
        header = self._row()
        if header is None:
            _fail(f"input {name!r} is empty (no header line)")
        if header.count(column) != 1:
            what = "has no column" if column not in header else "has more than one column"
            _fail(f"input {name!r} {what} {column!r} (its header: {header[:20]})")
        self.header, self.key = header, header.index(column)
        self.head: tuple[str, list[str]] | None = None
        self.last, self.last_line = "", 0
        if bits is not None:
            bits.write(b"member\n")
        self.advance(None)

    def _row(self) -> list[str] | None:
        self.lines.at_row_start = True
        try:
            return next(self.reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            _fail(f"input {self.name!r}, line {self.lines.number}: not CSV ({exc})")

    def column(self, name: str) -> int:
        if self.header.count(name) != 1:
            what = "has no column" if name not in self.header else "has more than one column"
            _fail(f"columns: input {self.name!r} {what} {name!r} (its header: {self.header[:20]})")
        return self.header.index(name)

    def advance(self, member: int | None) -> None:
        if member is not None and self.bits is not None:
            self.bits.write(b"1\n" if member else b"0\n")
        while True:
            row = self._row()
            if row is None:
                self.head = None
                return
            line = self.lines.number
            if len(row) != len(self.header):
                _fail(
                    f"input {self.name!r}, line {line}: {len(row)} fields, but the header has "
                    f"{len(self.header)}"
                )
            cell = row[self.key]
            if len(cell) > self.max_id:
                _fail(
                    f"input {self.name!r}, line {line}: an id of {len(cell)} characters "
                    f"(max_id_chars is {self.max_id})"
                )
            key = normalise(cell)
            if not key:
                if self.bits is not None:
                    self.bits.write(b"0\n")
                continue
            if self.last_line and key <= self.last:
                how = "the same id as" if key == self.last else "an id that sorts before the id on"
                _fail(
                    f"input {self.name!r} is not sorted by its id column: line {line} has {how} line "
                    f"{self.last_line} (ids must be strictly ascending after normalisation: strip, "
                    "NFC, casefold; code point order)"
                )
            self.head, self.last, self.last_line = (key, row), key, line
            return


def _heads(order: list[_Side]) -> list[tuple[str, list[str]]] | None:
    heads = [s.head for s in order]
    return None if any(h is None for h in heads) else [h for h in heads if h is not None]


def run(ctx: Any) -> None:
    inputs = sorted(ctx.inputs)
    if len(inputs) < 2:
        _fail(f"needs two or more inputs, got {len(inputs)}")
    p = _params(dict(ctx.params), inputs)
    csv.field_size_limit(p["max_field"])
    for out in ctx.outputs:
        if out not in ("size", "joined") and not (
            out.startswith(MEMBERS) and out[len(MEMBERS) :] in ctx.inputs
        ):
            _fail(f"output {out!r} is not size, joined or members_<input>")
    if p["carried"] and "joined" not in ctx.outputs:
        _fail("columns names what the joined output carries, but the task has no joined output")
    sides = {n: _Side(n, ctx.inputs[n], p["ids"][n], p, ctx.outputs.get(f"{MEMBERS}{n}")) for n in inputs}
    carried = [(inputs.index(n), sides[n].column(c)) for n, c in p["carried"]]
    text = writer = None
    if "joined" in ctx.outputs:
        text = io.TextIOWrapper(ctx.outputs["joined"], encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["id", *(f"{n}.{c}" for n, c in p["carried"])])
    order = [sides[n] for n in inputs]
    size = 0
    while (heads := _heads(order)) is not None:
        top = max(key for key, _ in heads)
        if all(key == top for key, _ in heads):
            size += 1
            if writer is not None:
                writer.writerow([top, *(heads[j][1][i] for j, i in carried)])
            for s in order:
                s.advance(1)
            continue
        for s, (key, _) in zip(order, heads, strict=True):
            if key < top:
                s.advance(0)
    for s in order:  # the rest: no more common ids, but every row is still checked and given its bit
        while s.head is not None:
            s.advance(0)
    if text is not None:
        text.flush()
        text.detach()
    if "size" in ctx.outputs:
        body = {"size": size, "inputs": inputs}
        ctx.outputs["size"].write(json.dumps(body, sort_keys=True).encode() + b"\n")
