"""The built-in sql v1 (DuckDB under an analysis rule every owner approves), run as tasks in a real
enclave worker (sandboxed like any party's function): results against plain DuckDB on the same CSV
files, every rule violation refused naming its clause, small groups suppressed, hostile parameters;
and one task through the SDK helper and one through the CLI on a real server."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest

from confide.client import analytics
from confide.client.approval import describe_manifest
from confide.client.manifest_build import build_manifest
from confide.enclave import manifest as mf
from confide.enclave.builtins import sql as sql_builtin
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity
from confide.enclave.sandbox.context import Context
from platform_support import CliParties, sdk_clients, upload_tables

LAB = Identity.generate("lab")
BANK = Identity.generate("bank")
SHOP = Identity.generate("shop")
PARTIES = {"lab": LAB.public, "bank": BANK.public, "shop": SHOP.public}
OWNERS = {"bank": BANK, "shop": SHOP}

RULE: dict[str, Any] = {
    "tables": {
        "bank": {"columns": ["region", "balance"], "join_columns": ["id"], "id_column": "id"},
        "shop": {"columns": ["segment", "spend"], "join_columns": ["customer"], "id_column": "customer"},
    },
    "aggregates": ["count", "sum", "avg", "min", "max"],
    "min_group_size": 10,
}
QUERY = (
    "SELECT b.region, s.segment, count(*) AS n, sum(b.balance) AS total, avg(s.spend) AS mean_spend, "
    "min(b.balance) AS lo, max(s.spend) AS hi, count(DISTINCT s.spend) AS spends "
    "FROM bank AS b JOIN shop AS s ON b.id = s.customer WHERE s.spend >= 100 "
    "GROUP BY b.region, s.segment ORDER BY b.region, s.segment"
)


def bank_table(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    regions = rng.choice(["north", "south", "east", "west", "isle"], n, p=[0.3, 0.3, 0.2, 0.19, 0.01])
    frame = pd.DataFrame(
        {"id": rng.integers(0, 150, n), "region": regions, "balance": rng.integers(-500, 5000, n)}
    )
    return frame.to_csv(index=False).encode()


def shop_table(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "customer": rng.integers(0, 200, n),
            "segment": rng.choice(["gold", "plain"], n),
            "spend": rng.integers(0, 10**4, n),
        }
    )
    return frame.to_csv(index=False).encode()


def plain_duckdb(tables: dict[str, bytes], query: str, counts: str, k: int, tmp: Path) -> pd.DataFrame:
    """The same query in plain DuckDB over the same CSV files, `counts` (the threshold's distinct
    counts, computed independently here) appended, groups below k dropped in pandas."""
    con = duckdb.connect()
    for name, data in tables.items():
        (tmp / f"{name}.csv").write_bytes(data)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_csv('{tmp / name}.csv')")
    select, rest = query.split(" FROM ", 1)
    frame = con.execute(f"{select}, {counts} FROM {rest}").df()
    hidden = [c for c in frame.columns if c.startswith("k_")]
    keep = frame[hidden].min(axis=1) >= k
    return frame[keep].drop(columns=hidden).reset_index(drop=True)


def manifest(kit, datasets: dict, params: dict):
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("sql"),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput("result", (LAB.fingerprint,)), mf.TaskOutput("report", (LAB.fingerprint,))],
        participants=PARTIES,
    )


def run(kit, tables: dict[str, bytes], params: dict):
    return kit.run_builtin(
        "sql", tables, params, owners=OWNERS, creator=LAB, outputs=("result", "report"), participants=PARTIES
    )


def result_frame(kit, outs) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(kit.read(outs["result"], LAB)))


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


@pytest.fixture(scope="module")
def tables() -> dict[str, bytes]:
    return {"bank": bank_table(1, 800), "shop": shop_table(2, 700)}


def test_sql_agrees_with_plain_duckdb_and_suppresses_small_groups(kit, tables, tmp_path) -> None:
    result, body, outs = run(kit, tables, {"query": QUERY, "rule": RULE})
    assert result["ok"], body
    got = result_frame(kit, outs)
    counts = "count(DISTINCT b.id) AS k_bank, count(DISTINCT s.customer) AS k_shop, count(*) AS k_rows"
    expect = plain_duckdb(tables, QUERY, counts, 10, tmp_path)
    all_groups = plain_duckdb(tables, QUERY, counts, 0, tmp_path)
    assert list(got.columns) == ["region", "segment", "n", "total", "mean_spend", "lo", "hi", "spends"]
    assert len(got) == len(expect) >= 6 and len(all_groups) > len(expect)  # "isle" groups fall below k
    assert "isle" not in set(got["region"]) and "isle" in set(all_groups["region"])
    pd.testing.assert_frame_equal(got, expect, check_dtype=False)
    report = json.loads(kit.read(outs["report"], LAB))
    assert report == {"function": "sql", "version": "1", "min_group_size": 10, "rows": len(expect)}


def test_threshold_counts_distinct_ids_not_rows(kit) -> None:
    """One customer in 30 rows is one id: its group is suppressed at k = 2; a pair of ids is not."""
    bank = b"id,region,balance\n" + b"1,solo,1\n" * 30 + b"2,pair,1\n3,pair,2\n"
    shop = b"customer,segment,spend\n" + b"1,x,1\n" * 30 + b"2,x,1\n3,x,1\n"
    query = "SELECT region, count(*) AS n FROM bank JOIN shop ON bank.id = shop.customer GROUP BY region"
    result, body, outs = run(
        kit, {"bank": bank, "shop": shop}, {"query": query, "rule": {**RULE, "min_group_size": 2}}
    )
    assert result["ok"], body
    assert result_frame(kit, outs).to_numpy().tolist() == [["pair", 2]]
    report = json.loads(kit.read(outs["report"], LAB))
    assert report["rows"] == 1 and "suppressed" not in json.dumps(report)


def test_rows_threshold_without_id_columns_and_a_single_table(kit) -> None:
    rule = {
        "tables": {"bank": {"columns": ["region"]}, "shop": {"columns": ["segment"]}},
        "aggregates": ["count"],
        "min_group_size": 3,
        "join_required": False,
    }
    bank = b"id,region,balance\n1,a,1\n2,a,1\n3,a,1\n4,b,1\n5,b,1\n"
    shop = b"customer,segment,spend\n1,x,1\n"
    query = "SELECT region, count(*) FROM bank GROUP BY region"
    result, body, outs = run(kit, {"bank": bank, "shop": shop}, {"query": query, "rule": rule})
    assert result["ok"], body
    assert result_frame(kit, outs).to_numpy().tolist() == [["a", 3]]


def test_dates_load_as_dates_and_typed_literals_are_allowed(kit) -> None:
    bank = b"id,region,balance,opened\n" + b"".join(
        f"{i},a,{i},2020-01-{i + 1:02d}\n".encode() for i in range(9)
    )
    shop = b"customer,segment,spend\n" + b"".join(f"{i},x,1\n".encode() for i in range(9))
    rule = {**RULE, "min_group_size": 3}
    rule["tables"] = {
        **RULE["tables"],
        "bank": {**RULE["tables"]["bank"], "columns": ["region", "balance", "opened"]},
    }
    query = (
        "SELECT region, count(*) AS n, sum(balance) AS s, min(opened) AS first FROM bank JOIN shop "
        "ON bank.id = shop.customer WHERE opened >= DATE '2020-01-05' GROUP BY region"
    )
    result, body, outs = run(kit, {"bank": bank, "shop": shop}, {"query": query, "rule": rule})
    assert result["ok"], body
    assert result_frame(kit, outs).to_numpy().tolist() == [["a", 5, 4 + 5 + 6 + 7 + 8, "2020-01-05"]]


def test_raw_columns_only_when_the_rule_allows_them(kit) -> None:
    """allow_raw_columns: a list query; a row leaves only if k distinct ids share its output values."""
    bank = b"id,region,balance\n" + b"".join(
        f"{i},{'north' if i < 5 else 'isle'},1\n".encode() for i in range(6)
    )
    shop = b"customer,segment,spend\n" + b"".join(f"{i},x,1\n".encode() for i in range(6))
    query = "SELECT region FROM bank JOIN shop ON bank.id = shop.customer ORDER BY region"
    rule = {**RULE, "min_group_size": 3, "allow_raw_columns": True}
    result, body, outs = run(kit, {"bank": bank, "shop": shop}, {"query": query, "rule": rule})
    assert result["ok"], body
    assert result_frame(kit, outs)["region"].tolist() == ["north"] * 5
    result, body, outs = run(
        kit, {"bank": bank, "shop": shop}, {"query": query, "rule": {**rule, "allow_raw_columns": False}}
    )
    assert result["ok"] is False
    assert "(SELECT): column bank.region is output raw" in kit.read(outs["_error"], LAB).decode()


J = "FROM bank JOIN shop ON bank.id = shop.customer"
VIOLATIONS = [
    (f"SELECT region, balance {J}", "(SELECT): column bank.balance is output raw"),
    (
        f"SELECT region, sum(balance) {J} GROUP BY region HAVING balance > 1",
        "(SELECT): column bank.balance is output raw",
    ),
    (f"SELECT stddev(balance) {J}", "(SELECT): aggregate function 'stddev' is not allowed by the rule"),
    (f"SELECT list(balance) {J}", "(SELECT): aggregate function 'list' is not allowed by the rule"),
    (f"SELECT count(*) {J} WHERE bank.id > 3", "(WHERE): bank.id is not an allowed column of bank"),
    (f"SELECT sum(shop.customer) {J}", "(SELECT): shop.customer is not an allowed column of shop"),
    (
        "SELECT count(*) FROM bank JOIN shop ON bank.region = shop.segment",
        "(JOIN ON): bank.region is not an allowed join column",
    ),
    (
        "SELECT count(*) FROM bank JOIN shop ON bank.id > shop.customer",
        "(JOIN ON): a join condition other than equalities",
    ),
    ("SELECT count(*) FROM bank JOIN shop ON true", "(JOIN ON): a join condition other than equalities"),
    ("SELECT count(*) FROM bank, shop", "(JOIN): a CROSS INNER join"),
    ("SELECT count(*) FROM bank CROSS JOIN shop", "(JOIN): a CROSS INNER join"),
    ("SELECT count(*) FROM bank LEFT JOIN shop ON bank.id = shop.customer", "(JOIN): a REGULAR LEFT join"),
    ("SELECT count(*) FROM bank NATURAL JOIN shop", "(JOIN): a NATURAL INNER join"),
    (
        "SELECT count(*) FROM bank",
        "(FROM): the rule requires every table to be joined; the query does not read shop",
    ),
    (f"SELECT count(*) {J} JOIN bank AS b2 ON b2.id = shop.customer", "(FROM): table 'bank' is read twice"),
    (f"SELECT count(*) {J} WHERE bank.id IN (SELECT customer FROM shop)", "(WHERE): a subquery"),
    (f"SELECT (SELECT max(balance) FROM bank) {J}", "(SELECT): a subquery"),
    (
        "SELECT count(*) FROM (SELECT * FROM bank) AS b JOIN shop ON b.id = shop.customer",
        "(FROM): a subquery in FROM",
    ),
    (f"WITH t AS (SELECT * FROM bank) SELECT count(*) {J}", "(WITH): a common table expression"),
    (f"SELECT count(*) {J} UNION SELECT 1", "(UNION): a set operation"),
    (f"SELECT count(*) {J} UNION ALL SELECT * FROM (VALUES (1)) v(x)", "(UNION): a set operation"),
    (f"SELECT count(*) {J} EXCEPT SELECT 1", "(EXCEPT): a set operation"),
    (f"SELECT count(*) {J} INTERSECT SELECT 1", "(INTERSECT): a set operation"),
    (
        "SELECT count(*) FROM (VALUES (1, 2)) v(id, x) JOIN shop ON v.id = shop.customer",
        "(FROM): a subquery in FROM",
    ),
    ("VALUES (1)", "(FROM): VALUES (a literal table)"),
    ("SELECT count(*) FROM read_csv('/etc/passwd')", "(FROM): a table function"),
    ("SELECT count(*) FROM bank JOIN range(10) r ON bank.id = r.range", "(FROM): a table function"),
    ("SELECT count(*) FROM 'x.csv'", "(FROM): table 'x.csv' is not one of the rule's tables"),
    ("DESCRIBE bank", "(FROM): DESCRIBE/SHOW/SUMMARIZE"),
    ("SUMMARIZE bank", "(FROM): DESCRIBE/SHOW/SUMMARIZE"),
    (f"SELECT * {J}", "(SELECT): * (name the columns)"),
    (
        f"SELECT sum(CASE WHEN bank.id = 7 THEN balance END) {J}",
        "(SELECT): sum(...) over something other than one plain column",
    ),
    (
        f"SELECT sum(balance) FILTER (WHERE region = 'isle') {J}",
        "(SELECT): FILTER or ORDER BY inside sum(...)",
    ),
    (f"SELECT sum(balance) OVER () {J}", "(SELECT): a window function"),
    (f"SELECT region, count(*) {J} GROUP BY ROLLUP (region)", "(GROUP BY): GROUPING SETS, ROLLUP or CUBE"),
    (f"SELECT region, count(*) {J} GROUP BY ALL", "(GROUP BY ALL)"),
    (
        f"SELECT lower(region), count(*) {J} GROUP BY lower(region)",
        "(GROUP BY): GROUP BY names something other than a plain column",
    ),
    (f"SELECT DISTINCT region {J}", "(SELECT): column bank.region is output raw"),
    (f"SELECT count(*) {J} WHERE CAST(region AS INT) > 0", "(WHERE): CAST of a value that is not a literal"),
    (f"SELECT count(*) {J} WHERE balance * 1000000000000 > 0", "(WHERE): arithmetic (*) on row values"),
    (f"SELECT count(*) {J} WHERE getenv('HOME') = ''", "(WHERE): function 'getenv' is not allowed"),
    (f"SELECT count(*) {J} WHERE region ~ 'x'", "(WHERE): function 'regexp_matches' is not allowed"),
    (f"SELECT count(*) AS __confide_0 {J}", "names starting with __confide_ are the enclave's"),
    (f"SELECT count(*) {J} QUALIFY row_number() OVER () = 1", "(QUALIFY)"),
    (f"SELECT count(*) {J} USING SAMPLE 10", "(USING SAMPLE)"),
    (f"SELECT count(*) {J} LIMIT (SELECT 1)", "(LIMIT): LIMIT and OFFSET must be numbers"),
    ("PRAGMA version", "(PRAGMA): only a SELECT statement is allowed"),
    ("ATTACH 'other.db'", "(ATTACH): only a SELECT statement is allowed"),
    ("COPY bank TO 'out.csv'", "(COPY): only a SELECT statement is allowed"),
    ("INSTALL tpch", "(INSTALL/LOAD): only a SELECT statement is allowed"),
    ("LOAD tpch", "(INSTALL/LOAD): only a SELECT statement is allowed"),
    ("SET threads = 4", "(SET): only a SELECT statement is allowed"),
    ("CALL dbgen(sf = 1)", "(CALL): only a SELECT statement is allowed"),
    ("CREATE TABLE t AS SELECT 1", "(CREATE): only a SELECT statement is allowed"),
    (f"SELECT count(*) {J}; SELECT 1", "(statement): 2 statements"),
]


@pytest.mark.parametrize(("query", "message"), VIOLATIONS, ids=[q[:60] for q, _ in VIOLATIONS])
def test_every_rule_violation_is_refused_naming_the_clause(kit, query: str, message: str) -> None:
    tables = {"bank": bank_table(3, 40), "shop": shop_table(4, 40)}
    result, body, outs = run(kit, tables, {"query": query, "rule": RULE})
    assert result["ok"] is False and result["category"] == "exception"
    assert body["error"]["check"] == "run"
    error = kit.read(outs["_error"], LAB).decode()
    assert message in error, error[:800]
    assert not outs["result"].exists() and not outs["report"].exists()


def in_process(params: dict, tables: dict[str, bytes]) -> dict[str, bytes]:
    """The built-in's run(ctx) in this process (coverage sees it here, not in the sandbox child)."""
    outs = {"result": io.BytesIO(), "report": io.BytesIO()}
    ins = {n: io.BytesIO(t) for n, t in tables.items()}
    sql_builtin.run(Context(dict(params), ins, outs))  # type: ignore[arg-type]
    return {n: o.getvalue() for n, o in outs.items()}


