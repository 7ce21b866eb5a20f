"""Built-in gbdt-train v1: an XGBoost model trained on the union of every input.

Inputs: any number of CSV files with the same header (checked; a different header is an error
naming the input). Params: ``label`` (required: the label column), ``objective``
(default ``binary:logistic``; ``reg:*`` and ``count:poisson`` train a regressor), ``rounds`` (50),
``max_depth`` (4), ``eta`` (0.3), ``seed`` (0), ``features`` (a list of column names: only these are
features) or ``exclude`` (a list of column names that are not features, e.g. an id column); by default
every column but the label is a numeric feature. A named column that is not in the header is an error.
Outputs: ``model`` (the XGBoost JSON model) and ``report`` (JSON: rows per input, features, label
balance, and each feature's importance as the model's total split gain, 0 for a feature no tree splits
on). One thread and a fixed seed: the same inputs and params give the same model bytes.
Runs in the sandbox; the sandbox zygote provides pandas and xgboost.
"""

import json
from typing import Any

OBJECTIVES = (
    "binary:logistic",
    "binary:logitraw",
    "binary:hinge",
    "reg:squarederror",
    "reg:absoluteerror",
    "reg:logistic",
    "count:poisson",
)
DEFAULTS = {"objective": "binary:logistic", "rounds": 50, "max_depth": 4, "eta": 0.3, "seed": 0}
LIMITS = {"rounds": (1, 10000), "max_depth": (1, 32), "seed": (0, 2**31 - 1)}


def _params(given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - {"label", "features", "exclude", *DEFAULTS})
    if unknown:
        raise ValueError(f"gbdt-train: unknown parameter(s) {', '.join(unknown)}")
    label = given.get("label")
    if not isinstance(label, str) or not label:
        raise ValueError("gbdt-train: parameter 'label' (the label column's name) is required")
    if "features" in given and "exclude" in given:
        raise ValueError("gbdt-train: give either 'features' or 'exclude', not both")
    for key in ("features", "exclude"):
        names = given.get(key)
        if key in given and (
            not isinstance(names, list)
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise ValueError(f"gbdt-train: {key} must be a list of distinct column names, got {names!r}")
    p = {**DEFAULTS, **given}
    if p["objective"] not in OBJECTIVES:
        raise ValueError(f"gbdt-train: objective {p['objective']!r} is not one of {', '.join(OBJECTIVES)}")
    for key, (low, high) in LIMITS.items():
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"gbdt-train: {key} must be an integer in {low}..{high}, got {value!r}")
    eta = p["eta"]
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 < eta <= 1:
        raise ValueError(f"gbdt-train: eta must be a number in (0, 1], got {eta!r}")
    return p


def _read_inputs(pd: Any, inputs: Any) -> tuple[dict[str, Any], list[str]]:
    frames: dict[str, Any] = {}
    header: list[str] | None = None
    first = ""
    for name in sorted(inputs):
        try:
            frame = pd.read_csv(inputs[name])
        except Exception as exc:
            raise ValueError(f"gbdt-train: input {name!r} is not a readable CSV file ({exc})") from None
        columns = [str(c) for c in frame.columns]
        if header is None:
            header, first = columns, name
        elif columns != header:
            raise ValueError(
                f"gbdt-train: input {name!r} has header {columns}, but input {first!r} has {header}; "
                "every input must have the same header"
            )
        frames[name] = frame
    if not frames:
        raise ValueError("gbdt-train: no inputs")
    assert header is not None
    return frames, header


def _features(p: dict[str, Any], header: list[str], label: str) -> list[str]:
    """The feature columns: `features` as given, or the header less the label and `exclude`."""
    named = p.get("features", p.get("exclude", []))
    missing = [c for c in named if c not in header]
    if missing:
        key = "features" if "features" in p else "exclude"
        raise ValueError(f"gbdt-train: {key} names column(s) {missing} not in the header {header}")
    if "features" in p:
        if label in named:
            raise ValueError(f"gbdt-train: the label {label!r} cannot also be a feature")
        features = list(named)
    else:
        features = [c for c in header if c != label and c not in named]
    if not features:
        raise ValueError("gbdt-train: no feature columns besides the label")
    return features


def run(ctx: Any) -> None:
    import pandas as pd  # only inside the sandbox child, never in the enclave process
    import xgboost as xgb

    p = _params(dict(ctx.params))
    label = p["label"]
    frames, header = _read_inputs(pd, ctx.inputs)
    if label not in header:
        raise ValueError(f"gbdt-train: label column {label!r} is not in the header {header}")
    features = _features(p, header, label)
    data = pd.concat([frames[name] for name in sorted(frames)], ignore_index=True)
    for column in [*features, label]:
        if not pd.api.types.is_numeric_dtype(data[column]):
            raise ValueError(f"gbdt-train: column {column!r} is not numeric")
    y = data[label].astype("float64")
    if y.isna().any():
        raise ValueError(f"gbdt-train: label column {label!r} has missing values")
    binary = p["objective"].startswith("binary:")
    if binary and not y.isin([0.0, 1.0]).all():
        raise ValueError(f"gbdt-train: objective {p['objective']} needs labels 0 or 1 in {label!r}")
    dtrain = xgb.DMatrix(data[features].astype("float64"), label=y, feature_names=features, nthread=1)
    booster = xgb.train(
        {
            "objective": p["objective"],
            "max_depth": p["max_depth"],
            "eta": p["eta"],
            "seed": p["seed"],
            "nthread": 1,
            "tree_method": "hist",
        },
        dtrain,
        num_boost_round=p["rounds"],
    )
    ctx.outputs["model"].write(bytes(booster.save_raw(raw_format="json")))
    gain: dict[str, Any] = booster.get_score(importance_type="total_gain")
    balance: dict[str, float | int]
    if binary:
        balance = {"0": int((y == 0).sum()), "1": int((y == 1).sum())}
    else:
        balance = {"mean": float(y.mean()), "min": float(y.min()), "max": float(y.max())}
    report = {
        "function": "gbdt-train",
        "version": "1",
        "objective": p["objective"],
        "params": {k: p[k] for k in sorted(DEFAULTS)},
        "label": label,
        "features": features,
        "rows": {name: len(frames[name]) for name in sorted(frames)},
        "total_rows": len(data),
        "label_balance": balance,
        "feature_importance": {f: round(float(gain.get(f, 0.0)), 6) for f in features},
    }
    ctx.outputs["report"].write(json.dumps(report, sort_keys=True, indent=1).encode())
