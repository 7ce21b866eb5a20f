"""Built-in join-aggregate v1: join the inputs on a key, aggregate by groups, suppress small cohorts.

Inputs: one or more UTF-8 CSV files with a header, or plain Parquet files (``PAR1`` at both ends),
mixed freely. A Parquet column is read as the text a CSV cell would hold: null is an empty cell,
integers, decimals, booleans, dates and times as Arrow casts them to text, floats as their shortest
decimal (NaN and infinities are errors), nested columns refused. Parquet with modular encryption
comes as a Confide PME dataset (the file, its key material and master keys, sealed together by the
owner: enclave/parquet_keys.parse_bundle) and is decrypted here, in the sandbox child.

Params: ``key`` (required: the key column, one name for every input or an object input name ->
column), ``k`` (required: the minimum cohort, an integer >= 2: a group with fewer than k distinct
keys is suppressed), ``group_by`` (a list of column references, default none: one group), ``aggregates`` (a list of {"op": count|sum|avg|min|
max, "column": reference, "as": output column name}; count without a column counts joined rows;
default [{"op": "count"}]), ``avg_places`` (6: avg is rounded half-even to this many decimal places),
``max_field_chars`` (4096), ``max_join_rows`` (10^7: a join that would make more rows is an error),
``dp`` (optional: differential privacy, enclave/dp_params.py; the row count and bounded sums then
leave with OpenDP's noise, builtins/dp_noise.py, each key keeps at most ``max_contributions`` joined
rows, groups are released on their noisy count, and the report gives the privacy loss instead of
the suppressed count).
A column reference is ``column`` when exactly one input has it, else
``input.column``. Keys are normalised like psi's ids (strip, NFC, casefold); rows with an empty key
join nothing. The join is an inner join on the normalised key (duplicate keys multiply rows, as in
SQL). Numbers are plain decimals (``-12``, ``3.50``; an empty cell is missing and skipped); sums are
exact (decimal arithmetic without rounding). Outputs: ``result`` (CSV: the group columns, then one
column per aggregate, sorted by the groups; suppressed groups left out) and ``report`` (JSON: k, how
many groups were released and how many suppressed). Runs in the sandbox; the zygote provides pandas.

Two engines, one result. Without ``dp`` the join and the aggregates run in DuckDB (builtins/duck.py:
one thread, in memory) on Arrow columns: CSV read by Arrow's reader as text, ASCII keys normalised
with Arrow's kernels (strip of Python's ASCII whitespace, then lower case, which is what strip, NFC
and casefold do to ASCII) and every other key in Python, numbers checked against the same pattern
and cast to DECIMAL(38, s) with s the column's largest scale, sums exact in DuckDB's 128-bit
decimals, printed with the exponent Python's decimal sum would have. Whenever that path cannot
promise the same output as the reference path below (a cell or parse it cannot handle, a non-ASCII
number, min/max over a column of mixed scales or with a negative zero, a 38-digit overflow, a group
column that is also summed, an error of any kind) it gives up and the reference path (pandas and
Python decimals, which also words every error) runs instead; so does ``dp``.
"""

import csv
import decimal
import io
import json
import math
import re
from fractions import Fraction
from typing import Any

NAME = "join-aggregate"
OPS = ("count", "sum", "avg", "min", "max")
NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
EXACT = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.Inexact, decimal.Overflow, decimal.InvalidOperation, decimal.Rounded],
)
KEY = "\x00key"


def _fail(message: str) -> None:
    raise ValueError(f"{NAME}: {message}")