def test_in_process_run_matches_the_sandboxed_run_and_refuses_alike(kit, tables) -> None:
    result, body, outs = run(kit, tables, {"query": QUERY, "rule": RULE})
    assert result["ok"], body
    got = in_process({"query": QUERY, "rule": RULE}, tables)
    assert got["result"] == kit.read(outs["result"], LAB) and got["report"] == kit.read(outs["report"], LAB)
    small = {"bank": bank_table(3, 40), "shop": shop_table(4, 40)}
    for query, message in VIOLATIONS:
        with pytest.raises(ValueError, match="^sql: ") as err:
            in_process({"query": query, "rule": RULE}, small)
        assert message in str(err.value), (query, str(err.value))


def test_table_names_ignore_case_like_sql() -> None:
    rule = {
        **RULE,
        "min_group_size": 2,
        "tables": {"Bank": RULE["tables"]["bank"], "shop": RULE["tables"]["shop"]},
    }
    bank = b"id,region,balance\n1,a,1\n2,a,2\n"
    shop = b"customer,segment,spend\n1,x,1\n2,x,1\n"
    query = "SELECT count(*) AS n FROM BANK JOIN shop ON bank.id = shop.customer"
    assert in_process({"query": query, "rule": rule}, {"Bank": bank, "shop": shop})["result"] == b"n\n2\n"
    with pytest.raises(ValueError, match="differ only in case"):
        in_process({"query": query, "rule": rule}, {"Bank": bank, "bank": bank, "shop": shop})


