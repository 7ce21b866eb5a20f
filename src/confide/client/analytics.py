"""Clean-room analytics for SDK users: tasks for the ``psi``, ``join-aggregate`` and ``sql``
built-ins, and the words an approver reads about what such a task releases to whom.

The helpers only build a task through ``Client.create_task``; the enclave enforces the rules
(membership bits only to their input's owner, k >= 2, suppression), whatever a creator writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError
from confide.enclave.manifest import Manifest

if TYPE_CHECKING:
    from confide.client.sdk import Client

PSI_OUTPUTS = ("size", "members", "intersection")
AGG_OPS = ("count", "sum", "avg", "min", "max")


def _owners(client: Client, inputs: Mapping[str, str]) -> dict[str, str]:
    """Input name -> owner fingerprint, from the datasets' references (as create_task reads them)."""
    return {n: client._dataset_pin(ref, f"input {n!r}").owner for n, ref in inputs.items()}


def psi(
    client: Client,
    *,
    inputs: Mapping[str, str],
    column: str | Mapping[str, str],
    outputs: Sequence[str] = ("size",),
    recipients: Sequence[str] | None = None,
    hash: bool = False,
    max_id_chars: int | None = None,
    **task: Any,
) -> str:
    """Create a ``psi`` task over `inputs` (input name -> dataset reference, two or more); returns
    the task id. `column`: the id column (one name, or input name -> name). `outputs`: any of
    ``size`` and ``intersection`` (sealed to `recipients`, default: this client) and ``members``
    (``members_<input>`` for every input, each sealed to that input's owner only). `hash`: ids leave
    as unsalted SHA-256 of their normalised form. ``size`` is padded to a 256-byte bucket and
    ``intersection`` to a power of two unless `pad` says otherwise, so the host does not learn how
    many ids are common from their sizes. Other keywords go to ``Client.create_task``."""
    wanted = list(outputs)
    bad = sorted(set(wanted) - set(PSI_OUTPUTS)) or (["(none)"] if not wanted else [])
    if bad:
        raise ConfideError(f"psi outputs must be some of {', '.join(PSI_OUTPUTS)}, got {bad}", where="psi")
    if len(inputs) < 2:
        raise ConfideError(f"psi needs two or more inputs, got {len(inputs)}", where="psi")
    to = list(recipients) if recipients is not None else [client.fingerprint]
    outs: dict[str, Sequence[str]] = {o: to for o in ("size", "intersection") if o in wanted}
    if "members" in wanted:
        outs.update({f"members_{n}": [owner] for n, owner in _owners(client, inputs).items()})
    params: dict[str, Any] = {"column": column if isinstance(column, str) else dict(column)}
    if hash:
        params["hash"] = True
    if max_id_chars is not None:
        params["max_id_chars"] = max_id_chars
    # by default the host sees buckets, not how many ids are common (size: one 256-byte bucket)
    pad = {o: p for o, p in (("size", 256), ("intersection", "pow2")) if o in outs}
    task["pad"] = {**pad, **dict(task.get("pad") or {})}
    return client.create_task(function="psi", inputs=inputs, outputs=outs, params=params, **task)


