"""join-aggregate's two engines give the same bytes: the DuckDB path (the default without dp) and the
reference path (pandas and Python decimals), run in this process on the same inputs; where the
DuckDB path cannot promise that, it gives up (and the reference path answers). Differential tests on
generated data (unicode and padded keys, numbers in every accepted spelling, empty cells, several
inputs, Parquet), plus the cases that must fall back."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.enclave.builtins import join_aggregate as ja
from confide.enclave.sandbox.context import Context

KEYS = [
    "ann",
    "ANN",
    " ann ",
    "Zoë",
    "Zoe\u0308",
    "straße",
    "STRASSE",
    "李",
    "bob\t",
    "\x1cbob",
    "ﬁn",
    "fin",
    "",
    "  ",
]
NUMBERS = [
    "1",
    "-2",
    "+3",
    "007",
    ".5",
    "5.",
    "2.50",
    "-0.25",
    "1234567890123.4567",
    "",
    " 4 ",
    "0",
    "0.000001",
    "-7.1",
]
GROUPS = ["g1", "g2", "G1", "ü", ""]


def run(params: dict[str, Any], tables: dict[str, bytes], *, engine: str) -> tuple[dict[str, bytes], bool]:
    """(outputs, whether the DuckDB path answered) of the built-in in this process; engine
    "reference" makes the DuckDB path give up."""
    outs = {"result": io.BytesIO(), "report": io.BytesIO()}
    ins = {n: io.BytesIO(t) for n, t in tables.items()}
    original, used = ja._in_duckdb, []

    def spy(*args: Any) -> Any:
        got = original(*args) if engine == "duckdb" else None
        used.append(got is not None)
        return got

    ja._in_duckdb = spy  # type: ignore[assignment]
    try:
        ja.run(Context(dict(params), ins, outs))  # type: ignore[arg-type]
    finally:
        ja._in_duckdb = original  # type: ignore[assignment]
    return {n: o.getvalue() for n, o in outs.items()}, bool(used and used[0])


def both(params: dict[str, Any], tables: dict[str, bytes]) -> tuple[dict[str, bytes], bool]:
    fast, answered = run(params, tables, engine="duckdb")
    reference, _ = run(params, tables, engine="reference")
    assert fast == reference, (fast, reference)
    return fast, answered


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    import csv

    sink = io.StringIO()
    csv.writer(sink, lineterminator="\n").writerows([header, *rows])
    return sink.getvalue().encode("utf-8")


ALL_OPS = [
    {"op": "count"},
    {"op": "count", "column": "v"},
    {"op": "sum", "column": "v"},
    {"op": "avg", "column": "v"},
    {"op": "sum", "column": "w"},
    {"op": "count", "column": "note"},
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=st.lists(
        st.tuples(st.sampled_from(KEYS), st.sampled_from(GROUPS), st.sampled_from(NUMBERS)), max_size=40
    ),
    b=st.lists(
        st.tuples(st.sampled_from(KEYS), st.sampled_from(NUMBERS), st.sampled_from(["", "x", " "])),
        max_size=40,
    ),
    k=st.integers(2, 3),
    grouped=st.booleans(),
)
def test_both_engines_agree_on_generated_tables(a, b, k, grouped) -> None:
    tables = {
        "bank": csv_bytes(["id", "g", "v"], [list(r) for r in a]),
        "shop": csv_bytes(["customer", "w", "note"], [list(r) for r in b]),
    }
    params = {
        "key": {"bank": "id", "shop": "customer"},
        "k": k,
        "group_by": ["g"] if grouped else [],
        "aggregates": ALL_OPS,
        "avg_places": 3,
    }
    both(params, tables)


def test_the_duckdb_path_answers_ordinary_tables_with_min_max_and_three_inputs() -> None:
    rows = [[f"id{i % 17}", f"r{i % 3}", f"{i * 7 % 101}.{i % 10}{i % 7}"] for i in range(300)]
    tables = {
        "a": csv_bytes(["id", "region", "x"], rows),
        "b": csv_bytes(["id", "y"], [[f"ID{i % 23} ", str(i)] for i in range(100)]),
        "c": csv_bytes(["id", "z"], [[f"id{i}", "1"] for i in range(30)]),
    }
    params = {
        "key": "id",
        "k": 2,
        "group_by": ["region"],
        "aggregates": [
            {"op": "min", "column": "x"},
            {"op": "max", "column": "x"},
            {"op": "sum", "column": "y"},
            {"op": "avg", "column": "x"},
            {"op": "count"},
        ],
    }
    out, answered = both(params, tables)
    assert answered
    result = out["result"].decode().splitlines()
    assert result[0] == "region,min(x),max(x),sum(y),avg(x),count" and len(result) == 4
    assert json.loads(out["report"])["suppressed_groups"] == 0


def test_parquet_inputs_take_the_duckdb_path() -> None:
    sink = io.BytesIO()
    pq.write_table(
        pa.table({"id": [f"k{i % 9}" for i in range(90)], "v": [i * 0.25 for i in range(90)]}), sink
    )
    tables = {"a": sink.getvalue(), "b": csv_bytes(["id", "g"], [[f"K{i}", f"g{i % 2}"] for i in range(9)])}
    params = {"key": "id", "k": 2, "group_by": ["g"], "aggregates": [{"op": "sum", "column": "v"}]}
    out, answered = both(params, tables)
    assert answered and out["result"].decode().splitlines()[0] == "g,sum(v)"


@pytest.mark.parametrize(
    ("a_rows", "params", "why"),
    [
        (
            [["x", "1.0"], ["x", "1.00"], ["y", "2"]],
            {"aggregates": [{"op": "min", "column": "v"}]},
            "mixed scales",
        ),
        (
            [["x", "-0"], ["x", "0"], ["y", "2"]],
            {"aggregates": [{"op": "max", "column": "v"}]},
            "negative zero",
        ),
        ([["x", "١"], ["y", "2"]], {"aggregates": [{"op": "sum", "column": "v"}]}, "a non-ASCII digit"),
        (
            [["x", "1"], ["y", "2"]],
            {"group_by": ["v"], "aggregates": [{"op": "sum", "column": "v"}]},
            "summed group column",
        ),
        (
            [["x", "9" * 38], ["y", "9" * 38]],
            {"aggregates": [{"op": "sum", "column": "v"}]},
            "38-digit overflow",
        ),
    ],
)
def test_the_duckdb_path_gives_up_where_it_cannot_promise_the_same_output(a_rows, params, why) -> None:
    tables = {
        "a": csv_bytes(["id", "v"], a_rows),
        "b": csv_bytes(["id", "w"], [["x", "1"], ["x", "2"], ["y", "3"], ["X ", "4"]]),
    }
    _out, answered = both({"key": "id", "k": 2, **params}, tables)
    assert not answered, why


@pytest.mark.parametrize(
    ("bank", "params", "message"),
    [
        (b"id,v\nx,1\nx,abc\n", {}, "input 'a', column 'v', data row 2: 'abc' is not a number"),
        (b"id,v\nx,1\nx," + b"9" * 50 + b"\n", {"max_field_chars": 10}, "a field of 50 characters"),
        (b"id,v\n" + b"x,1\n" * 40, {"max_join_rows": 100}, "would make 160 rows (max_join_rows is 100)"),
        (b"id,v\nx,1\ny,2,secret\n", {}, "input 'a', line 3: 3 fields, the header has 2"),
        (b"id,v\nx,1\n\ny\n", {}, "input 'a', line 4: 1 fields, the header has 2"),
    ],
)
def test_errors_are_the_reference_paths_words(bank: bytes, params: dict[str, Any], message: str) -> None:
    tables = {"a": bank, "b": b"id,w\nx,1\nx,2\nx,3\nx,4\n"}
    full = {"key": "id", "k": 2, "aggregates": [{"op": "sum", "column": "v"}], **params}
    for engine in ("duckdb", "reference"):
        with pytest.raises(ValueError, match="^join-aggregate: ") as err:
            run(full, tables, engine=engine)
        assert message in str(err.value), (engine, str(err.value))
        assert "secret" not in str(err.value)
