"""Built-in gbdt-predict v1: score a CSV with an XGBoost JSON model.

Inputs: ``model`` (an XGBoost JSON model, such as gbdt-train's) and ``data`` (a CSV file). The
model's own feature names pick the columns (so a label column is dropped); a model without feature
names uses every column except ``params.label`` (optional). Output: ``predictions``, a CSV with one
``score`` column, one row per data row, in order. Runs in the sandbox (pandas and xgboost from
the zygote).
"""

from typing import Any


def run(ctx: Any) -> None:
    import pandas as pd  # only inside the sandbox child, never in the enclave process
    import xgboost as xgb

    unknown = sorted(set(ctx.params) - {"label"})
    if unknown:
        raise ValueError(f"gbdt-predict: unknown parameter(s) {', '.join(unknown)}")
    label = ctx.params.get("label")
    booster = xgb.Booster()
    try:
        booster.load_model(bytearray(ctx.inputs["model"].read()))
    except Exception as exc:
        raise ValueError(f"gbdt-predict: input 'model' is not an XGBoost model ({exc})") from None
    booster.set_param({"nthread": 1})
    try:
        data = pd.read_csv(ctx.inputs["data"])
    except Exception as exc:
        raise ValueError(f"gbdt-predict: input 'data' is not a readable CSV file ({exc})") from None
    data.columns = [str(c) for c in data.columns]
    features = booster.feature_names
    if features:
        missing = [f for f in features if f not in data.columns]
        if missing:
            raise ValueError(f"gbdt-predict: input 'data' lacks the model's feature column(s) {missing}")
    else:
        features = [c for c in data.columns if c != label]
    for column in features:
        if not pd.api.types.is_numeric_dtype(data[column]):
            raise ValueError(f"gbdt-predict: column {column!r} is not numeric")
    matrix = xgb.DMatrix(data[features].astype("float64"), feature_names=list(features), nthread=1)
    scores = booster.predict(matrix)
    out = ctx.outputs["predictions"]
    out.write(b"score\n")
    out.write("".join(f"{float(s):.9g}\n" for s in scores).encode())
