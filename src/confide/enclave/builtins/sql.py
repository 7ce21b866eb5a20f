"""Built-in sql v1: one SELECT in DuckDB over the inputs, under an analysis rule every owner approves.

Inputs: one or more UTF-8 CSV files with a header, each loaded as a DuckDB table named after its
input (parsed by Arrow's CSV reader on one thread, which infers integers, doubles, dates, timestamps
and text, as DuckDB's own read_csv would; only an empty unquoted cell is NULL), or Parquet files, plain
or Confide PME datasets (decrypted here, in the sandbox child, with the master keys their owner
sealed with them: enclave/parquet_keys), loaded with their Parquet types. Params: ``query`` (required: the SQL
text, at most 16384 characters), ``rule`` (required, see below), ``memory_limit_mib`` (1024: DuckDB's
memory_limit; the sandbox's address-space limit stays the hard wall), ``max_result_rows`` (10^6).

The rule (an object): ``tables`` (required: input name -> {"columns": [...], "join_columns": [...],
"id_column": name}; exactly the task's inputs), ``aggregates`` (required: some of count, sum, avg,
min, max), ``min_group_size`` (required: k >= 2), ``join_required`` (true: the query must read every
table of the rule), ``allow_raw_columns`` (false), ``aggregate_arithmetic`` (false: with it, an
aggregate may take + - * of allowed columns and numeric literals of magnitude at most 1000, as TPC-H's
``sum(l_extendedprice * (1 - l_discount))``; never division, a function, a cast or a condition). The query is checked on DuckDB's own parse tree
(``json_serialize_sql``), never on its text, before any data is loaded, and refused naming the
clause unless it is one SELECT of this shape:

  SELECT <outputs> FROM t [AS x] [JOIN u ON x.c = u.d [AND ...] | JOIN u USING (c)]...
  [WHERE <condition>] [GROUP BY <columns>] [HAVING <condition>] [ORDER BY <expressions>]
  [LIMIT n [OFFSET m]]

- every column named anywhere is one of its table's ``columns`` (a join condition: its
  ``join_columns``); every table is a table of the rule, read at most once;
- joins are INNER joins on equalities of join columns of the two sides (no CROSS, NATURAL,
  POSITIONAL, ASOF, LEFT/RIGHT/FULL, comma joins);
- an aggregate is one of the rule's ``aggregates`` over one plain column (or count(*); with
  ``aggregate_arithmetic``, + - * of columns and small literals), with DISTINCT allowed, no FILTER
  and no ORDER BY inside: a condition inside an aggregate would single out rows of a group that
  passes the threshold (so no division, whose NULL on a zero divisor would drop chosen rows, and no
  CASE); GROUP BY names plain columns, one grouping set. What aggregate arithmetic still lets a
  query learn: an overflow on one row (BIGINT or DECIMAL products) fails the whole run, one bit
  that every party sees, and a NULL in any column of the expression drops that row from the
  aggregate, as sum(column) skips a NULL cell; each such query needs every owner's approval of its
  exact text;
- unless ``allow_raw_columns``, every column outside an aggregate in SELECT, HAVING and ORDER BY is
  a GROUP BY column (AWS Clean Rooms' aggregation rule); with it, a query without aggregates may
  output columns (the list rule), and its ORDER BY names only output columns;
- refused: subqueries and CTEs (an inner query could pick single rows and pass them out through an
  outer aggregate), UNION/INTERSECT/EXCEPT, VALUES, table functions, DESCRIBE/SHOW, SELECT *,
  window functions, QUALIFY, SAMPLE, GROUPING SETS/ROLLUP/CUBE, GROUP BY ALL, DISTINCT, CAST of a
  column (TRY_CAST, or a typed literal such as DATE '1994-01-01'), arithmetic on row values (only on aggregates), functions outside a short list, and any
  statement that is not a SELECT (PRAGMA, ATTACH, COPY, INSTALL, LOAD, SET, CALL, ...). The last
  three close error oracles: a failure that depends on one row's value would tell everyone a bit.

The threshold is enforced on the result: the checked tree gets hidden columns (count(DISTINCT
id_column) per table that has one, and count(*)) on every output row's group (for a query without
aggregates: the same counts OVER (PARTITION BY every output column)), is turned back into SQL by
DuckDB (``json_deserialize_sql``) and run; a row whose smallest count is below k is left out.
Outputs: ``result`` (CSV: the query's columns, released rows only) and ``report`` (JSON: k and how
many rows were released; the number suppressed is NOT reported: with a WHERE that isolates one
person it would tell whether that person is in the data). A run-time error's DuckDB message is
withheld (it may quote data); parse and bind errors, which depend only on the query and the column
types, are passed on. DuckDB runs as builtins/duck.py configures it: one thread, no async I/O
threads, no external access (no files, no network), no extension loading, no temp directory, no
Python replacement scans and a locked configuration. Runs in the sandbox child, which imports duckdb (not pre-imported in the zygote).

``dp`` (optional: differential privacy, enclave/dp_params.py; delta is always required here): the
query may then output only GROUP BY columns, count(*) and sum(column) of a column that ``bounds``
names as table.column (exactly the summed ones), with no HAVING, ORDER BY or LIMIT (each would act on
exact aggregates); every table it reads needs an id_column and may be joined on it alone. Each table
keeps at most ``max_contributions`` (m) rows per id and every bounded column is clamped to its
[lo, hi] as DECIMAL(38, 9) before the query runs (a cell that is not a number, or beyond that type,
counts as missing), so one person adds at most m^T joined rows over T tables; the counts and sums
then leave with OpenDP's noise (builtins/dp_noise.py), rows sorted by their groups, a group released
on its noisy count; the report gives the privacy loss.
"""

