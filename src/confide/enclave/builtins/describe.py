"""Built-in describe v1: per-column statistics of the union of the inputs, with a cohort threshold.

Inputs: one or more UTF-8 CSV files with the same header. Params: ``k`` (required, an integer >= 2:
a statistic over fewer than k values is suppressed, and a category seen fewer than k times is not
named), ``columns`` (a list of column names; default every column), ``max_categories`` (10: the most
frequent categories named per text column), ``min_max`` (false: true also releases each numeric
column's minimum and maximum, which are one row's exact value each).

A column is numeric when every non-empty cell is a plain decimal number (``-12``, ``3.50``); else it
is text. Output ``report`` (JSON): ``rows`` (the total, or null below k), and per column ``kind``,
``count`` (non-empty cells) and, when count >= k: numeric ``mean``, ``std`` (population), and with
min_max ``min`` and ``max``; text ``distinct`` (how many different values) and ``top`` (the values
seen at least k times, most frequent first, at most max_categories, with their counts) and
``unnamed`` (how many rows hold a value not named). Runs in the sandbox; the zygote provides pandas.
"""

import json
import math
import re
from typing import Any

NAME = "describe"
NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def _fail(message: str) -> None:
    raise ValueError(f"{NAME}: {message}")


def _params(given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - {"k", "columns", "max_categories", "min_max"})
    if unknown:
        _fail(f"unknown parameter(s) {', '.join(unknown)}")
    k = given.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 10**9:
        _fail(f"k must be an integer of at least 2, got {k!r}")
    cats = given.get("max_categories", 10)
    if isinstance(cats, bool) or not isinstance(cats, int) or not 0 <= cats <= 1000:
        _fail(f"max_categories must be an integer in 0..1000, got {cats!r}")
    min_max = given.get("min_max", False)
    if not isinstance(min_max, bool):
        _fail(f"min_max must be true or false, got {min_max!r}")
    columns = given.get("columns")
    if columns is not None and (
        not isinstance(columns, list)
        or not columns
        or not all(isinstance(c, str) and c for c in columns)
        or len(set(columns)) != len(columns)
    ):
        _fail(f"columns must be a non-empty list of distinct column names, got {columns!r}")
    return {"k": k, "columns": columns, "max_categories": cats, "min_max": min_max}


def _read(pd: Any, inputs: Any) -> Any:
    frames, header, first = [], None, ""
    for name in sorted(inputs):
        try:
            frame = pd.read_csv(inputs[name], dtype=str, keep_default_na=False)
        except Exception as exc:
            _fail(f"input {name!r} is not a readable CSV file ({exc})")
        cols = [str(c) for c in frame.columns]
        if header is None:
            header, first = cols, name
        elif cols != header:
            _fail(f"input {name!r} has header {cols}, but input {first!r} has {header}")
        frames.append(frame)
    if not frames:
        _fail("no inputs")
    return pd.concat(frames, ignore_index=True), header


def _numeric(cells: list[str]) -> list[float] | None:
    if not all(NUMBER_RE.fullmatch(c) for c in cells):
        return None
    values = [float(c) for c in cells]
    return values if all(math.isfinite(v) for v in values) else None


def _column(cells: list[str], p: dict[str, Any]) -> dict[str, Any]:
    k = p["k"]
    present = [c.strip() for c in cells if c.strip() != ""]
    values = _numeric(present)
    out: dict[str, Any] = {"kind": "numeric" if values is not None else "text", "count": len(present)}
    if len(present) < k:
        out["suppressed"] = True
        return out
    if values is not None:
        n = len(values)
        mean = math.fsum(values) / n
        out["mean"] = mean
        out["std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
        if p["min_max"]:
            out["min"], out["max"] = min(values), max(values)
        return out
    counts: dict[str, int] = {}
    for c in present:
        counts[c] = counts.get(c, 0) + 1
    frequent = sorted(((v, n) for v, n in counts.items() if n >= k), key=lambda vn: (-vn[1], vn[0]))
    named = frequent[: p["max_categories"]]
    out["distinct"] = len(counts)
    out["top"] = [{"value": v, "count": n} for v, n in named]
    out["unnamed"] = len(present) - sum(n for _, n in named)
    return out


def run(ctx: Any) -> None:
    import pandas as pd

    p = _params(dict(ctx.params))
    frame, header = _read(pd, ctx.inputs)
    wanted = p["columns"] or header
    missing = [c for c in wanted if c not in header]
    if missing:
        _fail(f"columns {missing} are not in the header {header}")
    rows = len(frame)
    report = {
        "k": p["k"],
        "rows": rows if rows >= p["k"] else None,
        "columns": {c: _column([str(x) for x in frame[c].tolist()], p) for c in wanted},
    }
    ctx.outputs["report"].write(json.dumps(report, ensure_ascii=False, sort_keys=True).encode("utf-8"))
