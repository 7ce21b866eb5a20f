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
        return [str(c) for c in pd.read_csv(io.StringIO(source), nrows=0, dtype=str).columns]
    except Exception as exc:
        _fail(f"input {name!r} is not a readable CSV file ({str(exc)[:200]})")
    raise AssertionError


def _parquet_cells(name: str, column: str, values: Any) -> list[str]:
    """A Parquet column as the text of CSV cells (null: empty)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_floating(values.type):
        cells = []
        for row, v in enumerate(values.to_pylist(), 1):
            if v is not None and not math.isfinite(v):
                _fail(f"input {name!r}, column {column!r}, data row {row}: {v!r} is not a number")
            cells.append("" if v is None else format(decimal.Decimal(repr(v)), "f"))
        return cells
    try:
        return list(pc.fill_null(pc.cast(values, pa.string()), "").to_pylist())
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
    try:
        return pd.read_csv(
            io.StringIO(source), usecols=used, dtype=str, keep_default_na=False, na_filter=False
        )
    except Exception as exc:
        _fail(f"input {name!r}: not a readable CSV file ({str(exc)[:200]})")
    raise AssertionError


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
    scaled = round(Fraction(total) * 10**places / len(present))  # half-even on exact values
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
    report = {
        "function": NAME,
        "version": "1",
        "k": p["k"],
        "groups": len(rows),
        "suppressed_groups": suppressed,
    }
    _write_outputs(ctx, p, rows, report)


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
