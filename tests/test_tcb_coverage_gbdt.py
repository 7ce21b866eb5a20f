"""The built-ins gbdt-train and gbdt-predict called as run(ctx) in this process (in the sandbox child
they are compiled as "<function>", invisible to coverage); hostile parameters and inputs fail with the
built-in's own error. tests/test_builtins.py runs them sandboxed, end to end."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from confide.enclave.builtins import gbdt_predict, gbdt_train
from confide.enclave.sandbox.context import Context

TRAIN = b"x1,x2,id,y\n" + b"".join(
    b"%d,%d,%d,%d\n" % (i % 7, (i * 3) % 5, i, int(i % 7 > 3)) for i in range(60)
)
ODD = b"x1,x2,extra,y\n1,2,3,0\n"
REG = b"x1,x2,id,y\n1,2,1,0.5\n3,1,2,2.5\n2,2,3,1.0\n"


def call(
    module: Any, params: dict[str, Any], inputs: dict[str, bytes], outputs: tuple[str, ...]
) -> dict[str, bytes]:
    outs = {name: io.BytesIO() for name in outputs}
    module.run(Context(dict(params), {k: io.BytesIO(v) for k, v in inputs.items()}, dict(outs)))  # type: ignore[arg-type]
    return {name: o.getvalue() for name, o in outs.items()}


def train(params: dict[str, Any], inputs: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return call(
        gbdt_train, params, inputs if inputs is not None else {"a": TRAIN, "b": TRAIN}, ("model", "report")
    )


def test_train_report_and_determinism() -> None:
    params = {"label": "y", "exclude": ["id"], "rounds": 3, "seed": 7}
    one, two = train(params), train(params)
    assert one["model"] == two["model"]
    report = json.loads(one["report"])
    assert report["features"] == ["x1", "x2"] and report["rows"] == {"a": 60, "b": 60}
    assert report["label_balance"] == {"0": 72, "1": 48}
    importance = report["feature_importance"]  # the label is x1 % 7 > 3: x1 carries the gain
    assert list(importance) == ["x1", "x2"] and importance["x1"] > 0 <= importance["x2"]
    assert max(importance, key=importance.__getitem__) == "x1"


def test_train_regression_and_predict_with_features() -> None:
    out = train({"label": "y", "features": ["x1"], "objective": "reg:squarederror", "rounds": 2}, {"a": REG})
    report = json.loads(out["report"])
    assert report["features"] == ["x1"] and report["label_balance"]["max"] == 2.5
    assert list(report["feature_importance"]) == ["x1"]
    scores = call(gbdt_predict, {}, {"model": out["model"], "data": REG}, ("predictions",))["predictions"]
    lines = scores.decode().splitlines()
    assert lines[0] == "score" and len(lines) == 4 and all(float(s) == float(s) for s in lines[1:])


def test_predict_binary_scores_are_probabilities() -> None:
    model = train({"label": "y", "exclude": ["id"], "rounds": 3})["model"]
    got = call(gbdt_predict, {"label": "y"}, {"model": model, "data": TRAIN}, ("predictions",))["predictions"]
    scores = [float(s) for s in got.decode().split()[1:]]
    assert len(scores) == 60 and all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize(
    ("params", "inputs", "message"),
    [
        ({"label": "y", "colsample": 1}, None, "unknown parameter(s) colsample"),
        ({}, None, "parameter 'label'"),
        ({"label": "y", "features": ["x1"], "exclude": ["id"]}, None, "either 'features' or 'exclude'"),
        ({"label": "y", "features": ["x1", "x1"]}, None, "features must be a list of distinct"),
        ({"label": "y", "exclude": "id"}, None, "exclude must be a list of distinct"),
        ({"label": "y", "objective": "rank:pairwise"}, None, "is not one of"),
        ({"label": "y", "rounds": 0}, None, "rounds must be an integer in 1..10000"),
        ({"label": "y", "max_depth": True}, None, "max_depth must be an integer"),
        ({"label": "y", "eta": 0}, None, "eta must be a number in (0, 1]"),
        ({"label": "y", "eta": "fast"}, None, "eta must be a number in (0, 1]"),
        ({"label": "y"}, {}, "no inputs"),
        ({"label": "y"}, {"a": TRAIN, "b": ODD}, "input 'b' has header ['x1', 'x2', 'extra', 'y']"),
        ({"label": "y"}, {"a": b""}, "input 'a' is not a readable CSV file"),
        ({"label": "z"}, None, "label column 'z' is not in the header"),
        ({"label": "y", "exclude": ["q"]}, None, "exclude names column(s) ['q'] not in the header"),
        ({"label": "y", "features": ["y"]}, None, "the label 'y' cannot also be a feature"),
        ({"label": "y", "exclude": ["x1", "x2", "id"]}, None, "no feature columns besides the label"),
        ({"label": "y"}, {"a": b"x1,y\nfoo,1\n"}, "column 'x1' is not numeric"),
        ({"label": "y"}, {"a": b"x1,y\n1,\n2,1\n"}, "label column 'y' has missing values"),
        ({"label": "y"}, {"a": REG}, "needs labels 0 or 1"),
    ],
)
def test_train_refuses_hostile_parameters_and_inputs(
    params: dict[str, Any], inputs: dict[str, bytes] | None, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        train(params, inputs)
    assert str(info.value).startswith("gbdt-train: ") and message in str(info.value)


@pytest.fixture(scope="module")
def model() -> bytes:
    return train({"label": "y", "exclude": ["id"], "rounds": 2})["model"]


@pytest.mark.parametrize(
    ("params", "which", "data", "message"),
    [
        ({"threshold": 1}, "model", TRAIN, "unknown parameter(s) threshold"),
        ({}, "garbage", TRAIN, "input 'model' is not an XGBoost model"),
        ({}, "model", b"", "input 'data' is not a readable CSV file"),
        ({}, "model", b"x1,y\n1,0\n", "lacks the model's feature column(s) ['x2']"),
        ({}, "model", b"x1,x2\n1,a\n", "column 'x2' is not numeric"),
    ],
)
def test_predict_refuses_hostile_inputs(
    model: bytes, params: dict[str, Any], which: str, data: bytes, message: str
) -> None:
    blob = model if which == "model" else b'{"not": "a model"'
    with pytest.raises(ValueError) as info:
        call(gbdt_predict, params, {"model": blob, "data": data}, ("predictions",))
    assert str(info.value).startswith("gbdt-predict: ") and message in str(info.value)


def test_predict_with_a_model_without_feature_names_uses_all_but_the_label() -> None:
    import xgboost as xgb

    booster = xgb.train(
        {"nthread": 1, "objective": "reg:squarederror"}, xgb.DMatrix([[1.0], [2.0]], label=[0.0, 1.0]), 2
    )
    raw = bytes(booster.save_raw(raw_format="json"))
    got = call(gbdt_predict, {"label": "y"}, {"model": raw, "data": b"f0,y\n1,0\n2,1\n"}, ("predictions",))
    assert got["predictions"].decode().split()[0] == "score" and len(got["predictions"].decode().split()) == 3