BAD_PARAMS = [
    ({"rule": RULE}, "parameter 'query' (the SQL text) is required"),
    ({"query": 42, "rule": RULE}, "parameter 'query' (the SQL text) is required"),
    ({"query": ["SELECT 1"], "rule": RULE}, "parameter 'query' (the SQL text) is required"),
    ({"query": "SELECT count(*) " + "+ 1 " * 5000, "rule": RULE}, "characters, at most 16384"),
    ({"query": QUERY}, "parameter 'rule' (the analysis rule: an object) is required"),
    (
        {"query": QUERY, "rule": "allow everything"},
        "parameter 'rule' (the analysis rule: an object) is required",
    ),
    ({"query": QUERY, "rule": {**RULE, "min_group_size": 1}}, "min_group_size must be an integer in 2..10^9"),
    (
        {"query": QUERY, "rule": {**RULE, "min_group_size": True}},
        "min_group_size must be an integer in 2..10^9",
    ),
    (
        {"query": QUERY, "rule": {k: v for k, v in RULE.items() if k != "min_group_size"}},
        "rule: min_group_size (k, at least 2) is required",
    ),
    (
        {"query": QUERY, "rule": {**RULE, "tables": {"bank": RULE["tables"]["bank"]}}},
        "rule: tables must name exactly the task's inputs",
    ),
    (
        {"query": QUERY, "rule": {**RULE, "aggregates": ["median"]}},
        "rule: aggregates must be a non-empty list of",
    ),
    ({"query": QUERY, "rule": {**RULE, "aggregates": []}}, "rule: aggregates must be a non-empty list of"),
    (
        {"query": QUERY, "rule": {**RULE, "allow_raw_columns": "yes"}},
        "rule: allow_raw_columns must be true or false",
    ),
    ({"query": QUERY, "rule": {**RULE, "everything": True}}, "rule: unknown field(s) everything"),
    (
        {"query": QUERY, "rule": {**RULE, "tables": {**RULE["tables"], "bank": {"columns": "region"}}}},
        "rule: tables.bank.columns must be a list of column names",
    ),
    (
        {"query": QUERY, "rule": {**RULE, "tables": {**RULE["tables"], "bank": {"columns": ["ssn"]}}}},
        "rule names column(s) ssn of 'bank', which its header does not have",
    ),
    ({"query": QUERY, "rule": RULE, "threads": 16}, "unknown parameter(s) threads"),
    (
        {"query": QUERY, "rule": RULE, "memory_limit_mib": 0},
        "memory_limit_mib must be an integer in 16..65536",
    ),
    ({"query": "SELEC count(*) FROM bank", "rule": RULE}, "query is not valid SQL"),
]


