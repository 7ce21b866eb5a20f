"""Built-ins logistic-regression-train, logistic-regression-predict and pca v1 (scikit-learn).

One module for the three because they share its strict numeric CSV reader and the model format that
train writes and predict parses. ``run`` picks the function by the task's outputs, which the enclave
has checked against the approved descriptor (train: some of ``model``/``report``; predict:
``predictions``; pca: some of ``components``/``projected``): parameters cannot pick another one.

Tables: UTF-8 CSV with a header; several inputs are one table (their union, inputs in name order,
every header equal). A feature cell is a plain decimal number (``-1``, ``2.50``, ``1e-3``; no NaN,
infinity or empty cell): another is refused naming the input, its 1-based file line and the column.

logistic-regression-train. Params: ``label`` (required), ``features`` or ``exclude`` (lists of
column names; default every column but the label), ``C`` (1.0: inverse L2 strength), ``max_iter``
(100), ``fit_intercept`` (true), ``standardize`` (true: each feature scaled by its training mean and
population standard deviation, stored in the model). Labels are numbers when every label is one,
else text; at least two classes. scikit-learn's LogisticRegression (lbfgs; multinomial for more
than two classes). Outputs: ``model`` (JSON, format ``confide.logistic-regression`` version 1:
label, features, classes, coef (one row for two classes, else one per class), intercept, means,
scales) and ``report`` (JSON: rows per input, features, classes with their row counts, iterations,
converged).

logistic-regression-predict. Inputs ``model`` (that JSON, parsed as hostile input) and ``data``.
Params: ``label`` (optional: a column to ignore; it may not be a model feature). Output
``predictions`` (CSV, one row per data row in order: ``probability`` of the second class for two
classes, else ``probability_<class>`` per class; then ``class``, the most likely).

pca. Params: ``n_components`` (required, 1..number of columns), ``min_rows`` (required, >= 2: fewer
rows are refused), ``columns`` (default: every column whose cells are all numbers), ``standardize``
(false). scikit-learn's PCA (full SVD). Outputs, those the manifest names: ``components`` (JSON:
columns, mean, scale, components, explained_variance, explained_variance_ratio, rows) and
``projected`` (CSV ``pc1..pcN``: every row's scores, in row order: per-row values).
Runs in the sandbox; numpy and scikit-learn are imported inside the functions.
"""

import codecs
import csv
import io
import json
import math
import re
import warnings
from typing import Any, NoReturn

TRAIN, PREDICT, PCA = "logistic-regression-train", "logistic-regression-predict", "pca"
MODEL_FORMAT, MODEL_VERSION = "confide.logistic-regression", 1
PCA_FORMAT = "confide.pca"
NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
MAX_CLASSES = 1000
MAX_FEATURES = 10000
MAX_MODEL_BYTES = 64 << 20
MAX_LABEL_CHARS = 256
csv.field_size_limit(1 << 24)


class _Failed(ValueError):
    pass


def _fail(fn: str, message: str) -> NoReturn:
    raise _Failed(f"{fn}: {message}")


# ---- tables -----------------------------------------------------------------------------------