import codecs
import copy
import csv
import io
import json
from typing import Any, NoReturn

NAME = "sql"
MAX_QUERY_CHARS = 16384
HIDDEN = "__confide_"
RULE_AGGREGATES = {
    "count": ("count", "count_star"),
    "sum": ("sum",),
    "avg": ("avg", "mean"),
    "min": ("min",),
    "max": ("max",),
}
# scalar functions allowed outside aggregates: none fails on a value of the right type (date_trunc,
# strptime and the like would fail on one row's text, and a failed run tells everyone one bit)
SCALARS = frozenset(
    ("lower", "upper", "trim", "length", "abs", "round", "floor", "ceil", "coalesce", "year", "month", "day")
)
LIKE = frozenset({"~~", "!~~", "~~*", "!~~*"})  # LIKE, NOT LIKE, ILIKE, NOT ILIKE
ARITHMETIC = frozenset({"+", "-", "*", "/"})
AGGREGATE_ARITHMETIC = frozenset({"+", "-", "*"})  # inside an aggregate, with rule.aggregate_arithmetic
MAX_AGGREGATE_LITERAL = 1000  # a larger factor would turn one row's value into an overflow sooner
OPERATORS = frozenset(
    {"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN", "COMPARE_NOT_IN"}
)
SELECT_FIELDS = frozenset(
    {
        "type",
        "modifiers",
        "cte_map",
        "select_list",
        "from_table",
        "where_clause",
        "group_expressions",
        "group_sets",
        "aggregate_handling",
        "having",
        "sample",
        "qualify",
    }
)
BASE_FIELDS = frozenset(
    {
        "type",
        "alias",
        "sample",
        "query_location",
        "query_location_length",
        "schema_name",
        "table_name",
        "column_name_alias",
        "catalog_name",
        "at_clause",
        "qualified_name",
    }
)
JOIN_FIELDS = frozenset(
    {
        "type",
        "alias",
        "sample",
        "query_location",
        "query_location_length",
        "left",
        "right",
        "condition",
        "join_type",
        "ref_type",
        "using_columns",
        "delim_flipped",
        "duplicate_eliminated_columns",
        "is_implicit",
        "ranking_expression",
        "nearest_count",
        "nearest_order_type",
        "nearest_approx",
    }
)
REFS = {
    "SUBQUERY": "a subquery in FROM",
    "TABLE_FUNCTION": "a table function",
    "EXPRESSION_LIST": "VALUES (a literal table)",
    "SHOW_REF": "DESCRIBE/SHOW/SUMMARIZE",
    "EMPTY": "a SELECT without FROM",
}
DEFAULT_MEMORY_MIB = 1024
HEADER_BYTES = 1 << 16


def _fail(message: str) -> NoReturn:
    raise ValueError(f"{NAME}: {message}")


def _refuse(clause: str, message: str) -> NoReturn:
    _fail(f"query refused by the analysis rule ({clause}): {message}")


def _int(given: dict[str, Any], key: str, default: Any, low: int, high: int) -> int:
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(f"{key} must be an integer in {low}..{high}, got {str(value)[:40]!r}")
    return int(value)


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in value):
        _fail(f"rule: {what} must be a list of column names, got {str(value)[:80]}")
    return [v.lower() for v in value]


def _rule(given: Any, inputs: list[str]) -> dict[str, Any]:
    if not isinstance(given, dict):
        _fail(f"parameter 'rule' (the analysis rule: an object) is required, got {str(given)[:80]}")
    unknown = sorted(
        set(given)
        - {
            "tables",
            "aggregates",
            "min_group_size",
            "join_required",
            "allow_raw_columns",
            "aggregate_arithmetic",
        }
    )
    if unknown:
        _fail(f"rule: unknown field(s) {', '.join(unknown)}")
    tables = given.get("tables")
    if not isinstance(tables, dict) or sorted(tables) != inputs:
        _fail(
            f"rule: tables must name exactly the task's inputs {inputs}, got {sorted(tables) if isinstance(tables, dict) else tables!r}"
        )
    spec: dict[str, Any] = {}
    for name, t in tables.items():
        if not isinstance(t, dict) or set(t) - {"columns", "join_columns", "id_column"}:
            _fail(
                f"rule: tables.{name} must be an object with columns, join_columns and (optional) id_column"
            )
        ident = t.get("id_column")
        if ident is not None and not (isinstance(ident, str) and ident):
            _fail(f"rule: tables.{name}.id_column must be a column name, got {str(ident)[:40]!r}")
        spec[name.lower()] = {  # SQL names ignore case
            "columns": set(_names(t.get("columns", []), f"tables.{name}.columns")),
            "join": set(_names(t.get("join_columns", []), f"tables.{name}.join_columns")),
            "id": ident.lower() if ident else None,
        }
    aggs = given.get("aggregates")
    if not isinstance(aggs, list) or not aggs or not all(a in RULE_AGGREGATES for a in aggs):
        _fail(
            f"rule: aggregates must be a non-empty list of {', '.join(RULE_AGGREGATES)}, got {str(aggs)[:80]}"
        )
    if "min_group_size" not in given:
        _fail("rule: min_group_size (k, at least 2) is required")
    k = given["min_group_size"]
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 10**9:
        _fail(
            f"rule: min_group_size must be an integer in 2..10^9 (a group of one would be released), got {str(k)[:40]!r}"
        )
    flags = {}
    for key, default in (
        ("join_required", True),
        ("allow_raw_columns", False),
        ("aggregate_arithmetic", False),
    ):
        flags[key] = given.get(key, default)
        if not isinstance(flags[key], bool):
            _fail(f"rule: {key} must be true or false, got {str(flags[key])[:40]!r}")
    allowed = {fn for a in aggs for fn in RULE_AGGREGATES[a]}
    return {"tables": spec, "aggregates": allowed, "aggregate_names": sorted(set(aggs)), "k": k, **flags}