@pytest.mark.parametrize(("params", "message"), BAD_PARAMS, ids=[m[:50] for _, m in BAD_PARAMS])
def test_hostile_parameters_get_a_clear_error(kit, params: dict, message: str) -> None:
    tables = {"bank": bank_table(5, 20), "shop": shop_table(6, 20)}
    result, _body, outs = run(kit, tables, params)
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(outs["_error"], LAB).decode()
    assert message in error, error[:800]


@pytest.mark.parametrize(
    ("bank", "message"),
    [
        (b"id,r\xe9gion,balance\n1,a,1\n", "input 'bank' is not UTF-8 text (byte 4, line 1)"),
        (b"id,region,balance,REGION\n1,a,1,b\n", "input 'bank' has a column name twice"),
        (b"", "input 'bank' has no header line"),
        (b"id,region,balance\n1,a,1\n2,b\n", "input 'bank' is not a readable CSV file"),
        (b"id,region,balance\n1,\xff,1\n", "input 'bank' is not UTF-8 text (byte 20, line 2)"),
        (
            b"id,region,balance\n" + b"1,a,1\n" * 12000 + b"2,\xff,1\n",
            "input 'bank', column 'region': not UTF-8 text",
        ),
    ],
)
def test_hostile_inputs_get_a_clear_error(kit, bank: bytes, message: str) -> None:
    query = "SELECT count(*) FROM bank JOIN shop ON bank.id = shop.customer"
    result, _body, outs = run(kit, {"bank": bank, "shop": shop_table(6, 20)}, {"query": query, "rule": RULE})
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(outs["_error"], LAB).decode(errors="replace")
    assert message in error, error[:800]


