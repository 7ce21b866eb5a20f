"""What the built-ins' outputs mean, drawn for a person: gbdt-train's class balance, feature importance
and rows per input as bars; join-aggregate's released table with its suppressed groups counted (they
are left out of the result: the count is all that leaves) and its first aggregate as bars; describe's
columns as a table with the suppressed ones marked; sql's threshold said. Any other JSON object of
counts is drawn as bars too. Every figure is read from the decrypted output files; a file that is
not what the built-in writes gets no view here (its table preview and download stay)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.console.html import esc, notice, table
from confide.console.plots import MAX_BARS, Bars, charts_html
from confide.console.preview import MAX_PREVIEW_BYTES, charts, is_count

Outputs = Mapping[str, Path]
Params = Mapping[str, Any]


@dataclass(frozen=True)
class View:
    html: str
    replaces_preview: bool = False  # the view shows the output better than its generic table


def _json(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        if path.stat().st_size > MAX_PREVIEW_BYTES:
            return None
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _numbers(value: Any) -> list[tuple[str, float]] | None:
    """An object's members as (name, value) when every value is a finite non-negative number."""
    if not isinstance(value, Mapping) or not value:
        return None
    if not all(map(is_count, value.values())):
        return None
    return [(str(k), float(v)) for k, v in value.items()]


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _gbdt_train(outputs: Outputs, _params: Params, ident: str) -> dict[str, View]:
    report = _json(outputs.get("report"))
    if not isinstance(report, Mapping):
        return {}
    bars: list[Bars] = []
    balance = report.get("label_balance")
    counts = _numbers(balance)
    if counts is not None and {k for k, _ in counts} == {"0", "1"}:
        bars.append(
            Bars(
                f"Class balance of label {report.get('label', '?')!s}",
                tuple(sorted(counts)),
                note="rows per label value, over every input",
                share=True,
            )
        )
    importance = _numbers(report.get("feature_importance"))
    if importance is not None:
        ranked = tuple(sorted(importance, key=lambda kv: (-kv[1], kv[0])))
        bars.append(
            Bars(
                "Feature importance",
                ranked,
                note="each feature's total split gain over the model's trees (0: no tree splits on it)",
            )
        )
    rows = _numbers(report.get("rows"))
    if rows is not None:
        bars.append(Bars("Rows per input", tuple(rows), share=True))
    extra = ""
    if counts is None and isinstance(balance, Mapping):  # a regressor: the label's mean, min, max
        extra = "<p>Label " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in balance.items()) + "</p>"
    out = {"report": View(extra + charts_html(bars, f"{ident}-report"))} if bars or extra else {}
    model = _model_summary(_json(outputs.get("model")))
    if model:
        out["model"] = View(f"<p>{model}</p>", replaces_preview=True)
    return out


def _model_summary(model: Any) -> str:
    """What an XGBoost JSON model is, in a line (its trees are for gbdt-predict, not for reading)."""
    try:
        learner = model["learner"]
        trees = learner["gradient_booster"]["model"]["gbtree_model_param"]["num_trees"]
        objective = learner["objective"]["name"]
        features = [str(f) for f in learner["feature_names"]]
    except (KeyError, TypeError):
        return ""
    return (
        f"An XGBoost model ({esc(objective)}, {esc(trees)} trees) over the features "
        f"{esc(', '.join(features))}: download it, or give it to gbdt-predict as its model input."
    )


def _csv(path: Path | None) -> list[list[str]] | None:
    if path is None:
        return None
    try:
        if path.stat().st_size > MAX_PREVIEW_BYTES:
            return None
        text = path.read_bytes().decode("utf-8")
        return [row for row in csv.reader(io.StringIO(text)) if row]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _first_aggregate_bars(rows: list[list[str]], groups: int) -> Bars | None:
    """The last column (an aggregate) per group, when there are groups and every value is a count
    or a non-negative number."""
    header, body = rows[0], rows[1:]
    if groups < 1 or len(header) <= groups or not body or len(body) > MAX_BARS:
        return None
    items = []
    for row in body:
        try:
            value = float(row[groups])
        except (ValueError, IndexError):
            return None
        if not math.isfinite(value) or value < 0:
            return None
        items.append((" / ".join(row[:groups]), value))
    return Bars(f"{header[groups]} by {' / '.join(header[:groups])}", tuple(items))