def _params(given: dict[str, Any], inputs: list[str]) -> dict[str, Any]:
    unknown = sorted(set(given) - {"query", "rule", "memory_limit_mib", "max_result_rows", "dp"})
    if unknown:
        _fail(f"unknown parameter(s) {', '.join(unknown)}")
    query = given.get("query")
    if not isinstance(query, str) or not query.strip():
        _fail(f"parameter 'query' (the SQL text) is required, got {str(query)[:80]!r}")
    if len(query) > MAX_QUERY_CHARS:
        _fail(f"query is {len(query)} characters, at most {MAX_QUERY_CHARS}")
    return {
        "query": query,
        "rule": _rule(given.get("rule"), inputs),
        "memory_mib": _int(given, "memory_limit_mib", DEFAULT_MEMORY_MIB, 16, 1 << 16),
        "max_rows": _int(given, "max_result_rows", 1_000_000, 1, 10**9),
        "dp": _dp_params(given, inputs) if "dp" in given else None,
    }


def _dp_params(given: dict[str, Any], inputs: list[str]) -> Any:
    from confide.enclave.dp_params import parse_dp  # the check the enclave made before charging

    return parse_dp(given, inputs, NAME)


def _dp_plan(checker: "_Checker", shape: dict[str, Any], node: dict[str, Any], dp: Any) -> list[Any]:
    """What each output column is under dp: ("group", None), ("count", None) or ("sum", (table,
    column)); refuses, naming the clause, a query whose release dp cannot bound."""
    if not shape["aggregated"]:
        _refuse("SELECT", "with dp the query must aggregate (count(*), sum)")
    if node.get("having") is not None:
        _refuse("HAVING", "with dp a filter on exact aggregates would tell what the noise hides")
    if node.get("modifiers"):
        _refuse(
            "ORDER BY/LIMIT",
            "with dp the rows leave sorted by their groups (ordering exact aggregates leaks)",
        )
    for t in shape["tables"]:
        spec = checker.rule["tables"][t]
        if not spec["id"]:
            _refuse("FROM", f"with dp table {t!r} needs an id_column (what one person adds is bounded by it)")
        if spec["join"] - {spec["id"]}:
            _refuse("JOIN", f"with dp table {t!r} may be joined on its id_column {spec['id']!r} only")
    groups = {checker.column(g["column_names"], "GROUP BY") for g in node.get("group_expressions") or []}
    plan: list[Any] = []
    for item in node["select_list"]:
        cls, name = item.get("class"), str(item.get("function_name", "")).lower()
        args = [a.get("expression") or {} for a in item.get("arguments") or [] if isinstance(a, dict)]
        if cls == "COLUMN_REF" and checker.column(item["column_names"], "SELECT") in groups:
            plan.append(("group", None))
        elif cls == "FUNCTION" and name == "count_star" and not item.get("distinct"):
            plan.append(("count", None))
        elif (
            cls == "FUNCTION"
            and name == "sum"
            and not item.get("distinct")
            and len(args) == 1
            and args[0].get("class") == "COLUMN_REF"
        ):
            plan.append(("sum", checker.column(args[0]["column_names"], "SELECT")))
        else:
            _refuse("SELECT", "with dp only GROUP BY columns, count(*) and sum(column) may be output")
    summed = sorted({f"{t}.{c}" for kind, tc in plan if kind == "sum" for t, c in [tc]})
    if sorted(dp.bounds) != summed:
        _fail(
            f"params.dp.bounds must give [lo, hi] for exactly the summed columns {summed}, got {sorted(dp.bounds)}"
        )
    return plan


def _dp_prepare(con: Any, name: str, rule: dict[str, Any], dp: Any) -> None:
    """Table `name` cut to max_contributions rows per id, its bounded columns clamped (DECIMAL)."""
    table = name.lower()
    ident = rule["tables"][table]["id"]
    clamp = [
        f'greatest(least(TRY_CAST("{c}" AS DECIMAL(38, 9)), {hi!r}::DECIMAL(38, 9)), {lo!r}::DECIMAL(38, 9)) AS "{c}"'
        for ref, (lo, hi) in sorted(dp.bounds.items())
        for t, c in [ref.split(".", 1)]
        if t == table
    ]
    replace = f" REPLACE ({', '.join(clamp)})" if clamp else ""
    con.execute(
        f'CREATE OR REPLACE TABLE "{name}" AS SELECT *{replace} FROM "{name}" '
        f'QUALIFY row_number() OVER (PARTITION BY "{ident}") <= {int(dp.max_contributions)}'
    ).fetchall()