def test_run_time_errors_are_withheld_and_too_many_rows_refused(kit) -> None:
    bank = b"id,region,balance\n" + b"".join(f"{i},r{i},1\n".encode() for i in range(30))
    shop = b"customer,segment,spend\n" + b"".join(f"{i},x,1\n".encode() for i in range(30))
    rule = {**RULE, "min_group_size": 2}
    q = "SELECT segment, count(*) FROM bank JOIN shop ON bank.id = shop.customer GROUP BY segment"
    result, body, outs = run(
        kit, {"bank": bank, "shop": shop}, {"query": q, "rule": rule, "max_result_rows": 1}
    )
    assert result["ok"], body
    q = "SELECT region, count(*) FROM bank JOIN shop ON bank.id = shop.customer GROUP BY region"
    rule = {
        **RULE,
        "min_group_size": 2,
        "tables": {**RULE["tables"], "bank": {**RULE["tables"]["bank"], "id_column": None}},
    }
    bank2 = b"id,region,balance\n" + b"".join(f"{i},r{i % 3},1\n".encode() for i in range(30))
    result, body, outs = run(
        kit, {"bank": bank2, "shop": shop}, {"query": q, "rule": rule, "max_result_rows": 2}
    )
    assert result["ok"] is False
    assert "more than max_result_rows = 2 rows" in kit.read(outs["_error"], LAB).decode()