def join_aggregate(
    client: Client,
    *,
    inputs: Mapping[str, str],
    key: str | Mapping[str, str],
    k: int,
    group_by: Sequence[str] = (),
    aggregates: Sequence[Mapping[str, str]] = ({"op": "count"},),
    recipients: Sequence[str] | None = None,
    avg_places: int | None = None,
    **task: Any,
) -> str:
    """Create a ``join-aggregate`` task: inner join of `inputs` on `key`, `aggregates` ({op, column,
    as}) per `group_by` group, groups with fewer than `k` (>= 2) distinct keys suppressed. Outputs
    ``result`` and ``report`` go to `recipients` (default: this client). Returns the task id."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfideError(f"k must be an integer of at least 2, got {k!r}", where="join-aggregate")
    to = list(recipients) if recipients is not None else [client.fingerprint]
    params: dict[str, Any] = {
        "key": key if isinstance(key, str) else dict(key),
        "k": k,
        "group_by": list(group_by),
        "aggregates": [dict(a) for a in aggregates],
    }
    if avg_places is not None:
        params["avg_places"] = avg_places
    return client.create_task(
        function="join-aggregate",
        inputs=inputs,
        outputs={"result": to, "report": to},
        params=params,
        **task,
    )


def sql(
    client: Client,
    *,
    inputs: Mapping[str, str],
    query: str,
    rule: Mapping[str, Any],
    recipients: Sequence[str] | None = None,
    memory_limit_mib: int | None = None,
    max_result_rows: int | None = None,
    **task: Any,
) -> str:
    """Create a ``sql`` task: `query` (one SELECT; its text is in the manifest, so every owner
    approves exactly it) runs in DuckDB over `inputs` (input name -> dataset reference; each input is
    a table of that name) under the analysis `rule` ({tables: {input: {columns, join_columns,
    id_column}}, aggregates, min_group_size, join_required, allow_raw_columns, aggregate_arithmetic}), which the enclave
    checks on DuckDB's parse tree and enforces on the result. Outputs ``result`` and ``report`` go to
    `recipients` (default: this client). Returns the task id."""
    if not isinstance(query, str) or not query.strip():
        raise ConfideError("query must be the SQL text of one SELECT", where="sql")
    if not isinstance(rule, Mapping) or not isinstance(rule.get("tables"), Mapping):
        raise ConfideError("rule must be an object with tables (input name -> columns)", where="sql")
    if sorted(rule["tables"]) != sorted(inputs):
        raise ConfideError(
            f"rule.tables must name exactly the inputs {sorted(inputs)}, got {sorted(rule['tables'])}",
            where="sql",
        )
    k = rule.get("min_group_size")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfideError(f"rule.min_group_size must be an integer of at least 2, got {k!r}", where="sql")
    to = list(recipients) if recipients is not None else [client.fingerprint]
    params: dict[str, Any] = {"query": query, "rule": _plain(rule)}
    if memory_limit_mib is not None:
        params["memory_limit_mib"] = memory_limit_mib
    if max_result_rows is not None:
        params["max_result_rows"] = max_result_rows
    return client.create_task(
        function="sql", inputs=inputs, outputs={"result": to, "report": to}, params=params, **task
    )


def _plain(value: Any) -> Any:
    """JSON values of mappings and sequences (a rule may be built from tuples or read-only maps)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- what an approver reads -------------------------------------------------------------------


def _columns(spec: Any, inputs: Sequence[str]) -> str:
    if isinstance(spec, str):
        return f"column {spec!r} of every input"
    if isinstance(spec, dict):
        return ", ".join(f"{v!r} of {n}" for n, v in sorted(spec.items()))
    return f"{spec!r} (not a column name: the enclave will refuse the task)"