def _dp_release(
    rows: list[Any], plan: list[Any], rule: dict[str, Any], dp: Any, tables: int
) -> tuple[list[list[Any]], dict[str, Any]]:
    """The released rows (groups' values, noisy counts and sums) and the report's dp part; `rows`:
    the query's rows with the hidden counts, count(*) last."""
    import decimal
    import math

    from confide.enclave.builtins import dp_noise

    grouped = any(kind == "group" for kind, _ in plan)
    per_person = dp.max_contributions**tables
    keyed = {
        json.dumps(
            [None if row[i] is None else str(row[i]) for i, (kind, _) in enumerate(plan) if kind == "group"]
        ): row
        for row in rows
    }
    sums = [i for i, (kind, _) in enumerate(plan) if kind == "sum"]
    total_rows = sum(int(row[-1]) for row in rows)
    bounds = [max(abs(v) for v in dp.bounds[f"{plan[i][1][0]}.{plan[i][1][1]}"]) + 1e-9 for i in sums]
    released, noisy, info = dp_noise.release(
        {label: int(row[-1]) for label, row in keyed.items()},
        [{label: float(row[i] or decimal.Decimal(0)) for label, row in keyed.items()} for i in sums],
        public=not grouped,
        k=rule["k"],
        epsilon=float(dp.epsilon),
        mechanism=dp.mechanism,
        delta=dp.delta,
        m=per_person,
        sum_bounds=bounds,
        sum_ulp=[math.ulp((total_rows + per_person) * b) for b in bounds],
    )
    out = []
    for label in sorted(released, key=lambda lab: [(v is None, v) for v in json.loads(lab)]):
        row, values = keyed[label], []
        for i, (kind, _) in enumerate(plan):
            if kind == "group":
                values.append(row[i])
            elif kind == "count":
                values.append(released[label])
            else:
                values.append(repr(noisy[sums.index(i)][label]))
        out.append(values)
    for measured, i in zip(info["measurements"][1:], sums, strict=True):
        measured["column"] = f"{plan[i][1][0]}.{plan[i][1][1]}"
    report = {
        "mechanism": dp.mechanism,
        "epsilon_spent": float(dp.epsilon),
        "delta": dp.delta,
        "max_contributions": dp.max_contributions,
        "rows_per_person": per_person,
        "bounds": {c: list(b) for c, b in dp.bounds.items()},
        "threshold": info["threshold"],
        "measurements": info["measurements"],
        "epsilon_measured": info["epsilon"],
        "delta_measured": info["delta"],
    }
    return out, report