class _Table:
    """A CSV's header, rows (lists of stripped cells) and each row's first file line (1-based)."""

    def __init__(self, fn: str, name: str, raw: bytes) -> None:
        self.fn, self.name = fn, name
        try:
            text = codecs.decode(raw, "utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            _fail(fn, f"input {name!r} is not UTF-8 text (byte {exc.start}, line {line})")
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows, lines, line = [], [], 1
        try:
            for row in reader:
                if row:  # a blank line is no row
                    rows.append([c.strip() for c in row])
                    lines.append(line)
                line = reader.line_num + 1
        except csv.Error as exc:
            _fail(fn, f"input {name!r}, line {line}: not a readable CSV row ({exc})")
        if not rows:
            _fail(fn, f"input {name!r} is empty (no header)")
        self.header = rows[0]
        if "" in self.header or len(set(self.header)) != len(self.header):
            _fail(fn, f"input {name!r}: the header {self.header} must name every column once")
        self.rows, self.lines = rows[1:], lines[1:]
        width = len(self.header)
        for row, at in zip(self.rows, self.lines, strict=True):
            if len(row) != width:
                _fail(fn, f"input {name!r}, line {at}: {len(row)} fields, but the header has {width}")

    def cells(self, column: str) -> list[str]:
        i = self.header.index(column)
        return [row[i] for row in self.rows]

    def numbers(self, np: Any, column: str) -> Any:
        """The column as float64, or a refusal naming input, line and column."""
        cells = self.cells(column)
        for cell, at in zip(cells, self.lines, strict=True):
            if not NUMBER_RE.fullmatch(cell) or not math.isfinite(float(cell)):
                shown = cell if len(cell) <= 40 else cell[:40] + "..."
                _fail(
                    self.fn,
                    f"input {self.name!r}, line {at}, column {column!r}: {shown!r} is not a finite "
                    "number (missing values are not supported)",
                )
        return np.array([float(c) for c in cells], dtype=np.float64)


def _union(fn: str, inputs: Any) -> list[_Table]:
    tables = [_Table(fn, name, inputs[name].read()) for name in sorted(inputs)]
    if not tables:
        _fail(fn, "no inputs")
    for t in tables[1:]:
        if t.header != tables[0].header:
            _fail(
                fn,
                f"input {t.name!r} has header {t.header}, but input {tables[0].name!r} has "
                f"{tables[0].header}; every input must have the same header",
            )
    return tables


def _matrix(np: Any, tables: list[_Table], columns: list[str]) -> Any:
    parts = [np.column_stack([t.numbers(np, c) for c in columns]) for t in tables if t.rows]
    return np.vstack(parts) if parts else np.zeros((0, len(columns)))


# ---- parameters -------------------------------------------------------------------------------


def _names(fn: str, given: dict[str, Any], key: str) -> list[str] | None:
    names = given.get(key)
    if key in given and (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        _fail(fn, f"{key} must be a non-empty list of distinct column names, got {names!r}")
    return names


def _flag(fn: str, given: dict[str, Any], key: str, default: bool) -> bool:
    value = given.get(key, default)
    if not isinstance(value, bool):
        _fail(fn, f"{key} must be true or false, got {value!r}")
    return value


def _integer(fn: str, given: dict[str, Any], key: str, low: int, high: int, default: int | None) -> int:
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        need = "required: " if key not in given and default is None else ""
        _fail(fn, f"{need}{key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _unknown(fn: str, given: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(given) - known)
    if extra:
        _fail(fn, f"unknown parameter(s) {', '.join(extra)}")


def _train_params(given: dict[str, Any]) -> dict[str, Any]:
    _unknown(TRAIN, given, {"label", "features", "exclude", "C", "max_iter", "fit_intercept", "standardize"})
    label = given.get("label")
    if not isinstance(label, str) or not label:
        _fail(TRAIN, f"parameter 'label' (the label column's name) is required, got {label!r}")
    if "features" in given and "exclude" in given:
        _fail(TRAIN, "give either 'features' or 'exclude', not both")
    c = given.get("C", 1.0)
    if isinstance(c, bool) or not isinstance(c, int | float) or not (0 < c < math.inf) or c > 1e12:
        _fail(TRAIN, f"C must be a number in (0, 1e12], got {c!r}")
    return {
        "label": label,
        "features": _names(TRAIN, given, "features"),
        "exclude": _names(TRAIN, given, "exclude"),
        "C": float(c),
        "max_iter": _integer(TRAIN, given, "max_iter", 1, 100000, 100),
        "fit_intercept": _flag(TRAIN, given, "fit_intercept", True),
        "standardize": _flag(TRAIN, given, "standardize", True),
    }


def _feature_columns(p: dict[str, Any], header: list[str]) -> list[str]:
    label = p["label"]
    if label not in header:
        _fail(TRAIN, f"label column {label!r} is not in the header {header}")
    key = "features" if p["features"] is not None else "exclude"
    named = p[key] or []
    missing = [c for c in named if c not in header]
    if missing:
        _fail(TRAIN, f"{key} names column(s) {missing} not in the header {header}")
    if p["features"] is not None:
        if label in named:
            _fail(TRAIN, f"the label {label!r} cannot also be a feature")
        features = list(named)
    else:
        features = [c for c in header if c != label and c not in named]
    if not features:
        _fail(TRAIN, "no feature columns besides the label")
    if len(features) > MAX_FEATURES:
        _fail(TRAIN, f"{len(features)} features; at most {MAX_FEATURES}")
    return features


# ---- logistic regression ------------------------------------------------------------------------


def _labels(tables: list[_Table], label: str) -> list[Any]:
    """Each row's label: numbers when every label is a finite number, else the text."""
    cells = []
    for t in tables:
        for cell, at in zip(t.cells(label), t.lines, strict=True):
            if cell == "" or len(cell) > MAX_LABEL_CHARS:
                _fail(
                    TRAIN,
                    f"input {t.name!r}, line {at}, column {label!r}: a label must have "
                    f"1..{MAX_LABEL_CHARS} characters",
                )
            cells.append(cell)
    if all(NUMBER_RE.fullmatch(c) and math.isfinite(float(c)) for c in cells):
        return [_number(float(c)) for c in cells]
    return cells


def _number(v: float) -> int | float:
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def _scaling(np: Any, x: Any, standardize: bool) -> tuple[Any, Any]:
    if not standardize:
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    means = x.mean(axis=0)
    scales = x.std(axis=0)
    return means, np.where(scales > 0, scales, 1.0)  # a constant column is only centred


def _train(ctx: Any) -> None:
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    p = _train_params(dict(ctx.params))
    tables = _union(TRAIN, ctx.inputs)
    features = _feature_columns(p, tables[0].header)
    x = _matrix(np, tables, features)
    y = _labels(tables, p["label"])
    classes = sorted(set(y))
    if len(classes) < 2:
        _fail(TRAIN, f"label column {p['label']!r} has {len(classes)} class(es); at least 2 are needed")
    if len(classes) > MAX_CLASSES:
        _fail(TRAIN, f"label column {p['label']!r} has {len(classes)} classes; at most {MAX_CLASSES}")
    means, scales = _scaling(np, x, p["standardize"])
    index = {c: i for i, c in enumerate(classes)}
    codes = np.array([index[v] for v in y])
    model = LogisticRegression(
        C=p["C"], max_iter=p["max_iter"], fit_intercept=p["fit_intercept"], solver="lbfgs"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit((x - means) / scales, codes)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if "model" in ctx.outputs:
        doc = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "label": p["label"],
            "features": features,
            "classes": classes,
            "coef": [[float(v) for v in row] for row in model.coef_],
            "intercept": [float(v) for v in model.intercept_],
            "means": [float(v) for v in means],
            "scales": [float(v) for v in scales],
        }
        ctx.outputs["model"].write(json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8"))
    if "report" in ctx.outputs:
        counts = np.bincount(codes, minlength=len(classes))
        report = {
            "function": TRAIN,
            "version": "1",
            "params": {k: p[k] for k in ("C", "max_iter", "fit_intercept", "standardize")},
            "label": p["label"],
            "features": features,
            "rows": {t.name: len(t.rows) for t in tables},
            "total_rows": len(y),
            "classes": [{"class": c, "count": int(n)} for c, n in zip(classes, counts, strict=True)],
            "iterations": int(np.max(model.n_iter_)),
            "converged": converged,
        }
        ctx.outputs["report"].write(json.dumps(report, ensure_ascii=False, indent=1).encode("utf-8"))


def _model_field(doc: dict[str, Any], key: str) -> Any:
    if key not in doc:
        _fail(PREDICT, f"input 'model': field {key!r} is missing")
    return doc[key]


def _finite(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float range
        return False


def _finite_list(value: Any, key: str, length: int, positive: bool = False) -> list[float]:
    if not isinstance(value, list) or len(value) != length:
        _fail(PREDICT, f"input 'model': {key} must be a list of {length} numbers")
    for i, v in enumerate(value):
        if not _finite(v) or (positive and v <= 0):
            kind = "a positive finite number" if positive else "a finite number"
            _fail(PREDICT, f"input 'model': {key}[{i}] must be {kind}, got {str(v)[:40]!r}")
    return [float(v) for v in value]


def _no_constants(name: str) -> None:
    raise _Failed(f"{PREDICT}: input 'model': {name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for k, v in pairs:
        if k in doc:
            raise _Failed(f"{PREDICT}: input 'model': field {k!r} appears twice")
        doc[k] = v
    return doc


def _read_model(raw: bytes) -> dict[str, Any]:
    """The model JSON, every field checked (hostile input: it may come from anyone)."""
    if len(raw) > MAX_MODEL_BYTES:
        _fail(PREDICT, f"input 'model' is larger than {MAX_MODEL_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except _Failed:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _fail(PREDICT, f"input 'model' is not JSON ({str(exc)[:120]})")
    if not isinstance(doc, dict):
        _fail(PREDICT, "input 'model' must be a JSON object")
    known = {"format", "version", "label", "features", "classes", "coef", "intercept", "means", "scales"}
    extra = sorted(set(doc) - known)
    if extra:
        _fail(PREDICT, f"input 'model': unknown field(s) {', '.join(e[:40] for e in extra)}")
    if _model_field(doc, "format") != MODEL_FORMAT:
        _fail(PREDICT, f"input 'model': format must be {MODEL_FORMAT!r}, got {str(doc['format'])[:60]!r}")
    version = _model_field(doc, "version")
    if isinstance(version, bool) or version != MODEL_VERSION:
        _fail(PREDICT, f"input 'model': version {str(version)[:20]} is not supported (only {MODEL_VERSION})")
    label = _model_field(doc, "label")
    if not isinstance(label, str) or not label:
        _fail(PREDICT, "input 'model': label must be a column name")
    features = _model_field(doc, "features")
    if (
        not isinstance(features, list)
        or not 1 <= len(features) <= MAX_FEATURES
        or not all(isinstance(f, str) and f for f in features)
        or len(set(features)) != len(features)
    ):
        _fail(PREDICT, f"input 'model': features must be a list of 1..{MAX_FEATURES} distinct column names")
    classes = _model_field(doc, "classes")
    numeric = isinstance(classes, list) and all(_finite(c) for c in classes)
    texts = isinstance(classes, list) and all(
        isinstance(c, str) and 0 < len(c) <= MAX_LABEL_CHARS for c in classes
    )
    if not (numeric or texts) or not 2 <= len(classes) <= MAX_CLASSES or len(set(classes)) != len(classes):
        _fail(
            PREDICT,
            f"input 'model': classes must be a list of 2..{MAX_CLASSES} distinct labels, all numbers or all text",
        )
    k, n = (1 if len(classes) == 2 else len(classes)), len(features)
    coef = _model_field(doc, "coef")
    if not isinstance(coef, list) or len(coef) != k:
        _fail(PREDICT, f"input 'model': coef must have {k} row(s) for {len(classes)} classes")
    return {
        "label": label,
        "features": features,
        "classes": classes,
        "coef": [_finite_list(row, f"coef[{r}]", n) for r, row in enumerate(coef)],
        "intercept": _finite_list(_model_field(doc, "intercept"), "intercept", k),
        "means": _finite_list(_model_field(doc, "means"), "means", n),
        "scales": _finite_list(_model_field(doc, "scales"), "scales", n, positive=True),
    }


def _predict(ctx: Any) -> None:
    import numpy as np

    _unknown(PREDICT, dict(ctx.params), {"label"})
    label = ctx.params.get("label")
    if label is not None and (not isinstance(label, str) or not label):
        _fail(PREDICT, f"label must be a column name, got {label!r}")
    m = _read_model(ctx.inputs["model"].read())
    if label in m["features"]:
        _fail(PREDICT, f"label {label!r} is one of the model's features")
    data = _Table(PREDICT, "data", ctx.inputs["data"].read())
    missing = [f for f in m["features"] if f not in data.header]
    if missing:
        _fail(
            PREDICT,
            f"input 'data' lacks the model's feature column(s) {missing[:20]} (header {data.header[:50]})",
        )
    x = _matrix(np, [data], m["features"])
    with np.errstate(over="ignore", invalid="ignore"):
        z = (x - np.array(m["means"])) / np.array(m["scales"])
        logits = z @ np.array(m["coef"]).T + np.array(m["intercept"])
        bad = ~np.isfinite(logits).all(axis=1)
        if bad.any():
            _fail(
                PREDICT, f"input 'data', line {data.lines[int(np.argmax(bad))]}: the model's score overflows"
            )
        if len(m["classes"]) == 2:
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            probs = np.column_stack([1.0 - p1, p1])
        else:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
    classes = m["classes"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    shown = [_class_text(c) for c in classes]
    writer.writerow(
        ["probability", "class"] if len(classes) == 2 else [*(f"probability_{c}" for c in shown), "class"]
    )
    best = probs.argmax(axis=1)
    for row, b in zip(probs, best, strict=True):
        values = [repr(float(row[1]))] if len(classes) == 2 else [repr(float(v)) for v in row]
        writer.writerow([*values, shown[int(b)]])
    ctx.outputs["predictions"].write(out.getvalue().encode("utf-8"))


def _class_text(c: Any) -> str:
    return c if isinstance(c, str) else repr(_number(float(c)))


# ---- pca ----------------------------------------------------------------------------------------


def _pca(ctx: Any) -> None:
    import numpy as np
    from sklearn.decomposition import PCA as SkPCA

    given = dict(ctx.params)
    _unknown(PCA, given, {"columns", "n_components", "standardize", "min_rows"})
    min_rows = _integer(PCA, given, "min_rows", 2, 10**9, None)
    standardize = _flag(PCA, given, "standardize", False)
    named = _names(PCA, given, "columns")
    n = _integer(PCA, given, "n_components", 1, MAX_FEATURES, None)
    tables = _union(PCA, ctx.inputs)
    rows = sum(len(t.rows) for t in tables)
    if rows < min_rows:  # before any cell is looked at: no line number of a small cohort leaves
        _fail(PCA, f"the inputs have fewer than min_rows = {min_rows} rows: nothing is computed")
    header = tables[0].header
    if named is not None:
        missing = [c for c in named if c not in header]
        if missing:
            _fail(PCA, f"columns {missing} are not in the header {header}")
        columns = named
    else:
        columns = [c for c in header if all(NUMBER_RE.fullmatch(v) for t in tables for v in t.cells(c))]
        if not columns:
            _fail(PCA, "no column holds only numbers (name the columns)")
    if n > len(columns):
        _fail(PCA, f"n_components must be an integer in 1..{len(columns)} (the number of columns), got {n}")
    x = _matrix(np, tables, columns)
    if n > rows:
        _fail(PCA, f"n_components {n} is more than the number of rows")
    means, scales = _scaling(np, x, standardize)
    fitted = SkPCA(n_components=n, svd_solver="full")
    scores = fitted.fit_transform((x - means) / scales)
    if "components" in ctx.outputs:
        doc = {
            "format": PCA_FORMAT,
            "version": 1,
            "columns": columns,
            "standardized": standardize,
            "mean": [float(v) for v in means] if standardize else [float(v) for v in fitted.mean_],
            "scale": [float(v) for v in scales],
            "components": [[float(v) for v in row] for row in fitted.components_],
            "explained_variance": [float(v) for v in fitted.explained_variance_],
            "explained_variance_ratio": [float(v) for v in fitted.explained_variance_ratio_],
            "rows": rows,
        }
        ctx.outputs["components"].write(json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8"))
    if "projected" in ctx.outputs:
        out = io.StringIO()
        out.write(",".join(f"pc{i + 1}" for i in range(n)) + "\n")
        out.writelines(",".join(repr(float(v)) for v in row) + "\n" for row in scores)
        ctx.outputs["projected"].write(out.getvalue().encode("utf-8"))


# ---- dispatch -------------------------------------------------------------------------------------


def run(ctx: Any) -> None:
    outputs = set(ctx.outputs)
    if outputs and outputs <= {"model", "report"}:
        _train(ctx)
    elif outputs == {"predictions"}:
        _predict(ctx)
    elif outputs and outputs <= {"components", "projected"}:
        _pca(ctx)
    else:
        raise ValueError(
            f"numeric-ml: outputs {sorted(outputs)} are those of none of {TRAIN}, {PREDICT}, {PCA}"
        )
