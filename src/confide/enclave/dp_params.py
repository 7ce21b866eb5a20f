"""The ``dp`` parameter of an analytics built-in (differential privacy, issue 10), checked in both
places that read it: the enclave process, which checks it and charges each input dataset's privacy
budget (privacy_budget.py) before any input is decrypted, and the built-in in the sandbox child,
which draws the noise (builtins/dp_noise.py). Standard library only.

``params.dp`` (every field in the manifest, so every owner approves it)::

    {"epsilon": 1.0,                    # > 0, at most 100: this task's total privacy loss
     "mechanism": "laplace",            # or "gaussian"
     "delta": 1e-7,                     # (0, 1e-3]; required for gaussian and for group_by
     "max_contributions": 1,            # joined rows kept per key (the privacy unit is one key)
     "bounds": {"balance": [0, 5000]},  # [lo, hi] per summed column: each value clamped to it
     "budget": {"bank": 3, "shop": 10}} # per input: the owner's total epsilon for that dataset

Under ``dp`` the aggregates may only be the row count and sums of bounded columns (for ``sql``:
count(*) and sum(column), bounds named table.column, checked against the query in the child,
builtins/sql.py; delta always required there, as this process does not parse SQL). The budget of
an input is stated in the manifest its owner signs (an approval is over the manifest's digest), so
the host cannot raise it; an owner who approves a later task with a larger total raises it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .errors import FormatError

DP_BUILTINS = ("join-aggregate", "sql")
MECHANISMS = ("laplace", "gaussian")
MAX_EPSILON = 100.0
MAX_DELTA = 1e-3
MAX_CONTRIBUTIONS = 10**6
MAX_BOUND = 1e15
FIELDS = ("epsilon", "mechanism", "delta", "max_contributions", "bounds", "budget")


@dataclass(frozen=True)
class DpParams:
    epsilon: Decimal  # the task's total: what each input's budget is charged
    mechanism: str
    delta: float  # 0.0 when not given (pure laplace without groups)
    max_contributions: int
    bounds: dict[str, tuple[float, float]]  # summed column reference -> [lo, hi]
    budget: dict[str, Decimal]  # input name -> the owner's total epsilon for that dataset


def _fail(field: str, message: str) -> FormatError:
    return FormatError(f"params.dp.{field} {message}", where="params.dp")


def _number(value: Any, field: str, *, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(field, f"must be a number, got {str(value)[:40]!r}")
    if (value <= low if low_open else value < low) or value > high:
        raise _fail(field, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _decimal(value: float) -> Decimal:
    return Decimal(repr(float(value)))  # the JSON number as written: 0.1 + 0.2 == 0.3 here


def parse_dp(
    params: Mapping[str, Any], inputs: Sequence[str], function: str = "join-aggregate"
) -> DpParams | None:
    """The task's ``dp`` (None when it has none); FormatError naming the field otherwise. For
    ``sql`` the query is not parsed here (the child checks its shape and that bounds name exactly
    its summed columns, as table.column), so delta is always required: it may group."""
    dp = params.get("dp")
    if dp is None:
        return None
    if not isinstance(dp, dict):
        raise FormatError(f"params.dp must be an object, got {type(dp).__name__}", where="params.dp")
    unknown = sorted(set(dp) - set(FIELDS))
    if unknown:
        raise FormatError(
            f"params.dp has unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})",
            where="params.dp",
        )
    for field in ("epsilon", "max_contributions", "budget"):
        if field not in dp:
            raise _fail(field, "is required")
    epsilon = _number(dp["epsilon"], "epsilon", low=0.0, high=MAX_EPSILON)
    mechanism = dp.get("mechanism", "laplace")
    if mechanism not in MECHANISMS:
        raise _fail("mechanism", f"must be one of {', '.join(MECHANISMS)}, got {str(mechanism)[:40]!r}")
    m = dp["max_contributions"]
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_CONTRIBUTIONS:
        raise _fail("max_contributions", f"must be an integer in 1..{MAX_CONTRIBUTIONS}, got {m!r}")
    sql = function == "sql"
    needs_delta = mechanism == "gaussian" or sql or bool(params.get("group_by", []))
    if "delta" in dp:
        delta = _number(dp["delta"], "delta", low=0.0, high=MAX_DELTA)
    elif needs_delta:
        why = (
            "the gaussian mechanism"
            if mechanism == "gaussian"
            else "sql (its GROUP BY may find groups in the data)"
            if sql
            else "group_by (groups are found in the data)"
        )
        raise _fail("delta", f"is required with {why}")
    else:
        delta = 0.0
    given = dp.get("bounds", {})
    if sql:  # table.column -> [lo, hi]; the child checks them against the query's sums
        summed = sorted(given) if isinstance(given, dict) else []
    else:
        summed = _summed_columns(params.get("aggregates", [{"op": "count"}]))
    bounds = _bounds(given, summed)
    budget = dp["budget"]
    if not isinstance(budget, dict) or sorted(budget) != sorted(inputs):
        got = sorted(budget) if isinstance(budget, dict) else budget
        raise _fail("budget", f"must give each input's total epsilon (inputs {sorted(inputs)}), got {got!r}")
    totals = {
        name: _decimal(_number(v, f"budget.{name}", low=0.0, high=1e6)) for name, v in sorted(budget.items())
    }
    return DpParams(_decimal(epsilon), mechanism, delta, int(m), bounds, totals)


def _summed_columns(aggregates: Any) -> list[str]:
    if not isinstance(aggregates, list):
        raise FormatError("aggregates must be a list", where="params.aggregates")
    summed = []
    for i, agg in enumerate(aggregates):
        op = agg.get("op") if isinstance(agg, dict) else None
        column = agg.get("column") if isinstance(agg, dict) else None
        if op == "count" and column is None:
            continue
        if op == "sum" and isinstance(column, str):
            summed.append(column)
            continue
        raise FormatError(
            f"aggregates[{i}] is not allowed with dp: only the row count ({{op: count}}) and sums of "
            "bounded columns are released with noise",
            where="params.aggregates",
        )
    return summed


def _bounds(given: Any, summed: list[str]) -> dict[str, tuple[float, float]]:
    if not isinstance(given, dict) or sorted(given) != sorted(set(summed)):
        got = sorted(given) if isinstance(given, dict) else given
        raise _fail(
            "bounds", f"must give [lo, hi] for exactly the summed columns {sorted(set(summed))}, got {got!r}"
        )
    out = {}
    for column, pair in sorted(given.items()):
        field = f"bounds.{column}"
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(field, f"must be [lo, hi], got {str(pair)[:40]!r}")
        lo = _number(pair[0], field, low=-MAX_BOUND, high=MAX_BOUND, low_open=False)
        hi = _number(pair[1], field, low=-MAX_BOUND, high=MAX_BOUND, low_open=False)
        if lo >= hi:
            raise _fail(field, f"must have lo < hi, got [{lo:g}, {hi:g}]")
        out[column] = (lo, hi)
    return out