class _Checker:
    """Walks one SELECT's parse tree against the rule; records what the threshold rewrite needs."""

    def __init__(self, rule: dict[str, Any], headers: dict[str, list[str]], aggregates: set[str]) -> None:
        self.rule = rule
        self.headers = {t: {c.lower() for c in cols} for t, cols in headers.items()}
        self.duckdb_aggregates = aggregates
        self.alias: dict[str, str] = {}  # alias (lower) -> table
        self.outputs: set[str] = set()  # SELECT aliases, which HAVING and ORDER BY may name

    # -- FROM ------------------------------------------------------------------------------------
    def tables(self, ref: dict[str, Any]) -> list[str]:
        kind = ref.get("type")
        if kind == "BASE_TABLE":
            self._known(ref, BASE_FIELDS, "FROM")
            if ref.get("schema_name") or ref.get("catalog_name"):
                _refuse("FROM", "a table with a schema or catalog")
            if ref.get("at_clause") or ref.get("sample") or ref.get("column_name_alias"):
                _refuse("FROM", f"AT, TABLESAMPLE or column aliases on table {ref.get('table_name')!r}")
            table = str(ref.get("table_name", "")).lower()
            if table not in self.rule["tables"]:
                _refuse(
                    "FROM", f"table {table!r} is not one of the rule's tables {sorted(self.rule['tables'])}"
                )
            if table in self.alias.values():
                _refuse("FROM", f"table {table!r} is read twice (a self-join)")
            alias = str(ref.get("alias") or table).lower()
            if alias in self.alias or (alias != table and alias in self.rule["tables"]):
                _refuse("FROM", f"alias {alias!r} names another table")
            self.alias[alias] = table
            return [table]
        if kind == "JOIN":
            self._known(ref, JOIN_FIELDS, "JOIN")
            if (
                ref.get("alias")
                or ref.get("sample")
                or ref.get("ranking_expression")
                or ref.get("duplicate_eliminated_columns")
            ):
                _refuse("JOIN", "an aliased, sampled or ASOF join")
            if ref.get("join_type") != "INNER" or ref.get("ref_type") != "REGULAR":
                _refuse(
                    "JOIN",
                    f"a {ref.get('ref_type')} {ref.get('join_type')} join: only INNER JOIN ... ON/USING is allowed",
                )
            return self.tables(ref["left"]) + self.tables(ref["right"])
        _refuse("FROM", REFS.get(str(kind), f"a {kind} in FROM"))

    def joins(self, ref: dict[str, Any]) -> None:
        if ref.get("type") != "JOIN":
            return
        self.joins(ref["left"])
        self.joins(ref["right"])
        left, right = set(self._subtree(ref["left"])), set(self._subtree(ref["right"]))
        linked = False
        for col in ref.get("using_columns") or []:
            c = str(col).lower()
            owners = [t for t in left if c in self.headers[t]]
            if len(owners) != 1 or c not in self.headers[right_table(ref)]:
                _refuse("JOIN USING", f"column {c!r} is not in exactly one left table and the right table")
            for t in (owners[0], right_table(ref)):
                if c not in self.rule["tables"][t]["join"]:
                    _refuse(
                        "JOIN USING",
                        f"column {t}.{c} is not a join column of {t} (allowed: {sorted(self.rule['tables'][t]['join'])})",
                    )
            linked = True
        cond = ref.get("condition")
        for eq in _conjuncts(cond) if cond else []:
            if eq.get("class") != "COMPARISON" or eq.get("type") != "COMPARE_EQUAL":
                _refuse("JOIN ON", "a join condition other than equalities of join columns joined by AND")
            sides = []
            for e in (eq["left"], eq["right"]):
                if e.get("class") != "COLUMN_REF":
                    _refuse("JOIN ON", "a join condition compares something other than two columns")
                sides.append(self.column(e["column_names"], "JOIN ON"))
            tabs = {sides[0][0], sides[1][0]}
            if not (tabs & left and tabs & right):
                _refuse(
                    "JOIN ON",
                    f"{sides[0][0]}.{sides[0][1]} = {sides[1][0]}.{sides[1][1]} does not join the two sides",
                )
            linked = True
        if not linked:
            _refuse("JOIN", "a join without a condition on the rule's join columns")

    def _subtree(self, ref: dict[str, Any]) -> list[str]:
        if ref.get("type") == "JOIN":
            return self._subtree(ref["left"]) + self._subtree(ref["right"])
        return [self.alias[str(ref.get("alias") or ref.get("table_name")).lower()]]

    # -- columns and expressions ------------------------------------------------------------------
    def column(self, names: list[Any], clause: str) -> tuple[str, str]:
        parts = [str(n).lower() for n in names]
        if len(parts) == 1:
            owners = [t for t in sorted(set(self.alias.values())) if parts[0] in self.headers[t]]
            if len(owners) != 1:
                what = (
                    "is in tables " + ", ".join(owners) + ": qualify it"
                    if owners
                    else "is in no table of the FROM clause"
                )
                _refuse(clause, f"column {parts[0]!r} {what}")
            table, col = owners[0], parts[0]
        elif len(parts) == 2:
            if parts[0] not in self.alias:
                _refuse(clause, f"{parts[0]!r} is not a table of the FROM clause")
            table, col = self.alias[parts[0]], parts[1]
            if col not in self.headers[table]:
                _refuse(clause, f"table {table!r} has no column {col!r}")
        else:
            _refuse(clause, f"column reference {'.'.join(parts)!r} (schema-qualified)")
        allowed = self.rule["tables"][table]["join" if clause.startswith("JOIN") else "columns"]
        if col not in allowed:
            kind = "join column" if clause.startswith("JOIN") else "column"
            _refuse(
                clause,
                f"{table}.{col} is not an allowed {kind} of {table} (allowed: {', '.join(sorted(allowed)) or 'none'})",
            )
        return table, col

    def expr(self, e: Any, clause: str, in_agg: bool = False) -> tuple[bool, set[tuple[str, str]]]:
        """(whether it has an aggregate, the columns it names outside any aggregate)."""
        if not isinstance(e, dict):
            _refuse(clause, "an expression DuckDB's parse tree does not describe")
        if str(e.get("alias", "")).lower().startswith(HIDDEN):
            _refuse(clause, f"names starting with {HIDDEN} are the enclave's")
        cls, kind = e.get("class"), e.get("type")
        if cls == "CONSTANT":
            return False, set()
        if cls == "COLUMN_REF":
            names = e.get("column_names") or []
            if len(names) == 1 and str(names[0]).lower() in self.outputs and clause in ("HAVING", "ORDER BY"):
                return False, set()
            return False, {self.column(names, clause)}
        if cls == "FUNCTION":
            return self._function(e, clause, in_agg)
        parts: list[Any]
        if cls == "COMPARISON":
            parts = [e.get("left"), e.get("right")]
        elif cls == "CONJUNCTION" or (cls == "OPERATOR" and kind in OPERATORS):
            parts = list(e.get("children") or [])
        elif cls == "BETWEEN":
            parts = [e.get("input"), e.get("lower"), e.get("upper")]
        elif cls == "CASE":
            parts = [x for c in e.get("case_checks") or [] for x in (c.get("when_expr"), c.get("then_expr"))]
            parts.append(e.get("else_expr"))
        elif cls == "CAST":
            child = e.get("child")
            if not e.get("try_cast") and not (isinstance(child, dict) and child.get("class") == "CONSTANT"):
                _refuse(
                    clause,
                    "CAST of a value that is not a literal (use TRY_CAST: a cast failing on one row fails the run)",
                )
            parts = [e.get("child")]
        else:
            what = {
                "SUBQUERY": "a subquery",
                "WINDOW": "a window function",
                "STAR": "* (name the columns)",
                "PARAMETER": "a prepared-statement parameter",
                "POSITIONAL_REFERENCE": "a #n column reference",
            }
            _refuse(clause, what.get(str(cls), f"a {cls} {kind} expression"))
        has_agg, raw = False, set[tuple[str, str]]()
        for part in parts:
            if part is None:
                continue
            a, r = self.expr(part, clause, in_agg)
            has_agg, raw = has_agg or a, raw | r
        return has_agg, raw

    def _function(self, e: dict[str, Any], clause: str, in_agg: bool) -> tuple[bool, set[tuple[str, str]]]:
        name = str(e.get("function_name", "")).lower()
        if e.get("schema") or e.get("catalog") or e.get("export_state"):
            _refuse(clause, f"function {name!r} with a schema, catalog or EXPORT_STATE")
        args = [a.get("expression") if isinstance(a, dict) else None for a in e.get("arguments") or []]
        if any(isinstance(a, dict) and a.get("name") for a in e.get("arguments") or []):
            _refuse(clause, f"named arguments to {name!r}")
        if name in self.duckdb_aggregates and not e.get("is_operator"):
            if name not in self.rule["aggregates"]:
                _refuse(
                    clause,
                    f"aggregate function {name!r} is not allowed by the rule (allowed: {', '.join(self.rule['aggregate_names'])})",
                )
            if in_agg or clause in ("WHERE", "GROUP BY"):
                _refuse(clause, f"aggregate {name!r} inside an aggregate or in {clause}")
            if e.get("filter") is not None or (e.get("order_bys") or {}).get("orders"):
                _refuse(
                    clause,
                    f"FILTER or ORDER BY inside {name}(...): a condition inside an aggregate singles out rows",
                )
            if name == "count_star":
                return True, set()
            if len(args) != 1 or not isinstance(args[0], dict):
                _refuse(clause, f"{name}(...) over something other than one plain column")
            if args[0].get("class") == "COLUMN_REF":
                self.column(args[0]["column_names"], clause)
            elif self.rule["aggregate_arithmetic"]:
                self._arithmetic(args[0], clause, name, 0)
            else:
                _refuse(
                    clause,
                    f"{name}(...) over something other than one plain column (the rule's "
                    "aggregate_arithmetic would allow + - * of columns and literals)",
                )
            return True, set()
        if e.get("filter") is not None or e.get("distinct"):
            _refuse(clause, f"FILTER or DISTINCT on the non-aggregate function {name!r}")
        if e.get("is_operator") and name in ARITHMETIC:
            has_agg, raw = self._args(args, clause, in_agg)
            if raw or in_agg:
                _refuse(
                    clause,
                    f"arithmetic ({name}) on row values: only aggregates may be computed on (an overflow on one row would fail the run)",
                )
            return has_agg, raw
        if name in SCALARS or (e.get("is_operator") and name in LIKE):
            return self._args(args, clause, in_agg)
        _refuse(
            clause,
            f"function {name!r} is not allowed (allowed: the rule's aggregates, {', '.join(sorted(SCALARS))}, LIKE, + - * / on aggregates)",
        )

    def _arithmetic(self, e: Any, clause: str, agg: str, depth: int) -> None:
        """An aggregate's argument under rule.aggregate_arithmetic: allowed columns, numeric literals of
        magnitude at most MAX_AGGREGATE_LITERAL, and + - * of those; anything else is refused."""
        import decimal

        if depth > 64 or not isinstance(e, dict):
            _refuse(clause, f"an expression inside {agg}(...) nested too deep")
        cls = e.get("class")
        if cls == "COLUMN_REF":
            self.column(e.get("column_names") or [], clause)
            return
        if cls == "CONSTANT":
            found = e.get("literal")
            literal: dict[str, Any] = found if isinstance(found, dict) else {}
            text = literal.get("text") if literal.get("kind") in ("INTEGER", "NUMERIC") else None
            try:
                value = decimal.Decimal(text) if isinstance(text, str) else None
            except decimal.InvalidOperation:
                value = None
            if value is None or not value.is_finite() or abs(value) > MAX_AGGREGATE_LITERAL:
                _refuse(
                    clause,
                    f"inside {agg}(...) a literal must be a number of magnitude at most {MAX_AGGREGATE_LITERAL}",
                )
            return
        name = str(e.get("function_name", "")).lower()
        args = [a.get("expression") if isinstance(a, dict) else None for a in e.get("arguments") or []]
        if (
            cls == "FUNCTION"
            and e.get("is_operator")
            and name in AGGREGATE_ARITHMETIC
            and (len(args) == 2 or (len(args) == 1 and name in "+-"))
            and e.get("filter") is None
            and not e.get("distinct")
            and not (e.get("order_bys") or {}).get("orders")
            and not e.get("schema")
            and not e.get("catalog")
        ):
            for a in args:
                self._arithmetic(a, clause, agg, depth + 1)
            return
        what = f"function {name!r}" if cls == "FUNCTION" else f"a {cls} expression"
        _refuse(
            clause,
            f"{what} inside {agg}(...): aggregate_arithmetic allows only + - * of columns and numeric "
            "literals (a division, a function or a condition could single out rows)",
        )

    def _args(self, args: list[Any], clause: str, in_agg: bool) -> tuple[bool, set[tuple[str, str]]]:
        has_agg, raw = False, set[tuple[str, str]]()
        for a in args:
            x, r = self.expr(a, clause, in_agg)
            has_agg, raw = has_agg or x, raw | r
        return has_agg, raw

    @staticmethod
    def _known(node: dict[str, Any], fields: frozenset[str], clause: str) -> None:
        extra = sorted(k for k, v in node.items() if k not in fields and v not in (None, [], {}, "", False))
        if extra:
            _refuse(clause, f"SQL this rule does not know ({', '.join(extra)})")

    # -- the statement -----------------------------------------------------------------------------
    def select(self, node: dict[str, Any]) -> dict[str, Any]:
        kind = node.get("type")
        if kind == "SET_OPERATION_NODE":
            _refuse(
                str(node.get("setop_type", "UNION")),
                "a set operation (UNION, INTERSECT, EXCEPT) of several SELECTs",
            )
        if kind in ("CTE_NODE", "RECURSIVE_CTE_NODE") or (node.get("cte_map") or {}).get("map"):
            _refuse("WITH", "a common table expression (an inner query could pass single rows out)")
        if kind != "SELECT_NODE":
            _refuse("statement", f"a {kind} query")
        self._known(node, SELECT_FIELDS, "SELECT")
        if node.get("qualify") is not None:
            _refuse("QUALIFY", "window filters")
        if node.get("sample") is not None:
            _refuse("USING SAMPLE", "sampling")
        if node.get("aggregate_handling") != "STANDARD_HANDLING":
            _refuse("GROUP BY ALL", "name the GROUP BY columns")
        used = self.tables(node["from_table"])
        if self.rule["join_required"] and sorted(used) != sorted(self.rule["tables"]):
            missing = sorted(set(self.rule["tables"]) - set(used))
            _refuse(
                "FROM",
                f"the rule requires every table to be joined; the query does not read {', '.join(missing)}",
            )
        self.joins(node["from_table"])
        if node.get("where_clause") is not None:
            self.expr(node["where_clause"], "WHERE")
        groups = node.get("group_expressions") or []
        group_cols = set()
        for g in groups:
            if not isinstance(g, dict) or g.get("class") != "COLUMN_REF":
                _refuse("GROUP BY", "GROUP BY names something other than a plain column")
            group_cols.add(self.column(g["column_names"], "GROUP BY"))
        sets = node.get("group_sets") or []
        if groups and sets != [list(range(len(groups)))]:
            _refuse("GROUP BY", "GROUPING SETS, ROLLUP or CUBE")
        self.outputs = {str(i.get("alias", "")).lower() for i in node["select_list"] if i.get("alias")}
        items = [self.expr(i, "SELECT") for i in node["select_list"]]
        having = self.expr(node["having"], "HAVING") if node.get("having") is not None else (False, set())
        aggregated = bool(groups) or any(a for a, _ in items) or having[0]
        outputs = set().union(*(r for _, r in items)) if items else set()
        raw_ok = self.rule["allow_raw_columns"] and not aggregated
        if aggregated:
            stray = sorted(outputs - group_cols) + sorted(having[1] - group_cols)
            if stray:
                _refuse(
                    "SELECT",
                    f"column {stray[0][0]}.{stray[0][1]} is output raw: every output must be an aggregate or a GROUP BY column",
                )
        elif not raw_ok and outputs:
            c = sorted(outputs)[0]
            _refuse(
                "SELECT",
                f"column {c[0]}.{c[1]} is output raw: the rule allows only aggregates and GROUP BY columns",
            )
        for mod in node.get("modifiers") or []:
            if mod.get("type") == "ORDER_MODIFIER":
                for o in mod.get("orders") or []:
                    _, raw = self.expr(o.get("expression"), "ORDER BY")
                    bound = group_cols if aggregated else outputs
                    if raw - bound:
                        c = sorted(raw - bound)[0]
                        _refuse(
                            "ORDER BY",
                            f"ordering by {c[0]}.{c[1]}, which is not an output or GROUP BY column",
                        )
            elif mod.get("type") == "LIMIT_MODIFIER":
                for key in ("limit", "offset"):
                    v = mod.get(key)
                    if v is not None and v.get("class") != "CONSTANT":
                        _refuse("LIMIT", "LIMIT and OFFSET must be numbers")
            else:
                _refuse(str(mod.get("type", "?")).replace("_MODIFIER", ""), "DISTINCT and other modifiers")
        return {"aggregated": aggregated, "tables": used}