def describe(m: Manifest, clean: Callable[[str], str] = str) -> list[str]:
    """Lines for the approval text of a psi or join-aggregate task: what each output releases."""
    fn = m.function
    if fn.kind != "builtin" or fn.name not in ("psi", "join-aggregate", "sql", "describe"):
        return []
    p = m.params
    inputs = [i.name for i in m.inputs]
    to = {o.name: ", ".join(clean(m.name_of(r)) for r in o.recipients) for o in m.outputs}
    lines = [f"What leaves ({fn.name}, enforced in the enclave):"]
    if fn.name == "sql":
        dp = _describe_dp(p["dp"], inputs, clean, "row(s) of each table per id") if "dp" in p else []
        return lines + _describe_sql(p, to, clean) + dp
    if fn.name == "describe":
        return lines + _describe_stats(p, to, clean)
    if fn.name == "psi":
        hashed = p.get("hash") is True
        form = (
            "as unsalted SHA-256 hex of the normalised id (anyone can test a guessed id against it)"
            if hashed
            else "in their normalised form (stripped, NFC, case-folded)"
        )
        lines.append(f"  ids: {clean(_columns(p.get('column'), inputs))}; normalised in the enclave")
        if "size" in to:
            lines.append(
                f"  size -> {to['size']}: one number, how many distinct ids are in all of {', '.join(inputs)}"
            )
        for n in inputs:
            out = f"members_{n}"
            if out in to:
                lines.append(
                    f"  {out} -> {to[out]}: for each row of {n}, one bit: is its id in every other input"
                )
        if "intersection" in to:
            lines.append(f"  intersection -> {to['intersection']}: every id in all inputs, {form}")
        lines.append(
            "  nothing else leaves the enclave on success; the host sees each output's size unless "
            "padded (an unpadded intersection or size tells it about how many ids are common)"
        )
        return lines
    k = p.get("k")
    groups = p.get("group_by") or []
    aggs = p.get("aggregates") or [{"op": "count"}]
    shown = ", ".join(
        f"{a.get('op')}({a.get('column') or '*'})" if isinstance(a, dict) else repr(a) for a in aggs
    )
    lines.append(f"  join: inner join of {', '.join(inputs)} on {clean(_columns(p.get('key'), inputs))}")
    by = ", ".join(map(str, groups)) if isinstance(groups, list) and groups else "(one group: everything)"
    lines.append(
        f"  result -> {to.get('result', '-')}: per group of {clean(by)}: {clean(shown)}; only groups "
        f"with at least k = {clean(repr(k))} distinct keys (the enclave refuses k < 2)"
    )
    lines.append(
        f"  report -> {to.get('report', '-')}: k, how many groups were released and how many suppressed"
    )
    if any(isinstance(a, dict) and a.get("op") in ("min", "max") for a in aggs):
        lines.append("  min and max release one row's exact value per group (k does not hide it)")
    lines.append(
        "  k guards each result alone: recipients of several tasks over the same data can subtract them"
    )
    if "dp" in p:
        lines += _describe_dp(p["dp"], inputs, clean, "joined row(s) per key")
    return lines


def _describe_dp(dp: Any, inputs: list[str], clean: Callable[[str], str], unit: str) -> list[str]:
    """params.dp of join-aggregate or sql in words (shown as it is when malformed: the enclave
    refuses it); `unit`: what max_contributions counts."""
    if not isinstance(dp, dict):
        return [f"  dp: {clean(repr(dp))} (not an object: the enclave will refuse the task)"]
    budget: dict[str, Any] = dp["budget"] if isinstance(dp.get("budget"), dict) else {}
    lines = [
        f"  differential privacy ({clean(str(dp.get('mechanism', 'laplace')))} noise drawn by OpenDP in "
        f"the enclave): this task spends epsilon {clean(repr(dp.get('epsilon')))}"
        + (f", delta {clean(repr(dp['delta']))}" if "delta" in dp else "")
        + f"; at most {clean(repr(dp.get('max_contributions')))} {unit} are kept; sums "
        f"clamped to {clean(repr(dp.get('bounds', {})))}",
        "    the count and sums leave noisy; a group leaves only if its noisy count reaches the threshold "
        "(at least k); the report gives the privacy loss, not the suppressed count",
    ]
    for name in inputs:
        lines.append(
            f"    budget of input {clean(name)}: total epsilon {clean(repr(budget.get(name)))} for its "
            "dataset, counted by the enclave worker (a host that restores its sealed state can spend it again)"
        )
    return lines