def _join_aggregate(outputs: Outputs, params: Params, ident: str) -> dict[str, View]:
    report = _json(outputs.get("report"))
    views: dict[str, View] = {}
    k = _count(report.get("k")) if isinstance(report, Mapping) else None
    released = _count(report.get("groups")) if isinstance(report, Mapping) else None
    suppressed = _count(report.get("suppressed_groups")) if isinstance(report, Mapping) else None
    said = ""
    if k is not None and released is not None and suppressed is not None:
        said = (
            f"Cohort threshold k = {k}: {released} group(s) released, {suppressed} suppressed "
            f"(fewer than {k} distinct keys; left out of the result, only their number leaves the enclave)."
        )
        views["report"] = View(notice(said, kind="warning" if suppressed else "ok"))
    rows = _csv(outputs.get("result"))
    if rows:
        html = notice(said, kind="warning" if suppressed else "ok") if said else ""
        if suppressed:
            html += f'<p class="suppressed-count">Suppressed groups: <strong>{suppressed}</strong> (not in this table)</p>'
        group_by = params.get("group_by")
        bars = _first_aggregate_bars(rows, len(group_by) if isinstance(group_by, list) else 0)
        if bars is not None:
            html += charts_html([bars], f"{ident}-result")
        if html:
            views["result"] = View(html)
    return views


def _sql(outputs: Outputs, _params: Params, _ident: str) -> dict[str, View]:
    report = _json(outputs.get("report"))
    if not isinstance(report, Mapping) or _count(report.get("k")) is None:
        return {}
    said = (
        f"Cohort threshold k = {report['k']}: {esc(report.get('rows'))} row(s) released. Rows below k "
        "were left out; how many is not reported (it could tell whether one person is in the data)."
    )
    view = View(f'<p class="plot-note">{said}</p>')
    return {name: view for name in ("result", "report") if name in outputs}


def _describe(outputs: Outputs, _params: Params, _ident: str) -> dict[str, View]:
    report = _json(outputs.get("report"))
    if not isinstance(report, Mapping) or not isinstance(report.get("columns"), Mapping):
        return {}
    k = report.get("k")
    columns: Mapping[str, Any] = report["columns"]
    rows = []
    suppressed = 0
    for name, col in columns.items():
        if not isinstance(col, Mapping):
            return {}
        if col.get("suppressed"):
            suppressed += 1
            stats = f'<strong class="suppressed">suppressed</strong> (fewer than {esc(k)} values)'
        elif col.get("kind") == "numeric":
            stats = ", ".join(
                f"{key} {esc(_short(col[key]))}" for key in ("mean", "std", "min", "max") if key in col
            )
        else:
            given = col.get("top")
            top: list[Any] = given if isinstance(given, list) else []
            named = ", ".join(
                f"{esc(t.get('value'))} ({esc(t.get('count'))})" for t in top if isinstance(t, Mapping)
            )
            stats = f"{esc(col.get('distinct'))} distinct; {named or 'none seen k times'}; unnamed {esc(col.get('unnamed'))}"
        rows.append([esc(name), esc(col.get("kind")), esc(col.get("count")), stats])
    total = "suppressed (fewer than k)" if report.get("rows") is None else str(report.get("rows"))
    html = notice(
        f"Cohort threshold k = {k}: rows {total}; {suppressed} of {len(columns)} column(s) suppressed.",
        kind="warning" if suppressed else "ok",
    )
    html += table(
        ("Column", "Kind", "Values", "Statistics"),
        rows,
        caption="Per-column statistics (suppressed ones marked)",
        empty="No columns.",
    )
    return {"report": View(html, replaces_preview=True)}


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


BUILTIN_VIEWS: dict[str, Callable[[Outputs, Params, str], dict[str, View]]] = {
    "gbdt-train": _gbdt_train,
    "join-aggregate": _join_aggregate,
    "sql": _sql,
    "describe": _describe,
}


def views(builtin: str | None, outputs: Outputs, params: Params, *, ident: str = "plot") -> dict[str, View]:
    """Output name -> its view: the built-in's own (`builtin` is None for a party's function), else
    bars for a JSON object's members that are objects of counts (see `preview.charts`)."""
    view = BUILTIN_VIEWS.get(builtin or "")
    out = dict(view(outputs, params, ident)) if view is not None else {}
    for name, path in outputs.items():
        if name not in out:
            found = charts(path)
            if found:
                out[name] = View(charts_html(found, f"{ident}-{name}"))
    return out