def right_table(ref: dict[str, Any]) -> str:
    right = ref["right"]
    if right.get("type") != "BASE_TABLE":
        _refuse("JOIN USING", "USING with a parenthesised join on the right")
    return str(right.get("table_name")).lower()


def _conjuncts(e: dict[str, Any]) -> list[dict[str, Any]]:
    if e.get("class") == "CONJUNCTION" and e.get("type") == "CONJUNCTION_AND":
        return [c for child in e.get("children") or [] for c in _conjuncts(child)]
    return [e]


def _tree(con: Any, sql: str) -> dict[str, Any]:
    out = json.loads(con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()[0][0])
    if out.get("error"):
        _fail(f"query is not valid SQL: {str(out.get('error_message'))[:300]}")
    return out


def _hidden(con: Any, checker: _Checker, shape: dict[str, Any], node: dict[str, Any]) -> int:
    """Append the threshold's counts to the select list; returns how many were appended."""
    alias_of = {t: a for a, t in checker.alias.items()}
    ids = [
        (alias_of[t], checker.rule["tables"][t]["id"])
        for t in shape["tables"]
        if checker.rule["tables"][t]["id"]
    ]
    for t in shape["tables"]:
        ident = checker.rule["tables"][t]["id"]
        if ident and ident not in checker.headers[t]:
            _fail(f"rule: id_column {ident!r} is not a column of input {t!r}")
    window = "" if shape["aggregated"] else " OVER (PARTITION BY 1)"
    template = ", ".join([f"count(DISTINCT x.y){window}"] * len(ids) + [f"count(*){window}"])
    items = _tree(con, f"SELECT {template} FROM x")["statements"][0]["node"]["select_list"]
    parts = [copy.deepcopy({**i, "alias": ""}) for i in node["select_list"]]
    for n, item in enumerate(items):
        item["alias"] = f"{HIDDEN}{n}"
        if n < len(ids):
            item["arguments"][0]["expression"]["column_names"] = list(ids[n])
        if not shape["aggregated"]:
            item["partitions"] = copy.deepcopy(parts)
        node["select_list"].append(item)
    return len(items)