ARITH_QUERY = (
    "SELECT b.region, sum(b.balance * (1 - s.spend)) AS a, avg(b.balance + s.spend * 2.5) AS m, "
    "sum(-b.balance) AS neg, min(s.spend - b.balance) AS lo, count(*) AS n "
    "FROM bank AS b JOIN shop AS s ON b.id = s.customer GROUP BY b.region ORDER BY b.region"
)


def test_aggregate_arithmetic_agrees_with_plain_duckdb_only_when_the_rule_allows_it(
    kit, tables, tmp_path
) -> None:
    """TPC-H Q1's shape, sum(price * (1 - discount)): + - * of columns and literals inside aggregates
    under rule.aggregate_arithmetic, the same values as plain DuckDB; refused without the flag."""
    rule = {**RULE, "aggregate_arithmetic": True}
    result, body, outs = run(kit, tables, {"query": ARITH_QUERY, "rule": rule})
    assert result["ok"], body
    got = result_frame(kit, outs)
    counts = "count(DISTINCT b.id) AS k_bank, count(DISTINCT s.customer) AS k_shop, count(*) AS k_rows"
    expect = plain_duckdb(tables, ARITH_QUERY, counts, 10, tmp_path)
    assert len(got) == len(expect) >= 3
    pd.testing.assert_frame_equal(got, expect, check_dtype=False)
    assert in_process({"query": ARITH_QUERY, "rule": rule}, tables)["result"] == kit.read(outs["result"], LAB)
    result, body, outs = run(kit, tables, {"query": ARITH_QUERY, "rule": RULE})
    assert result["ok"] is False
    error = kit.read(outs["_error"], LAB).decode()
    assert (
        "(SELECT): sum(...) over something other than one plain column (the rule's aggregate_arithmetic"
        in error
    )


ARITH_VIOLATIONS = [
    (f"SELECT sum(balance / spend) {J}", "function '/' inside sum(...): aggregate_arithmetic allows only"),
    (
        f"SELECT sum(balance * (CASE WHEN bank.id = 7 THEN 1 ELSE 0 END)) {J}",
        "a CASE expression inside sum(...)",
    ),
    (f"SELECT sum(abs(balance)) {J}", "function 'abs' inside sum(...)"),
    (
        f"SELECT sum(balance * 1001) {J}",
        "inside sum(...) a literal must be a number of magnitude at most 1000",
    ),
    (
        f"SELECT sum(balance * 1e9) {J}",
        "inside sum(...) a literal must be a number of magnitude at most 1000",
    ),
    (f"SELECT sum(balance * '2') {J}", "inside sum(...) a literal must be a number"),
    (f"SELECT sum(balance * NULL) {J}", "inside sum(...) a literal must be a number"),
    (f"SELECT sum(balance + shop.customer) {J}", "(SELECT): shop.customer is not an allowed column of shop"),
    (f"SELECT sum(balance * CAST(spend AS DOUBLE)) {J}", "a CAST expression inside sum(...)"),
    (f"SELECT sum(balance * sum(spend)) {J}", "function 'sum' inside sum(...)"),
    (f"SELECT sum(balance % 2) {J}", "function '%' inside sum(...)"),
    (f"SELECT sum(balance * (SELECT 1)) {J}", "a SUBQUERY expression inside sum(...)"),
    (f"SELECT count(*) {J} WHERE balance * 2 > 0", "(WHERE): arithmetic (*) on row values"),
    (
        f"SELECT region, sum(balance) {J} GROUP BY region HAVING sum(balance) * 2 > balance * 2",
        "(HAVING): arithmetic (*) on row values",
    ),
]


