"""The built-in functions gbdt-train v1 and gbdt-predict v1, run as tasks in a real enclave worker
(sandboxed like any party's function)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import xgboost

from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.keys import Identity

LAB = Identity.generate("lab")
HOSP_A = Identity.generate("hospital-a")
HOSP_B = Identity.generate("hospital-b")
PARTIES = {"lab": LAB.public, "hospital_a": HOSP_A.public, "hospital_b": HOSP_B.public}


def table(seed: int, n: int = 120, *, regression: bool = False, columns=("x1", "x2", "x3", "y")) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = x[:, 0] * 2 + x[:, 2] if regression else (x[:, 0] - x[:, 1] > 0).astype(int)
    frame = pd.DataFrame({columns[0]: x[:, 0], columns[1]: x[:, 1], columns[2]: x[:, 2], columns[3]: y})
    return frame.to_csv(index=False, float_format="%.5f").encode()


def train(kit, datasets: dict, params: dict):
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("gbdt-train"),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput("model", (LAB.fingerprint,)), mf.TaskOutput("report", (LAB.fingerprint,))],
        participants=PARTIES,
    )
    approvals = [sign_approval(ds.owner, m) for ds in datasets.values()] + [sign_approval(LAB, m)]
    return kit.run(m, approvals, datasets)


@pytest.fixture(scope="module")
def sets(service_worker):
    kit, _ = service_worker
    return kit, {
        "a": kit.dataset(HOSP_A, table(1)),
        "b": kit.dataset(HOSP_B, table(2)),
        "ra": kit.dataset(HOSP_A, table(3, regression=True)),
        "rb": kit.dataset(HOSP_B, table(4, regression=True)),
        "odd": kit.dataset(HOSP_B, table(5, columns=("x1", "x2", "extra", "y"))),
    }


def test_train_is_deterministic_for_a_seed(sets) -> None:
    kit, d = sets
    params = {"label": "y", "rounds": 12, "max_depth": 3, "eta": 0.2, "seed": 42}
    models = []
    for _ in range(2):
        result, body, outs = train(kit, {"hospital_a": d["a"], "hospital_b": d["b"]}, params)
        assert result["ok"], body
        models.append(kit.read(outs["model"], LAB))
    assert models[0] == models[1]
    report = json.loads(kit.read(outs["report"], LAB))
    assert report["objective"] == "binary:logistic" and report["params"]["rounds"] == 12
    assert report["rows"] == {"hospital_a": 120, "hospital_b": 120} and report["total_rows"] == 240
    assert report["features"] == ["x1", "x2", "x3"] and set(report["label_balance"]) == {"0", "1"}
    importance = report["feature_importance"]  # y = x1 - x2 > 0: x3 is noise
    assert list(importance) == ["x1", "x2", "x3"] and all(v >= 0 for v in importance.values())
    assert min(importance["x1"], importance["x2"]) > importance["x3"]


def test_train_features_and_exclude_choose_the_columns(sets) -> None:
    kit, d = sets
    for params, expected in (
        ({"label": "y", "rounds": 3, "features": ["x3", "x1"]}, ["x3", "x1"]),
        ({"label": "y", "rounds": 3, "exclude": ["x2"]}, ["x1", "x3"]),
    ):
        result, body, outs = train(kit, {"hospital_a": d["a"]}, params)
        assert result["ok"], body
        assert json.loads(kit.read(outs["report"], LAB))["features"] == expected
        booster = xgboost.Booster()
        booster.load_model(bytearray(kit.read(outs["model"], LAB)))
        assert booster.feature_names == expected


def test_train_regression(sets) -> None:
    kit, d = sets
    result, body, outs = train(
        kit, {"a": d["ra"], "b": d["rb"]}, {"label": "y", "objective": "reg:squarederror", "rounds": 5}
    )
    assert result["ok"], body
    report = json.loads(kit.read(outs["report"], LAB))
    assert set(report["label_balance"]) == {"mean", "min", "max"}
    booster = xgboost.Booster()
    booster.load_model(bytearray(kit.read(outs["model"], LAB)))
    assert json.loads(booster.save_config())["learner"]["objective"]["name"] == "reg:squarederror"


@pytest.mark.parametrize(
    ("inputs", "params", "message"),
    [
        (
            ("a", "odd"),
            {"label": "y"},
            "input 'hospital_b' has header ['x1', 'x2', 'extra', 'y'], but input 'hospital_a'",
        ),
        (("a",), {}, "parameter 'label'"),
        (("a",), {"label": "nope"}, "label column 'nope' is not in the header"),
        (("a",), {"label": "y", "rounds": 0}, "rounds must be an integer"),
        (("a",), {"label": "y", "objective": "rank:pairwise"}, "is not one of"),
        (("a",), {"label": "y", "colsample": 1}, "unknown parameter(s) colsample"),
        (("ra",), {"label": "y"}, "needs labels 0 or 1"),
        (("a",), {"label": "y", "features": ["x1"], "exclude": ["x2"]}, "either 'features' or 'exclude'"),
        (("a",), {"label": "y", "features": "x1"}, "features must be a list of distinct column names"),
        (("a",), {"label": "y", "exclude": ["x9"]}, "exclude names column(s) ['x9'] not in the header"),
        (("a",), {"label": "y", "features": ["y", "x1"]}, "the label 'y' cannot also be a feature"),
        (("a",), {"label": "y", "exclude": ["x1", "x2", "x3"]}, "no feature columns besides the label"),
    ],
)
def test_train_rejects_bad_input_with_a_clear_error(sets, inputs, params, message) -> None:
    kit, d = sets
    names = {"a": "hospital_a", "odd": "hospital_b", "ra": "hospital_a"}
    result, body, outs = train(kit, {names[k]: d[k] for k in inputs}, params)
    assert result["ok"] is False and result["category"] == "exception"
    assert body["error"]["check"] == "run"
    assert message in kit.read(outs["_error"], LAB).decode()
    assert not outs["model"].exists() and not outs["report"].exists()


def test_predict_with_a_trained_model(sets) -> None:
    kit, d = sets
    result, body, outs = train(kit, {"hospital_a": d["a"], "hospital_b": d["b"]}, {"label": "y", "rounds": 6})
    assert result["ok"], body
    model = kit.read(outs["model"], LAB)
    # the lab brings the model as its own dataset; hospital a scores its data (label column included)
    model_ds = kit.dataset(LAB, model)
    scoring = table(8, n=25)
    data_ds = kit.dataset(HOSP_A, scoring)
    m = build_manifest(
        service=kit.service,
        creator=HOSP_A.public,
        function=mf.builtin_descriptor("gbdt-predict"),
        inputs=[kit.task_input("model", model_ds), kit.task_input("data", data_ds)],
        outputs=[mf.TaskOutput("predictions", (HOSP_A.fingerprint,))],
        participants=PARTIES,
    )
    result, body, outs = kit.run(
        m, [sign_approval(LAB, m), sign_approval(HOSP_A, m)], {"model": model_ds, "data": data_ds}
    )
    assert result["ok"], body
    got = pd.read_csv(io.BytesIO(kit.read(outs["predictions"], HOSP_A)))
    assert list(got.columns) == ["score"] and len(got) == 25
    booster = xgboost.Booster()
    booster.load_model(bytearray(model))
    frame = pd.read_csv(io.BytesIO(scoring))
    expect = booster.predict(xgboost.DMatrix(frame[["x1", "x2", "x3"]], feature_names=["x1", "x2", "x3"]))
    assert np.allclose(got["score"].to_numpy(), expect, atol=1e-7)


def test_predict_refuses_a_non_model(sets) -> None:
    kit, d = sets
    m = build_manifest(
        service=kit.service,
        creator=HOSP_A.public,
        function=mf.builtin_descriptor("gbdt-predict"),
        inputs=[kit.task_input("model", d["b"]), kit.task_input("data", d["a"])],
        outputs=[mf.TaskOutput("predictions", (HOSP_A.fingerprint,))],
        participants=PARTIES,
    )
    result, _body, outs = kit.run(
        m, [sign_approval(HOSP_B, m), sign_approval(HOSP_A, m)], {"model": d["b"], "data": d["a"]}
    )
    assert result["ok"] is False and result["category"] == "exception"
    assert "input 'model' is not an XGBoost model" in kit.read(outs["_error"], HOSP_A).decode()