def _describe_sql(p: Mapping[str, Any], to: Mapping[str, str], clean: Callable[[str], str]) -> list[str]:
    """The query as written and the rule in words; anything malformed is shown as it is (the enclave
    refuses it)."""
    query = p.get("query")
    rule: dict[str, Any] = p["rule"] if isinstance(p.get("rule"), dict) else {}
    lines = [
        "  the query as written (checked against the rule below before any data is read; it runs with"
        " hidden threshold counts added):"
    ]
    text = (
        clean(query)
        if isinstance(query, str)
        else f"{query!r} (not SQL text: the enclave will refuse the task)"
    )
    lines += [f"    | {line}" for line in text.splitlines() or [""]]
    lines.append("  the analysis rule:")
    tables: dict[str, Any] = rule["tables"] if isinstance(rule.get("tables"), dict) else {}
    for name, t in sorted(tables.items()):
        t = t if isinstance(t, dict) else {}
        cols = ", ".join(map(str, t.get("columns") or [])) or "(none)"
        joins = ", ".join(map(str, t.get("join_columns") or [])) or "(none: it cannot be joined)"
        ident = t.get("id_column")
        lines.append(
            f"    table {clean(str(name))}: may use columns {clean(cols)}; may be joined on {clean(joins)}"
        )
        lines.append(
            f"      each distinct {clean(str(ident))} is one person for the threshold"
            if ident
            else "      no id column: the threshold counts its rows"
        )
    aggs = ", ".join(map(str, rule.get("aggregates") or [])) or "(none)"
    arithmetic = rule.get("aggregate_arithmetic", False) is True
    over = (
        "one plain column, + - * of columns and numbers up to 1000, or count(*)"
        if arithmetic
        else "one plain column, or count(*)"
    )
    lines.append(f"    aggregate functions allowed: {clean(aggs)} (each over {over})")
    if arithmetic:
        lines.append(
            "    arithmetic inside aggregates: ALLOWED; an overflow on one row fails the whole run (seen by "
            "everyone), and a NULL in any column of the expression drops that row from the aggregate"
        )
    k = rule.get("min_group_size")
    lines.append(
        f"    min_group_size k = {clean(repr(k))}: an output row is released only if its group has at least "
        "k distinct ids of every joined table that names an id column, and at least k rows (k < 2 is refused)"
    )
    raw = rule.get("allow_raw_columns", False)
    lines.append(
        "    raw columns: ALLOWED in a query without aggregates (rows released when at least k ids share "
        "the same output values)"
        if raw is True
        else "    raw columns: not allowed (every output is an aggregate or a GROUP BY column)"
    )
    joined = rule.get("join_required", True)
    lines.append(
        "    every table must be joined in the query"
        if joined is not False
        else "    a table may be queried alone (join_required is false)"
    )
    lines.append(
        "    refused in the enclave: subqueries, WITH, UNION/INTERSECT/EXCEPT, VALUES, table functions, "
        "window functions, CAST of a column, arithmetic on row values, any statement but SELECT"
    )
    lines.append(f"  result -> {to.get('result', '-')}: the query's rows that pass the threshold")
    lines.append(
        f"  report -> {to.get('report', '-')}: k and how many rows were released (not how many suppressed)"
    )
    if any(a in ("min", "max") for a in rule.get("aggregates") or []):
        lines.append("  min and max release one row's exact value per group (k does not hide it)")
    lines.append(
        "  k guards each result alone: recipients of several tasks over the same data can subtract them; "
        "whether the run failed is seen by everyone"
    )
    return lines


__all__ = ["describe", "join_aggregate", "psi", "sql"]


def _describe_stats(p: Mapping[str, Any], to: Mapping[str, str], clean: Callable[[str], str]) -> list[str]:
    cols = p.get("columns")
    which = ", ".join(clean(str(c)) for c in cols) if isinstance(cols, list) else "every column"
    lines = [
        f"  report -> {to.get('report', '?')}: for {which} of the union of the inputs: how many values, "
        f"and only over at least k = {clean(str(p.get('k')))} values: mean and standard deviation "
        "(numbers), or how many distinct values and the values seen at least k times (text)",
        "  the number of distinct values includes rare ones: it tells that some exist, not which",
    ]
    if p.get("min_max") is True:
        lines.append("  min_max: each numeric column's minimum and maximum, one row's exact value each")
    return lines