@pytest.mark.parametrize(("query", "message"), ARITH_VIOLATIONS, ids=[q[:60] for q, _ in ARITH_VIOLATIONS])
def test_aggregate_arithmetic_refuses_what_could_single_out_rows(tables, query: str, message: str) -> None:
    small = {"bank": bank_table(3, 40), "shop": shop_table(4, 40)}
    with pytest.raises(ValueError, match="^sql: ") as err:
        in_process({"query": query, "rule": {**RULE, "aggregate_arithmetic": True}}, small)
    assert message in str(err.value), str(err.value)


def test_an_overflow_in_aggregate_arithmetic_fails_the_run_and_withholds_the_value(kit) -> None:
    """One row's product overflows BIGINT: the run fails (the one bit the rule documents), DuckDB's
    message, which could quote the value, is withheld."""
    big = 2**62
    bank = b"id,region,balance\n" + b"".join(f"{i},r,{big if i == 3 else 1}\n".encode() for i in range(12))
    shop = b"customer,segment,spend\n" + b"".join(f"{i},x,7\n".encode() for i in range(12))
    query = f"SELECT sum(balance * spend) {J}"
    rule = {**RULE, "aggregate_arithmetic": True, "min_group_size": 2}
    result, _body, outs = run(kit, {"bank": bank, "shop": shop}, {"query": query, "rule": rule})
    assert result["ok"] is False
    error = kit.read(outs["_error"], LAB).decode()
    assert "the query failed while running" in error and "message is withheld" in error
    assert str(big) not in error and str(big * 7) not in error


def test_approval_text_shows_the_query_and_the_rule(kit, tables) -> None:
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    text = describe_manifest(manifest(kit, datasets, {"query": QUERY, "rule": RULE}))
    assert "What leaves (sql, enforced in the enclave):" in text
    assert f"    | {QUERY}" in text
    assert "table bank: may use columns region, balance; may be joined on id" in text
    assert "each distinct customer is one person for the threshold" in text
    assert "aggregate functions allowed: count, sum, avg, min, max" in text
    assert "min_group_size k = 10" in text
    assert "raw columns: not allowed" in text and "every table must be joined" in text
    assert "min and max release one row's exact value per group" in text
    assert "how many rows were released (not how many suppressed)" in text
    assert "arithmetic inside aggregates" not in text
    arith = describe_manifest(
        manifest(kit, datasets, {"query": ARITH_QUERY, "rule": {**RULE, "aggregate_arithmetic": True}})
    )
    assert "+ - * of columns and numbers up to 1000" in arith
    assert "arithmetic inside aggregates: ALLOWED; an overflow on one row fails the whole run" in arith


def test_sdk_helper_checks_the_rule_shape() -> None:
    class Stub:
        fingerprint = "x"

        def create_task(self, **kw: Any) -> str:
            raise AssertionError("must not be reached")

    stub: Any = Stub()
    refs = {"bank": "b", "shop": "s"}
    with pytest.raises(ConfideError, match="min_group_size must be an integer of at least 2"):
        analytics.sql(stub, inputs=refs, query=QUERY, rule={**RULE, "min_group_size": 1})
    with pytest.raises(ConfideError, match="rule.tables must name exactly the inputs"):
        analytics.sql(stub, inputs={"bank": "b"}, query=QUERY, rule=RULE)
    with pytest.raises(ConfideError, match="query must be the SQL text"):
        analytics.sql(stub, inputs=refs, query="", rule=RULE)


# ---- end to end: a real server, the SDK helper and the CLI ----------------------------------------