def _header(name: str, raw: bytes) -> list[str]:
    """The CSV header's column names, from the file's first 64 KiB (the rest is Arrow's to check:
    its reader refuses text that is not UTF-8); names may not repeat, ignoring case."""
    try:
        head = codecs.getincrementaldecoder("utf-8")().decode(
            raw[:HEADER_BYTES], final=len(raw) <= HEADER_BYTES
        )
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        _fail(f"input {name!r} is not UTF-8 text (byte {exc.start}, line {line})")
    try:
        header = next(csv.reader(io.StringIO(head.removeprefix("\ufeff"), newline="")), None)
    except csv.Error as exc:
        _fail(f"input {name!r} is not a readable CSV file ({exc})")
    if not header or (len(raw) > HEADER_BYTES and "\n" not in head):
        _fail(f"input {name!r} has no header line (in its first {HEADER_BYTES} bytes)")
    if len({c.lower() for c in header}) != len(header):
        _fail(f"input {name!r} has a column name twice (SQL names ignore case)")
    return header


def _parquet(name: str, raw: bytes) -> Any:
    """The Arrow table of a Parquet input (plain, or a Confide PME dataset decrypted here with the
    master keys sealed in it); None for a CSV input."""
    from confide.enclave import parquet_keys  # pre-imported by the zygote

    if not parquet_keys.is_parquet(raw):
        return None
    table = parquet_keys.read_dataset(raw, name=name)
    if len({c.lower() for c in table.schema.names}) != len(table.schema.names):
        _fail(f"input {name!r} has a column name twice (SQL names ignore case)")
    return table