def _int(given: dict[str, Any], key: str, default: Any, low: int, high: int) -> int:
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(f"{key} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def _params(given: dict[str, Any], inputs: list[str]) -> dict[str, Any]:
    known = {"key", "k", "group_by", "aggregates", "avg_places", "max_field_chars", "max_join_rows", "dp"}
    unknown = sorted(set(given) - known)
    if unknown:
        _fail(f"unknown parameter(s) {', '.join(unknown)}")
    key = given.get("key")
    if isinstance(key, str) and key:
        keys = {name: key for name in inputs}
    elif isinstance(key, dict) and all(isinstance(v, str) and v for v in key.values()):
        if sorted(key) != inputs:
            _fail(f"key names inputs {sorted(key)}, but the task's inputs are {inputs}")
        keys = dict(key)
    else:
        _fail("parameter 'key' (the join column: a name, or input name -> name) is required")
    if "k" not in given:
        _fail("parameter 'k' (the minimum cohort size, at least 2) is required")
    k = given["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        _fail(f"k must be an integer of at least 2 (a group of one id would be released), got {k!r}")
    if k > 10**9:
        _fail(f"k must be at most 10^9, got {k}")
    group_by = given.get("group_by", [])
    if not isinstance(group_by, list) or not all(isinstance(g, str) and g for g in group_by):
        _fail(f"group_by must be a list of column references, got {group_by!r}")
    if len(set(group_by)) != len(group_by):
        _fail("group_by names a column twice")
    aggregates = given.get("aggregates", [{"op": "count"}])
    if not isinstance(aggregates, list) or not aggregates:
        _fail("aggregates must be a non-empty list of {op, column, as}")
    aggs = []
    for i, agg in enumerate(aggregates):
        if not isinstance(agg, dict) or set(agg) - {"op", "column", "as"}:
            _fail(f"aggregates[{i}] must be an object with op, column and (optional) as")
        op = agg.get("op")
        if op not in OPS:
            _fail(f"aggregates[{i}]: op {op!r} is not one of {', '.join(OPS)}")
        column = agg.get("column")
        if column is None and op != "count":
            _fail(f"aggregates[{i}]: {op} needs a column")
        if column is not None and not (isinstance(column, str) and column):
            _fail(f"aggregates[{i}]: column must be a column reference, got {column!r}")
        label = agg.get("as", f"{op}({column})" if column else "count")
        if not isinstance(label, str) or not label:
            _fail(f"aggregates[{i}]: as must be a non-empty name")
        aggs.append({"op": op, "column": column, "as": label})
    labels = group_by + [a["as"] for a in aggs]
    if len(set(labels)) != len(labels):
        _fail(f"output column names repeat: {labels}")
    return {
        "keys": keys,
        "k": k,
        "group_by": group_by,
        "aggregates": aggs,
        "avg_places": _int(given, "avg_places", 6, 0, 30),
        "max_chars": _int(given, "max_field_chars", 4096, 1, 1 << 20),
        "max_rows": _int(given, "max_join_rows", 10_000_000, 1, 10**9),
        "dp": _dp_params(given, inputs) if "dp" in given else None,
    }


def _dp_params(given: dict[str, Any], inputs: list[str]) -> Any:
    from confide.enclave.dp_params import parse_dp  # the check the enclave made before charging

    return parse_dp(given, inputs)


def _text(name: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        _fail(f"input {name!r} is not UTF-8 text (byte {exc.start}, line {line})")
    return text[1:] if text.startswith("\ufeff") else text


class _Decrypted:
    """A PME dataset's table, opened in this sandbox child with the master keys sealed in it, behind
    the two methods of pyarrow's ParquetFile that _header and _frame use."""

    def __init__(self, table: Any) -> None:
        self.schema_arrow = table.schema
        self._table = table

    def read(self, columns: list[str], use_threads: bool = False) -> Any:
        return self._table.select(columns)


def _source(name: str, raw: bytes) -> Any:
    """CSV text, or a pyarrow ParquetFile (or _Decrypted) for a Parquet input."""
    from confide.enclave import parquet_keys  # the sandbox child's PME reader and KMS client

    if parquet_keys.is_bundle(raw):
        return _Decrypted(parquet_keys.read_dataset(raw, name=name))
    if len(raw) >= 12 and raw[:4] == raw[-4:] == b"PARE":
        _fail(
            f"input {name!r} is Parquet with modular encryption but not a Confide PME dataset: upload it "
            "with its master keys (confide dataset upload FILE --pme-keys KEYS.json), which seals them "
            "with the file"
        )
    if len(raw) < 12 or raw[:4] != b"PAR1" or raw[-4:] != b"PAR1":
        return _text(name, raw)
    import pyarrow as pa  # only inside the sandbox child, never in the enclave process
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(pa.BufferReader(raw))
    except Exception as exc:
        _fail(f"input {name!r} is not a readable Parquet file ({str(exc)[:200]})")
    raise AssertionError


def _header(pd: Any, name: str, source: Any) -> list[str]:
    if not isinstance(source, str):
        names = [str(n) for n in source.schema_arrow.names]
        if len(set(names)) != len(names):
            _fail(f"input {name!r}: a Parquet file with repeated column names {names[:20]}")
        return names
    try:
        return [str(c) for c in pd.read_csv(io.StringIO(_header_text(source)), nrows=0, dtype=str).columns]
    except Exception as exc:
        _fail(f"input {name!r} is not a readable CSV file ({str(exc)[:200]})")
    raise AssertionError


def _header_text(text: str) -> str:
    """The text's first line when it holds the whole header record (no quote in it), else the text:
    reading a header from a 75 MB string took pandas 0.3 s."""
    end = text.find("\n")
    return text[: end + 1] if end >= 0 and '"' not in text[:end] else text


def _parquet_cells(name: str, column: str, values: Any) -> list[str]:
    """A Parquet column as the text of CSV cells (null: empty)."""
    return list(_parquet_text(name, column, values).to_pylist())


def _parquet_text(name: str, column: str, values: Any) -> Any:
    """A Parquet column as an Arrow string array of the text of CSV cells (null: empty)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_floating(values.type):
        cells = []
        for row, v in enumerate(values.to_pylist(), 1):
            if v is not None and not math.isfinite(v):
                _fail(f"input {name!r}, column {column!r}, data row {row}: {v!r} is not a number")
            cells.append("" if v is None else format(decimal.Decimal(repr(v)), "f"))
        return pa.array(cells, pa.string())
    try:
        return pc.fill_null(pc.cast(values, pa.string()), "")
    except Exception as exc:
        _fail(
            f"input {name!r}, column {column!r}: a {values.type} column cannot be read as text ({str(exc)[:200]})"
        )
    raise AssertionError


def _frame(pd: Any, name: str, source: Any, used: list[str]) -> Any:
    """The `used` columns of an input, as text."""
    if not isinstance(source, str):
        try:
            table = source.read(columns=used, use_threads=False)
        except Exception as exc:
            _fail(f"input {name!r}: not a readable Parquet file ({str(exc)[:200]})")
        return pd.DataFrame({col: _parquet_cells(name, col, table.column(col)) for col in used}, dtype=str)
    _refuse_ragged(name, source)  # pandas would drop extra fields and pad missing ones silently
    try:
        return pd.read_csv(
            io.StringIO(source), usecols=used, dtype=str, keep_default_na=False, na_filter=False
        )
    except Exception as exc:
        _fail(f"input {name!r}: not a readable CSV file ({str(exc)[:200]})")
    raise AssertionError


def _refuse_ragged(name: str, text: str) -> None:
    """Fails naming the first line whose record has more or fewer fields than the header."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        width = len(next(reader, []))
        for record in reader:
            if record and len(record) != width:
                _fail(f"input {name!r}, line {reader.line_num}: {len(record)} fields, the header has {width}")
    except csv.Error as exc:
        _fail(f"input {name!r}, line {reader.line_num}: not a readable CSV record ({exc})")


def _resolve(ref: str, headers: dict[str, list[str]], keys: dict[str, str]) -> tuple[str, str]:
    """(input, column) of a reference: `input.column`, or a column exactly one input has."""
    head, dot, rest = ref.partition(".")
    if dot and head in headers and rest in headers[head]:
        return head, rest
    owners = [name for name in sorted(headers) if ref in headers[name]]
    if len(owners) == 1:
        return owners[0], ref
    if not owners:
        _fail(f"no input has a column {ref!r} (inputs' headers: {headers})")
    _fail(f"column {ref!r} is in inputs {owners}: write it as input.column")
    raise AssertionError


def _numbers(name: str, column: str, cells: Any) -> list[Any]:
    """Decimals (None for an empty cell) of a column of strings; anything else is an error."""
    s = cells.str.strip()
    bad = ~(s.str.fullmatch(NUMBER_RE.pattern) | (s == ""))
    if bad.any():
        row = int(bad.to_numpy().argmax())
        _fail(f"input {name!r}, column {column!r}, data row {row + 1}: {s.iloc[row][:40]!r} is not a number")
    return [decimal.Decimal(v) if v else None for v in s.tolist()]


def _aggregate(op: str, values: list[Any], places: int) -> str:
    present = [v for v in values if v is not None]
    if op == "count":
        return str(len(present))
    if not present:
        return ""
    if op == "min":
        return str(min(present))
    if op == "max":
        return str(max(present))
    total = decimal.Decimal(0)
    for v in present:
        total = EXACT.add(total, v)
    if op == "sum":
        return str(total)
    return _average(total, len(present), places)


def _average(total: decimal.Decimal, n: int, places: int) -> str:
    scaled = round(Fraction(total) * 10**places / n)  # half-even on exact values
    return str(decimal.Decimal(scaled).scaleb(-places, EXACT))


def run(ctx: Any) -> None:
    import pandas as pd  # only inside the sandbox child, never in the enclave process

    inputs = sorted(ctx.inputs)
    if not inputs:
        _fail("needs at least one input")
    p = _params(dict(ctx.params), inputs)
    sources = {name: _source(name, ctx.inputs[name].read()) for name in inputs}
    headers = {name: _header(pd, name, sources[name]) for name in inputs}
    for name in inputs:
        if p["keys"][name] not in headers[name]:
            _fail(f"input {name!r} has no key column {p['keys'][name]!r} (its header: {headers[name][:20]})")
    refs = p["group_by"] + [a["column"] for a in p["aggregates"] if a["column"] is not None]
    where = {ref: _resolve(ref, headers, p["keys"]) for ref in refs}
    numeric = {where[a["column"]] for a in p["aggregates"] if a["column"] is not None and a["op"] != "count"}
    if p["dp"] is None:
        fast = _in_duckdb(p, inputs, sources, headers, where, numeric)
        if fast is not None:
            _write_outputs(ctx, p, *fast)
            return
    joined = None
    for name in inputs:
        key = p["keys"][name]
        used = sorted({col for (inp, col) in where.values() if inp == name} | {key})
        frame = _frame(pd, name, sources[name], used)
        for col in used:
            if len(frame):
                lengths = frame[col].str.len()
                if int(lengths.max()) > p["max_chars"]:
                    bad = int(lengths.to_numpy().argmax()) + 1
                    _fail(
                        f"input {name!r}, column {col!r}, data row {bad}: a field of {int(lengths.max())} "
                        f"characters (max_field_chars is {p['max_chars']})"
                    )
        part = pd.DataFrame({KEY: frame[key].str.strip().str.normalize("NFC").str.casefold()})
        for ref, (inp, col) in where.items():
            if inp == name and ref not in part:
                if (inp, col) in numeric:
                    part[ref] = pd.Series(_numbers(name, col, frame[col]), dtype=object)
                else:
                    part[ref] = frame[col]
        part = part[part[KEY] != ""]
        if joined is not None:
            left, right = joined[KEY].value_counts(), part[KEY].value_counts()
            made = int((left * right.reindex(left.index, fill_value=0)).sum())
            if made > p["max_rows"]:
                _fail(
                    f"joining input {name!r} would make {made} rows (max_join_rows is {p['max_rows']}): "
                    "keys repeated in several inputs multiply rows"
                )
        joined = part if joined is None else joined.merge(part, on=KEY, how="inner")
    assert joined is not None
    joined = joined.reset_index(drop=True)
    if p["dp"] is not None:  # the privacy unit is one key: keep its first max_contributions rows
        keep = joined.groupby(KEY, sort=False).cumcount() < p["dp"].max_contributions
        joined = joined[keep].reset_index(drop=True)
    if not len(joined):
        groups: dict[tuple[str, ...], Any] = {}
    elif p["group_by"]:
        raw = joined.groupby(p["group_by"], sort=False).indices
        groups = {(g if isinstance(g, tuple) else (g,)): pos for g, pos in raw.items()}
    else:
        groups = {(): range(len(joined))}
    keyv = joined[KEY].tolist()
    columns = {ref: joined[ref].tolist() for ref in refs}
    if p["dp"] is not None:
        _write_outputs(ctx, p, *_dp_release(p, groups, columns, len(joined)))
        return
    rows: list[list[str]] = []
    suppressed = 0
    for group in sorted(groups):
        pos = list(groups[group])
        if len({keyv[i] for i in pos}) < p["k"]:
            suppressed += 1
            continue
        row = [str(v) for v in group]
        for agg in p["aggregates"]:
            if agg["column"] is None:
                row.append(str(len(pos)))
            else:
                col = columns[agg["column"]]
                values = [col[i] for i in pos]
                if agg["op"] == "count":
                    values = [v if v != "" else None for v in values]
                row.append(_aggregate(agg["op"], values, p["avg_places"]))
        rows.append(row)
    _write_outputs(ctx, p, rows, _report(p, rows, suppressed))


def _report(p: dict[str, Any], rows: list[list[str]], suppressed: int) -> dict[str, Any]:
    return {
        "function": NAME,
        "version": "1",
        "k": p["k"],
        "groups": len(rows),
        "suppressed_groups": suppressed,
    }


def _write_outputs(ctx: Any, p: dict[str, Any], rows: list[list[str]], report: dict[str, Any]) -> None:
    sink = io.StringIO()
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(p["group_by"] + [a["as"] for a in p["aggregates"]])
    writer.writerows(rows)
    ctx.outputs["result"].write(sink.getvalue().encode("utf-8"))
    ctx.outputs["report"].write(json.dumps(report, sort_keys=True).encode() + b"\n")


def _dp_release(
    p: dict[str, Any], groups: dict[tuple[str, ...], Any], columns: dict[str, list[Any]], joined_rows: int
) -> tuple[list[list[str]], dict[str, Any]]:
    """The released rows under params.dp (noisy counts and clamped sums, builtins/dp_noise.py) and
    the report: no suppressed count (it would tell how many groups the data has), the privacy loss."""
    from confide.enclave.builtins import dp_noise

    dp = p["dp"]
    if not p["group_by"]:  # one public group, present even when the join is empty
        groups = {(): groups.get((), range(0))}
    labels = {json.dumps(list(g), ensure_ascii=False): g for g in groups}
    sum_aggs = [a for a in p["aggregates"] if a["op"] == "sum"]
    exact_sums, bounds, ulps = [], [], []
    for agg in sum_aggs:
        lo, hi = dp.bounds[agg["column"]]
        low, high = decimal.Decimal(repr(lo)), decimal.Decimal(repr(hi))
        col = columns[agg["column"]]
        sums = {}
        for label, group in labels.items():
            total = decimal.Decimal(0)
            for i in groups[group]:
                if col[i] is not None:
                    total = EXACT.add(total, min(max(col[i], low), high))
            sums[label] = float(total)
        bound = max(abs(lo), abs(hi))
        exact_sums.append(sums)
        bounds.append(bound)
        ulps.append(math.ulp(max(p["max_rows"], joined_rows + dp.max_contributions) * bound))
    released, noisy, info = dp_noise.release(
        {label: len(groups[g]) for label, g in labels.items()},
        exact_sums,
        public=not p["group_by"],
        k=p["k"],
        epsilon=float(dp.epsilon),
        mechanism=dp.mechanism,
        delta=dp.delta,
        m=dp.max_contributions,
        sum_bounds=bounds,
        sum_ulp=ulps,
    )
    rows = []
    for label in sorted(released, key=lambda lab: labels[lab]):
        row = [str(v) for v in labels[label]]
        sums_iter = iter(noisy)
        for agg in p["aggregates"]:
            row.append(str(released[label]) if agg["op"] == "count" else repr(next(sums_iter)[label]))
        rows.append(row)
    for measured, agg in zip(info["measurements"][1:], sum_aggs, strict=True):
        measured["column"] = agg["column"]
    report = {
        "function": NAME,
        "version": "1",
        "k": p["k"],
        "groups": len(rows),
        "dp": {
            "mechanism": dp.mechanism,
            "epsilon_spent": float(dp.epsilon),
            "delta": dp.delta,
            "max_contributions": dp.max_contributions,
            "bounds": {c: list(b) for c, b in dp.bounds.items()},
            "threshold": info["threshold"],
            "measurements": info["measurements"],
            "epsilon_measured": info["epsilon"],
            "delta_measured": info["delta"],
        },
    }
    return rows, report


# ---- the DuckDB path ------------------------------------------------------------------------------
ASCII_SPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.strip() removes from ASCII text
ASCII_NUMBER = "^[+-]?(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)$"  # NUMBER_RE on ASCII text
NEGATIVE_ZERO = "^-0*\\.?0*$"


class _GiveUp(Exception):
    """The DuckDB path cannot promise the reference path's output: the reference path runs."""


def _in_duckdb(
    p: dict[str, Any],
    inputs: list[str],
    sources: dict[str, Any],
    headers: dict[str, list[str]],
    where: dict[str, tuple[str, str]],
    numeric: set[tuple[str, str]],
) -> tuple[list[list[str]], dict[str, Any]] | None:
    """(rows, report) computed in DuckDB, or None where the reference path must run (see the module
    docstring)."""
    import duckdb  # only inside the sandbox child, never in the enclave process
    import pyarrow as pa

    from confide.enclave.builtins import duck  # pre-imported by the zygote

    group_refs = set(p["group_by"])
    if any(where[g] in numeric for g in group_refs):
        return None  # the reference path groups such a column by its decimal value
    try:
        tables, scales = {}, {}
        for i, name in enumerate(inputs):
            tables[f"t{i}"], sc = _arrow_input(p, name, sources[name], headers[name], where, numeric)
            scales.update(sc)
        minmax = {where[a["column"]] for a in p["aggregates"] if a["op"] in ("min", "max")}
        if any(scales[c][0] != scales[c][1] or scales[c][2] for c in minmax):
            return None  # mixed scales or a negative zero: which equal value prints is order-dependent
        con = duck.connect(duckdb, _duckdb_memory_mib())
        try:
            for t, table in tables.items():
                con.register(t, table)
            if len(inputs) > 2 and _join_too_big(con, len(inputs), p["max_rows"]):
                return None  # the reference path refuses it, with its message
            return _aggregate_in_duckdb(con, p, inputs, where, numeric, scales)
        finally:
            con.close()
    except (_GiveUp, duckdb.Error, decimal.DecimalException, pa.ArrowException):
        return None  # pyarrow's errors too: the reference path reads the input again and words them


def _duckdb_memory_mib() -> int:
    """Most of the sandbox's address-space limit (DuckDB's own limit makes it fail cleanly first)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, int(soft * 0.6) >> 20)


def _col(inp: str, col: str) -> str:
    """The Arrow column name of input `inp`'s column `col` (refs may name one column twice)."""
    return json.dumps([inp, col])


def _arrow_input(
    p: dict[str, Any],
    name: str,
    source: Any,
    header: list[str],
    where: dict[str, tuple[str, str]],
    numeric: set[tuple[str, str]],
) -> tuple[Any, dict[tuple[str, str], tuple[int, int, bool]]]:
    """Input `name` as an Arrow table: its normalised key ("k", rows with an empty key dropped), its
    used columns as text, and per numeric column a DECIMAL value ("v" + name) and the cell's scale
    ("s" + name); and per numeric column (smallest scale, largest scale, whether a cell is -0)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    key = p["keys"][name]
    used = sorted({col for (inp, col) in where.values() if inp == name} | {key})
    if isinstance(source, str):
        if _first_record(source) != header:
            raise _GiveUp  # pandas read the header differently (a repeated name)
        import pyarrow.csv as pcsv

        try:
            table = pcsv.read_csv(
                pa.BufferReader(source.encode("utf-8")),
                read_options=pcsv.ReadOptions(use_threads=False, block_size=16 << 20),
                parse_options=pcsv.ParseOptions(newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(
                    include_columns=used,
                    column_types={c: pa.string() for c in used},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                    null_values=[],
                ),
            )
        except pa.ArrowInvalid:  # its message quotes the row: name the line instead, or give up
            _refuse_ragged(name, source)
            raise _GiveUp from None
        columns = {c: table.column(c).combine_chunks() for c in used}
    else:
        table = source.read(columns=used, use_threads=False)
        columns = {c: _parquet_text(name, c, table.column(c).combine_chunks()) for c in used}
    for col in used:
        longest = pc.max(pc.utf8_length(columns[col])).as_py()
        if longest is not None and longest > p["max_chars"]:
            raise _GiveUp  # the reference path names the row
    out = {"k": _normalised_keys(columns[key])}
    scales = {}
    for inp, col in sorted(set(where.values())):
        if inp != name:
            continue
        cells = columns[col]
        out[_col(inp, col)] = cells
        if (inp, col) in numeric:
            value, scale, info = _decimals(cells)
            out["v" + _col(inp, col)] = value
            if scale is not None:
                out["s" + _col(inp, col)] = scale
            scales[(inp, col)] = info
    result = pa.table(out)
    return result.filter(pc.not_equal(result.column("k"), "")), scales


def _first_record(text: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(_header_text(text), newline="")), [])
    except csv.Error:
        raise _GiveUp from None


def _normalised_keys(cells: Any) -> Any:
    """strip, NFC and casefold of every key: Arrow's kernels on ASCII keys, Python on the others."""
    import unicodedata

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pc.ascii_lower(pc.utf8_trim(cells, characters=ASCII_SPACE))
    other = pc.invert(pc.string_is_ascii(cells))
    if pc.any(other).as_py():
        mask = np.asarray(other.to_numpy(zero_copy_only=False), dtype=bool)
        texts = cells.filter(other).to_pylist()
        fixed = pa.array([unicodedata.normalize("NFC", t.strip()).casefold() for t in texts], pa.string())
        keys = pc.replace_with_mask(keys, pa.array(mask), fixed)
    return keys


def _decimals(cells: Any) -> tuple[Any, Any, tuple[int, int, bool]]:
    """(the cells' numbers, null where empty: int64 when every one is an integer, else text that
    DuckDB casts to DECIMAL; each cell's scale, or None when they all have the same; (smallest and
    largest scale of a number, whether one is a negative zero))."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pc.all(pc.string_is_ascii(cells)).as_py():
        raise _GiveUp  # str.strip and \\d know Unicode spaces and digits
    text = pc.utf8_trim(cells, characters=ASCII_SPACE)
    empty = pc.equal(text, "")
    value = pc.if_else(empty, pa.scalar(None, pa.string()), text)
    digits = pc.ascii_is_decimal(pc.utf8_ltrim(value, characters="-"))
    if pc.all(digits).as_py() is not False:  # [-]digits (Arrow's integer parser also takes 0x..)
        try:
            ints = pc.cast(value, pa.int64())
        except pa.ArrowInvalid:  # "--1", or beyond 64 bits
            ints = None
        if ints is not None:
            negative_zero = pc.any(pc.and_(pc.starts_with(value, "-"), pc.equal(ints, 0))).as_py()
            return ints, None, (0, 0, bool(negative_zero))
    if not pc.all(pc.or_(pc.match_substring_regex(text, ASCII_NUMBER), empty)).as_py():
        raise _GiveUp  # the reference path names the cell
    dot = pc.find_substring(text, ".")
    length = pc.utf8_length(text)
    scale = pc.if_else(pc.less(dot, 0), 0, pc.subtract(pc.subtract(length, dot), 1))
    scale = pc.if_else(pc.invert(empty), scale, pa.scalar(None, scale.type))
    low, high = pc.min(scale).as_py() or 0, pc.max(scale).as_py() or 0
    negative_zero = pc.any(pc.match_substring_regex(text, NEGATIVE_ZERO)).as_py()
    return value, (scale if low != high else None), (low, high, bool(negative_zero))


def _join_too_big(con: Any, n: int, max_rows: int) -> bool:
    """Whether joining the inputs in order makes more than max_rows rows at some step (the reference
    path's check, which it then reports)."""
    if n < 2:
        return False
    counts = [f"(SELECT k, count(*)::HUGEINT AS c FROM t{i} GROUP BY k) c{i}" for i in range(n)]
    for last in range(1, n):
        product = " * ".join(f"c{i}.c" for i in range(last + 1))
        joined = counts[0] + "".join(f" JOIN {counts[i]} USING (k)" for i in range(1, last + 1))
        made = con.execute(f"SELECT coalesce(sum({product}), 0) FROM {joined}").fetchone()[0]
        if made > max_rows:
            return True
    return False


def _aggregate_in_duckdb(
    con: Any,
    p: dict[str, Any],
    inputs: list[str],
    where: dict[str, tuple[str, str]],
    numeric: set[tuple[str, str]],
    scales: dict[tuple[str, str], tuple[int, int, bool]],
) -> tuple[list[list[str]], dict[str, Any]]:
    def q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def typed(ref: str) -> str:
        return q("v" + _col(*where[ref]))

    select = [q(_col(*where[g])) for g in p["group_by"]] + ["count(*)", "count(DISTINCT k)"]
    for agg in p["aggregates"]:
        ref, op = agg["column"], agg["op"]
        if ref is None:
            select.append("count(*)")
        elif op == "count":
            inp, col = where[ref]
            select.append(
                f"count({q('v' + _col(inp, col))})"
                if (inp, col) in numeric
                else f"count(NULLIF({q(_col(inp, col))}, ''))"
            )
        else:
            fn = {"avg": "sum"}.get(op, op)
            inp, col = where[ref]
            low, high, _ = scales[(inp, col)]
            scale = f"max({q('s' + _col(inp, col))})" if low != high else str(high)
            select += [f"{fn}({typed(ref)})", f"count({typed(ref)})", scale]

    def cast(i: str) -> str:  # each input's numbers cast once, before the join multiplies rows
        casts = [
            f"CAST({q('v' + _col(inp, col))} AS DECIMAL(38, {scales[(inp, col)][1]})) AS {q('v' + _col(inp, col))}"
            for inp, col in sorted(numeric)
            if inp == i
        ]
        return (
            f"(SELECT * REPLACE ({', '.join(casts)}) FROM t{inputs.index(i)})"
            if casts
            else f"t{inputs.index(i)}"
        )

    source = " JOIN ".join(
        f"{cast(name)} AS j{i}" + ("" if i == 0 else " USING (k)") for i, name in enumerate(inputs)
    )
    if len(inputs) == 2:  # the join-size check in the same pass: at most max_rows + 1 rows flow
        source = f"(SELECT * FROM {source} LIMIT {p['max_rows'] + 1})"
    groups = ", ".join(q(_col(*where[g])) for g in p["group_by"])
    sql = f"SELECT {', '.join(select)} FROM {source}" + (f" GROUP BY {groups}" if groups else "")
    found = con.execute(sql).fetchall()
    width = len(p["group_by"])
    if not p["group_by"] and found and found[0][0] == 0:
        found = []  # an empty join has no group
    if sum(row[width] for row in found) > p["max_rows"]:
        raise _GiveUp  # the join is larger than max_join_rows: the reference path refuses it
    rows: list[list[str]] = []
    suppressed = 0
    for row in sorted(found, key=lambda r: tuple(r[:width])):
        if row[width + 1] < p["k"]:
            suppressed += 1
            continue
        out = [str(v) for v in row[:width]]
        at = width + 2
        for agg in p["aggregates"]:
            if agg["column"] is None or agg["op"] == "count":
                out.append(str(row[at]))
                at += 1
                continue
            value, present, scale = row[at : at + 3]
            at += 3
            if not present:
                out.append("")
            elif agg["op"] == "avg":
                out.append(_average(value, present, p["avg_places"]))
            else:  # the exponent the reference path's decimal sum (or min, max) has
                out.append(str(value.quantize(decimal.Decimal(1).scaleb(-int(scale)), context=EXACT)))
        rows.append(out)
    return rows, _report(p, rows, suppressed)