def test_sql_end_to_end_on_a_server(server, tmp_path, tables) -> None:
    clients = []
    try:
        clients = sdk_clients(server, tmp_path, ("bank", "shop", "lab"))
        bank, shop, lab = clients
        refs = upload_tables({"bank": bank, "shop": shop}, tables, tmp_path)
        task = lab.sql(inputs=refs, query=QUERY, rule=RULE)
        for c in clients:
            c.approve(task)
        lab.run(task)
        assert lab.wait(task, timeout=120)["state"] == "succeeded"
        got = lab.results(task, tmp_path / "out").outputs
        counts = "count(DISTINCT b.id) AS k_bank, count(DISTINCT s.customer) AS k_shop, count(*) AS k_rows"
        expect = plain_duckdb(tables, QUERY, counts, 10, tmp_path)
        pd.testing.assert_frame_equal(pd.read_csv(got["result"]), expect, check_dtype=False)
        assert bank.results(task, tmp_path / "bank-out").outputs == {}
    finally:
        for c in clients:
            c.close()


def test_sql_through_the_cli(server, tmp_path) -> None:
    """`confide task create --function sql --param query=@q.sql --param rule=@rule.json`; `task show`
    prints the query and the rule; an unreadable @file is a clear error."""
    cli = CliParties(server, tmp_path, ("qbank", "qshop", "qlab"))
    lab_fp = cli.fps["qlab"]
    tables = {"qbank": bank_table(7, 300), "qshop": shop_table(8, 300)}
    refs = {n: cli.upload(n, n, t) for n, t in tables.items()}
    (tmp_path / "rule.json").write_text(json.dumps({**RULE, "min_group_size": 5}))
    (tmp_path / "q.sql").write_text(QUERY + "\n")
    create = ["task", "create", "--function", "sql", "--input", f"bank={refs['qbank']}"]
    create += [
        "--input",
        f"shop={refs['qshop']}",
        "--output",
        f"result={lab_fp}",
        "--output",
        f"report={lab_fp}",
    ]
    create += ["--param", f"query=@{tmp_path / 'q.sql'}", "--param", f"rule=@{tmp_path / 'rule.json'}"]
    r = cli("qlab", *create)
    assert r.exit_code == 0, r.output
    task = r.stdout.strip().splitlines()[-1]
    r = cli("qshop", "task", "show", task)
    assert r.exit_code == 0, r.output
    assert f"    | {QUERY}" in r.stdout and "min_group_size k = 5" in r.stdout
    for n in ("qbank", "qshop", "qlab"):
        r = cli(n, "task", "approve", task, "--yes")
        assert r.exit_code == 0, r.output
    r = cli("qlab", "task", "run", task)
    assert r.exit_code == 0 and "succeeded" in r.stdout, r.output
    r = cli("qlab", "task", "results", task, "--out", str(tmp_path / "lab"))
    assert r.exit_code == 0, r.output
    counts = "count(DISTINCT b.id) AS k_bank, count(DISTINCT s.customer) AS k_shop, count(*) AS k_rows"
    expect = plain_duckdb({"bank": tables["qbank"], "shop": tables["qshop"]}, QUERY, counts, 5, tmp_path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "lab" / "result"), expect, check_dtype=False)
    r = cli("qlab", *create[:-2], "--param", "rule=@/nonexistent/rule.json")
    assert r.exit_code != 0 and "cannot read rule's value from '/nonexistent/rule.json'" in r.output


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ([], "the analysis rule: an object"),
        ({"tables": {}, "bogus": 1}, "unknown field(s) bogus"),
        ({"tables": {"bank": {}}}, "tables must name exactly the task's inputs"),
        ({"tables": {"bank": {"columns": [], "extra": 1}, "shop": {}}}, "must be an object with columns"),
        ({"tables": {"bank": {"id_column": 7}, "shop": {}}}, "id_column must be a column name"),
        ({"tables": {"bank": {"columns": "id"}, "shop": {}}}, "columns must be a list of column names"),
        (
            {"tables": {"bank": {}, "shop": {}}, "aggregates": ["median"]},
            "aggregates must be a non-empty list",
        ),
        (
            {"tables": {"bank": {}, "shop": {}}, "aggregates": ["count"]},
            "min_group_size (k, at least 2) is required",
        ),
        (
            {"tables": {"bank": {}, "shop": {}}, "aggregates": ["count"], "min_group_size": 1},
            "min_group_size must be",
        ),
        (
            {
                "tables": {"bank": {}, "shop": {}},
                "aggregates": ["count"],
                "min_group_size": 2,
                "join_required": "y",
            },
            "join_required must be true or false",
        ),
    ],
)
def test_malformed_rules_are_refused_in_process(rule: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^sql: ") as err:
        in_process(
            {"query": "SELECT count(*) FROM bank", "rule": rule}, {"bank": b"id\n1\n", "shop": b"id\n1\n"}
        )
    assert message in str(err.value)