def _load(con: Any, name: str, raw: bytes, table: Any = None, *, copy: bool = False) -> Any:
    """The input as DuckDB relation `name`: a Parquet input's Arrow table as it is; a CSV through
    Arrow's CSV reader (one thread), which infers the types (integers, doubles, dates, timestamps,
    text); only an empty unquoted cell is NULL. The Arrow table is registered under `name` and
    scanned in place (a copy into a DuckDB table took a third of the time); with `copy` (the DP
    path, which replaces it by a cut and clamped table) it is copied into table `name`. Returns the
    Arrow table, which must outlive the queries."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if table is None:
        try:
            table = pcsv.read_csv(
                pa.BufferReader(raw.removeprefix(b"\xef\xbb\xbf")),
                read_options=pcsv.ReadOptions(use_threads=False),
                convert_options=pcsv.ConvertOptions(
                    null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowException) as exc:
            _fail(f"input {name!r} is not a readable CSV file ({str(exc)[:200]})")
    for field in table.schema:  # Arrow reads a column that is not UTF-8 as bytes
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            _fail(f"input {name!r}, column {field.name!r}: not UTF-8 text")
    if not copy:
        con.register(name, table)
        return table
    con.register("__confide_load", table)
    con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM __confide_load').fetchall()
    con.unregister("__confide_load")
    return None


def run(ctx: Any) -> None:
    import duckdb  # only inside the sandbox child, never in the enclave process

    from confide.enclave.builtins import duck  # pre-imported by the zygote

    inputs = sorted(ctx.inputs)
    if not inputs:
        _fail("needs at least one input")
    if len({n.lower() for n in inputs}) != len(inputs):
        _fail(f"input names {inputs} differ only in case: SQL table names ignore case")
    p = _params(dict(ctx.params), inputs)
    rule = p["rule"]
    con = duck.connect(duckdb, p["memory_mib"])
    try:
        statements = con.extract_statements(p["query"])
    except duckdb.Error as exc:
        _fail(f"query is not valid SQL: {str(exc)[:300]}")
    if len(statements) != 1:
        _refuse("statement", f"{len(statements)} statements: exactly one SELECT is allowed")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    kind = {"LOAD": "INSTALL/LOAD"}.get(kind, kind)  # DuckDB parses both as a LOAD statement
    if kind != "SELECT":
        _refuse(kind, "only a SELECT statement is allowed")
    tree = _tree(con, p["query"])
    if len(tree["statements"]) != 1:
        _refuse("statement", "exactly one SELECT is allowed")
    node = tree["statements"][0]["node"]
    raws = {name: ctx.inputs[name].read() for name in inputs}
    parquet = {name: _parquet(name, raws[name]) for name in inputs}
    headers = {
        name.lower(): _header(name, raws[name]) if parquet[name] is None else list(parquet[name].schema.names)
        for name in inputs
    }
    for name in inputs:
        table = rule["tables"][name.lower()]
        missing = sorted((table["columns"] | table["join"]) - {c.lower() for c in headers[name.lower()]})
        if missing:
            _fail(f"rule names column(s) {', '.join(missing)} of {name!r}, which its header does not have")
    aggregates = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'"
        ).fetchall()
    }
    checker = _Checker(rule, headers, aggregates)
    shape = checker.select(node)
    dp = p["dp"]
    plan = _dp_plan(checker, shape, node, dp) if dp is not None else None
    hidden = _hidden(con, checker, shape, node)
    sql = con.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchall()[0][0]
    loaded = []
    for name in inputs:
        loaded.append(_load(con, name, raws[name], parquet.pop(name), copy=dp is not None))
        raws[name] = b""
        if dp is not None and name.lower() in shape["tables"]:
            _dp_prepare(con, name, rule, dp)
    failure: str | None = None
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description][:-hidden]
        sink = io.StringIO()
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow(columns)
        released = 0
        if plan is not None:
            dp_rows, dp_report = _dp_release(cur.fetchall(), plan, rule, dp, len(shape["tables"]))
            if len(dp_rows) > p["max_rows"]:
                _fail(f"the result has more than max_result_rows = {p['max_rows']} rows")
            writer.writerows(["" if v is None else v for v in row] for row in dp_rows)
            released = len(dp_rows)
        while plan is None and (batch := cur.fetchmany(10_000)):
            for row in batch:
                if min(row[-hidden:]) < rule["k"]:
                    continue
                released += 1
                if released > p["max_rows"]:
                    _fail(f"the result has more than max_result_rows = {p['max_rows']} rows")
                writer.writerow(["" if v is None else v for v in row[:-hidden]])
    except (duckdb.BinderException, duckdb.ParserException, duckdb.CatalogException) as exc:
        failure = f"DuckDB refused the query: {str(exc)[:300]}"
    except duckdb.Error as exc:
        # failed outside the handler: raised inside it, the error's traceback would carry DuckDB's
        # message as the context ("During handling of the above exception ...")
        failure = f"the query failed while running ({type(exc).__name__}); DuckDB's message is withheld: it may quote input data"
    if failure is not None:
        _fail(failure)
    ctx.outputs["result"].write(sink.getvalue().encode("utf-8"))
    report = {"function": NAME, "version": "1", "min_group_size": rule["k"], "rows": released}
    if plan is not None:
        report["dp"] = dp_report
    ctx.outputs["report"].write(json.dumps(report, sort_keys=True).encode() + b"\n")
