"""The logistic-regression-train, logistic-regression-predict and pca built-ins in a real enclave
worker: results agree with scikit-learn fitted here and with numpy's SVD on the same union of the
inputs; bad parameters, hostile model JSON, a cohort below min_rows and a non-numeric cell are
refused with the clause named; the approval text says what leaves; the SDK helpers build the task."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest

from confide.client import ml_tasks
from confide.client.approval import describe_manifest
from confide.client.manifest_build import build_manifest
from confide.enclave import manifest as mf
from confide.enclave.builtins import numeric_ml
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity
from confide.enclave.sandbox.context import Context

LAB = Identity.generate("lab")
A = Identity.generate("bank-a")
B = Identity.generate("bank-b")
PARTIES = {"lab": LAB.public, "a": A.public, "b": B.public}
OWNERS = {"a": A, "b": B, "model": B, "data": A}
TRAIN, PREDICT = "logistic-regression-train", "logistic-regression-predict"


def table(seed: int, n: int, classes: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [1.0, 3.0, 0.5] + [0.0, 10.0, -2.0]
    score = x @ [1.2, -0.4, 2.0] + rng.normal(size=n)
    if classes == 2:
        label: Any = (score > np.median(score)).astype(int)
    else:
        low, high = np.quantile(score, [0.3, 0.7])
        label = np.where(score > high, "high", np.where(score < low, "low", "mid"))
    frame = pd.DataFrame(x, columns=["x1", "x2", "x3"]).round(6)
    frame.insert(0, "id", [f"c{seed}-{i}" for i in range(n)])
    frame["y"] = label
    return frame


def csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def run(kit, name: str, tables: dict[str, bytes], params: dict, outputs: tuple[str, ...]):
    return kit.run_builtin(
        name, tables, params, owners=OWNERS, creator=LAB, outputs=outputs, participants=PARTIES
    )


def refused(kit, name: str, tables: dict[str, bytes], params: dict, outputs: tuple[str, ...]) -> str:
    result, _body, outs = run(kit, name, tables, params, outputs)
    assert not result["ok"] and result["category"] == "exception", result
    return kit.read(outs["_error"], LAB).decode()


def sklearn_fit(frame: pd.DataFrame, features: list[str], *, C: float = 1.0, standardize: bool = True):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = frame[features].to_numpy(dtype=float)
    scaler = StandardScaler(with_mean=standardize, with_std=standardize).fit(x)
    model = LogisticRegression(C=C, max_iter=100).fit(scaler.transform(x), frame["y"])
    return scaler, model


# ---- logistic regression ------------------------------------------------------------------------


def test_binary_training_agrees_with_scikit_learn_and_predictions_follow(kit) -> None:
    fa, fb = table(1, 300), table(2, 200)
    result, body, outs = run(
        kit, TRAIN, {"a": csv(fa), "b": csv(fb)}, {"label": "y", "exclude": ["id"]}, ("model", "report")
    )
    assert result["ok"], body
    model = json.loads(kit.read(outs["model"], LAB))
    both = pd.concat([fa, fb], ignore_index=True)
    scaler, direct = sklearn_fit(both, ["x1", "x2", "x3"])
    assert (model["format"], model["version"], model["features"]) == (
        "confide.logistic-regression",
        1,
        ["x1", "x2", "x3"],
    )
    assert model["classes"] == [0, 1]
    np.testing.assert_allclose(model["coef"], direct.coef_, atol=1e-6)
    np.testing.assert_allclose(model["intercept"], direct.intercept_, atol=1e-6)
    np.testing.assert_allclose(model["means"], scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(model["scales"], scaler.scale_, rtol=1e-12)
    report = json.loads(kit.read(outs["report"], LAB))
    assert report["rows"] == {"a": 300, "b": 200} and report["total_rows"] == 500
    counts = both["y"].value_counts()
    assert report["classes"] == [{"class": c, "count": int(counts[c])} for c in (0, 1)]
    assert report["converged"] is True and report["iterations"] == int(direct.n_iter_[0])

    fresh = table(3, 120)  # has the label column; params.label says to ignore it
    result, body, outs = run(
        kit,
        PREDICT,
        {"model": kit.read(outs["model"], LAB), "data": csv(fresh)},
        {"label": "y"},
        ("predictions",),
    )
    assert result["ok"], body
    got = pd.read_csv(io.BytesIO(kit.read(outs["predictions"], LAB)))
    assert list(got.columns) == ["probability", "class"]
    x = scaler.transform(fresh[["x1", "x2", "x3"]].to_numpy(dtype=float))
    np.testing.assert_allclose(got["probability"], direct.predict_proba(x)[:, 1], atol=1e-6)
    assert got["class"].tolist() == direct.predict(x).tolist()


def test_multiclass_text_labels_without_standardizing(kit) -> None:
    frame = table(4, 400, classes=3)
    params = {"label": "y", "features": ["x3", "x1"], "C": 0.5, "standardize": False}
    result, body, outs = run(kit, TRAIN, {"a": csv(frame)}, params, ("model",))
    assert result["ok"], body
    raw = kit.read(outs["model"], LAB)
    model = json.loads(raw)
    _scaler, direct = sklearn_fit(frame, ["x3", "x1"], C=0.5, standardize=False)
    assert model["classes"] == ["high", "low", "mid"] == direct.classes_.tolist()
    np.testing.assert_allclose(model["coef"], direct.coef_, atol=1e-6)
    np.testing.assert_allclose(model["intercept"], direct.intercept_, atol=1e-6)
    assert model["means"] == [0.0, 0.0] and model["scales"] == [1.0, 1.0]

    result, body, outs = run(
        kit, PREDICT, {"model": raw, "data": csv(frame.drop(columns=["y"]))}, {}, ("predictions",)
    )
    assert result["ok"], body
    got = pd.read_csv(io.BytesIO(kit.read(outs["predictions"], LAB)))
    assert list(got.columns) == ["probability_high", "probability_low", "probability_mid", "class"]
    x = frame[["x3", "x1"]].to_numpy(dtype=float)
    np.testing.assert_allclose(got.iloc[:, :3].to_numpy(), direct.predict_proba(x), atol=1e-6)
    assert got["class"].tolist() == direct.predict(x).tolist()


def test_a_non_numeric_cell_names_its_input_file_line_and_column(kit) -> None:
    # a quoted note spanning two lines: the bad cell's row is data row 3 but file line 5
    bad = b'id,note,x1,y\n1,ok,0.5,0\n2,"two\nlines",1.5,1\n3,x,n/a,1\n'
    good = b"id,note,x1,y\n7,a,0.1,0\n8,b,0.2,1\n"
    message = refused(
        kit, TRAIN, {"a": good, "b": bad}, {"label": "y", "exclude": ["id", "note"]}, ("model",)
    )
    assert "input 'b', line 5, column 'x1': 'n/a' is not a finite number" in message
    message = refused(kit, TRAIN, {"a": b"x1,y\n1,0\n2,0\n"}, {"label": "y"}, ("model",))
    assert "label column 'y' has 1 class(es); at least 2 are needed" in message


BAD_TRAIN = [
    ({}, "parameter 'label' (the label column's name) is required"),
    ({"label": "nope"}, "label column 'nope' is not in the header"),
    ({"label": "y", "features": ["x1"], "exclude": ["id"]}, "give either 'features' or 'exclude'"),
    ({"label": "y", "features": ["x1", "y"]}, "the label 'y' cannot also be a feature"),
    ({"label": "y", "exclude": ["zz"]}, "exclude names column(s) ['zz'] not in the header"),
    ({"label": "y", "exclude": ["id"], "C": 0}, "C must be a number in (0, 1e12]"),
    ({"label": "y", "exclude": ["id"], "C": "1"}, "C must be a number"),
    ({"label": "y", "exclude": ["id"], "max_iter": 0}, "max_iter must be an integer in 1..100000"),
    ({"label": "y", "exclude": ["id"], "standardize": "yes"}, "standardize must be true or false"),
    ({"label": "y", "penalty": "l1"}, "unknown parameter(s) penalty"),
    ({"label": "y"}, "input 'a', line 2, column 'id': 'c6-0' is not a finite number"),
]


@pytest.mark.parametrize(("params", "message"), BAD_TRAIN)
def test_bad_training_parameters_are_refused(kit, params: dict, message: str) -> None:
    assert message in refused(kit, TRAIN, {"a": csv(table(6, 30))}, params, ("model", "report"))


def _model(**change: Any) -> dict[str, Any]:
    good = {
        "format": "confide.logistic-regression",
        "version": 1,
        "label": "y",
        "features": ["x1", "x2"],
        "classes": [0, 1],
        "coef": [[0.5, -1.0]],
        "intercept": [0.1],
        "means": [0.0, 10.0],
        "scales": [1.0, 3.0],
    }
    return {**good, **change}


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


DATA = csv(table(7, 20))


HOSTILE_MODELS = [
    (b"\x80not json", "input 'model' is not JSON"),
    (b'{"format": "confide.logistic-regression", "format": "x"}', "field 'format' appears twice"),
    (_json(_model()).replace(b"0.1", b"NaN"), "NaN is not a number JSON allows"),
    (_json(_model()).replace(b"0.1", b"1e999"), "intercept[0] must be a finite number"),
    (b"[1, 2]", "input 'model' must be a JSON object"),
    (_json(_model(format="pickle")), "format must be 'confide.logistic-regression'"),
    (_json(_model(version=2)), "version 2 is not supported"),
    (_json(_model(version=True)), "version True is not supported"),
    (_json(_model(label="")), "label must be a column name"),
    (_json(_model(extra=1)), "unknown field(s) extra"),
    (_json({k: v for k, v in _model().items() if k != "scales"}), "field 'scales' is missing"),
    (_json(_model(features=["x1", "x1"])), "features must be a list of 1..10000 distinct column names"),
    (_json(_model(classes=[0])), "classes must be a list of 2..1000 distinct labels"),
    (_json(_model(classes=[0, "a"])), "all numbers or all text"),
    (_json(_model(classes=[1, 1.0])), "distinct labels"),
    (_json(_model(classes=[0, 10**400])), "classes must be a list"),
    (_json(_model(coef=[[0.5, -1.0], [1.0, 1.0]])), "coef must have 1 row(s) for 2 classes"),
    (_json(_model(coef=[[0.5]])), "coef[0] must be a list of 2 numbers"),
    (_json(_model(coef=[[0.5, True]])), "coef[0][1] must be a finite number"),
    (_json(_model(intercept=[])), "intercept must be a list of 1 numbers"),
    (_json(_model(scales=[1.0, 0.0])), "scales[1] must be a positive finite number"),
    (_json(_model(means="0")), "means must be a list of 2 numbers"),
    (
        _json(_model(features=["x1", "absent"])),
        "input 'data' lacks the model's feature column(s) ['absent']",
    ),
    (_json(_model(coef=[[1e308, 1e308]])), "the model's score overflows"),
]


@pytest.mark.parametrize(("model", "message"), HOSTILE_MODELS)
def test_hostile_model_json_is_refused_naming_the_field(kit, model: bytes, message: str) -> None:
    assert message in refused(kit, PREDICT, {"model": model, "data": DATA}, {}, ("predictions",))


def test_predict_parameters(kit) -> None:
    model = _json(_model())
    assert "label 'x1' is one of the model's features" in refused(
        kit, PREDICT, {"model": model, "data": DATA}, {"label": "x1"}, ("predictions",)
    )
    assert "unknown parameter(s) threshold" in refused(
        kit, PREDICT, {"model": model, "data": DATA}, {"threshold": 0.5}, ("predictions",)
    )


# ---- pca ----------------------------------------------------------------------------------------


def svd_reference(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centred = x - x.mean(axis=0)
    _u, s, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:n], (s[:n] ** 2) / (len(x) - 1), centred @ vt[:n].T


def test_pca_components_equal_numpy_svd_up_to_sign(kit) -> None:
    fa, fb = table(8, 150), table(9, 90)
    params = {"n_components": 2, "min_rows": 100, "columns": ["x1", "x2", "x3"]}
    result, body, outs = run(kit, "pca", {"a": csv(fa), "b": csv(fb)}, params, ("components", "projected"))
    assert result["ok"], body
    doc = json.loads(kit.read(outs["components"], LAB))
    x = pd.concat([fa, fb], ignore_index=True)[["x1", "x2", "x3"]].to_numpy(dtype=float)
    want, variance, scores = svd_reference(x, 2)
    signs = np.sign(np.sum(np.array(doc["components"]) * want, axis=1))
    np.testing.assert_allclose(np.array(doc["components"]) * signs[:, None], want, atol=1e-9)
    np.testing.assert_allclose(doc["explained_variance"], variance, rtol=1e-9)
    np.testing.assert_allclose(doc["mean"], x.mean(axis=0), rtol=1e-12)
    assert doc["rows"] == 240 and doc["columns"] == ["x1", "x2", "x3"] and doc["scale"] == [1.0] * 3
    total = np.var(x, axis=0, ddof=1).sum()
    np.testing.assert_allclose(doc["explained_variance_ratio"], variance / total, rtol=1e-9)
    projected = pd.read_csv(io.BytesIO(kit.read(outs["projected"], LAB)))
    assert list(projected.columns) == ["pc1", "pc2"] and len(projected) == 240
    np.testing.assert_allclose(projected.to_numpy() * signs, scores, atol=1e-9)


def test_pca_standardized_default_columns_components_only(kit) -> None:
    frame = table(10, 80).drop(columns=["id"])  # y is numeric too: a default column
    result, body, outs = run(
        kit,
        "pca",
        {"a": csv(frame)},
        {"n_components": 3, "min_rows": 2, "standardize": True},
        ("components",),
    )
    assert result["ok"], body
    doc = json.loads(kit.read(outs["components"], LAB))
    assert doc["columns"] == ["x1", "x2", "x3", "y"] and doc["standardized"] is True
    x = frame.to_numpy(dtype=float)
    want, _variance, _ = svd_reference(x / x.std(axis=0), 3)
    signs = np.sign(np.sum(np.array(doc["components"]) * want, axis=1))
    np.testing.assert_allclose(np.array(doc["components"]) * signs[:, None], want, atol=1e-9)
    np.testing.assert_allclose(doc["scale"], x.std(axis=0), rtol=1e-12)


BAD_PCA = [
    ({"n_components": 1}, "required: min_rows must be an integer in 2..1000000000"),
    ({"n_components": 1, "min_rows": 1}, "min_rows must be an integer in 2.."),
    ({"min_rows": 5}, "required: n_components must be an integer"),
    ({"n_components": 0, "min_rows": 5}, "n_components must be an integer in 1.."),
    (
        {"n_components": 4, "min_rows": 5, "columns": ["x1", "x2", "x3"]},
        "n_components must be an integer in 1..3",
    ),
    ({"n_components": 1, "min_rows": 5, "columns": ["x1", "zz"]}, "columns ['zz'] are not in the header"),
    ({"n_components": 1, "min_rows": 5, "columns": "x1"}, "columns must be a non-empty list"),
    (
        {"n_components": 1, "min_rows": 5, "columns": ["id"]},
        "line 2, column 'id': 'c11-0' is not a finite number",
    ),
    ({"n_components": 1, "min_rows": 5, "whiten": True}, "unknown parameter(s) whiten"),
    (
        {"n_components": 1, "min_rows": 31},
        "the inputs have fewer than min_rows = 31 rows: nothing is computed",
    ),
    # checked before any cell: no line number of a cohort below min_rows leaves in the error
    ({"n_components": 1, "min_rows": 31, "columns": ["id"]}, "fewer than min_rows = 31 rows"),
]


@pytest.mark.parametrize(("params", "message"), BAD_PCA)
def test_bad_pca_parameters_and_small_cohorts_are_refused(kit, params: dict, message: str) -> None:
    assert message in refused(kit, "pca", {"a": csv(table(11, 30))}, params, ("components",))


# ---- approval text and SDK helpers ----------------------------------------------------------------


def manifest(kit, function: str, params: dict, inputs: dict[str, Identity], outputs: tuple[str, ...]):
    datasets = {n: kit.dataset(owner, b"x\n1\n") for n, owner in inputs.items()}
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor(function),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput(o, (LAB.fingerprint,)) for o in outputs],
        participants=PARTIES,
    )


def test_the_approval_text_says_what_leaves_to_whom(kit) -> None:
    m = manifest(kit, TRAIN, {"label": "y", "exclude": ["id"]}, {"a": A, "b": B}, ("model", "report"))
    text, lab, a, b = (
        describe_manifest(m),
        m.name_of(LAB.fingerprint),
        m.name_of(A.fingerprint),
        m.name_of(B.fingerprint),
    )
    assert "What leaves (logistic-regression-train, enforced in the enclave):" in text
    assert "trained on the union of a, b: label 'y', every column but the label and id" in text
    assert (
        f"model -> {lab}: per class one coefficient per feature and an intercept, and each feature's mean"
        in text
    )
    assert "every class name (each distinct label value) leaves as written in the data" in text
    assert f"report -> {lab}: how many rows each input has, how many rows have each class" in text
    m = manifest(kit, PREDICT, {"label": "y"}, {"model": B, "data": A}, ("predictions",))
    text = describe_manifest(m)
    assert (
        f"the model (input model, of {b}) scores every row of input data (of {a}); column 'y' is ignored"
        in text
    )
    assert f"predictions -> {lab}: PER-ROW values" in text
    m = manifest(kit, "pca", {"n_components": 2, "min_rows": 50}, {"a": A}, ("components", "projected"))
    text = describe_manifest(m)
    assert "refused unless the inputs have at least min_rows = 50 rows" in text
    assert "every column whose cells are all numbers (which columns qualify is released too)" in text
    assert f"components -> {lab}: 2 components" in text
    assert f"projected -> {lab}: PER-ROW VALUES" in text and "min_rows does not protect them" in text
    m = manifest(kit, "pca", {"n_components": 1, "min_rows": 5, "columns": ["x1"]}, {"a": A}, ("components",))
    text = describe_manifest(m)
    assert "computed on the union of a: columns x1" in text and "projected ->" not in text
    assert "PER-ROW values" in mf.builtin_descriptor("pca").description


class _Stub:
    fingerprint = "f" * 32

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def create_task(self, **kw: Any) -> str:
        self.calls.append(kw)
        return "task-1"


def test_sdk_helpers_build_the_tasks_and_check_what_they_can() -> None:
    stub: Any = _Stub()
    assert (
        ml_tasks.logistic_regression_train(stub, inputs={"a": "ds:a"}, label="y", exclude=["id"], C=0.5)
        == "task-1"
    )
    assert stub.calls[-1] == {
        "function": TRAIN,
        "inputs": {"a": "ds:a"},
        "outputs": {"model": [stub.fingerprint], "report": [stub.fingerprint]},
        "params": {"label": "y", "exclude": ["id"], "C": 0.5},
    }
    ml_tasks.logistic_regression_predict(stub, model="ds:m", data="ds:d", label="y", recipients=["r"])
    assert stub.calls[-1]["inputs"] == {"model": "ds:m", "data": "ds:d"}
    assert stub.calls[-1]["outputs"] == {"predictions": ["r"]} and stub.calls[-1]["params"] == {"label": "y"}
    ml_tasks.pca(
        stub, inputs={"a": "ds:a"}, n_components=2, min_rows=10, outputs=("projected",), standardize=True
    )
    assert stub.calls[-1]["params"] == {"n_components": 2, "min_rows": 10, "standardize": True}
    assert stub.calls[-1]["outputs"] == {"projected": [stub.fingerprint]}
    for call, message in [
        (
            lambda: ml_tasks.pca(stub, inputs={}, n_components=2, min_rows=1),
            "min_rows must be an integer of at least 2",
        ),
        (
            lambda: ml_tasks.pca(stub, inputs={}, n_components=0, min_rows=5),
            "n_components must be an integer",
        ),
        (lambda: ml_tasks.pca(stub, inputs={}, n_components=1, min_rows=5, outputs=()), "got ['(none)']"),
        (
            lambda: ml_tasks.pca(stub, inputs={}, n_components=1, min_rows=5, outputs=("rows",)),
            "got ['rows']",
        ),
        (lambda: ml_tasks.logistic_regression_train(stub, inputs={}, label=""), "label must be"),
        (
            lambda: ml_tasks.logistic_regression_train(
                stub, inputs={}, label="y", features=["a"], exclude=["b"]
            ),
            "not both",
        ),
    ]:
        with pytest.raises(ConfideError, match=re.escape(message)):
            call()
    assert len(stub.calls) == 3


# ---- in process (coverage sees the module's lines here), checked against the sandboxed runs -------


def call(params: dict, inputs: dict[str, bytes], outputs: tuple[str, ...]) -> dict[str, bytes]:
    outs = {o: io.BytesIO() for o in outputs}
    numeric_ml.run(Context(dict(params), {n: io.BytesIO(t) for n, t in inputs.items()}, dict(outs)))  # type: ignore[arg-type]
    return {o: b.getvalue() for o, b in outs.items()}


def test_in_process_runs_match_the_sandboxed_runs(kit) -> None:
    """Equal up to the last bits of a float (the sandbox's BLAS may take another code path)."""
    tables = {"a": csv(table(12, 60)), "b": csv(table(13, 40))}
    params = {"label": "y", "exclude": ["id"], "max_iter": 3}
    result, body, outs = run(kit, TRAIN, tables, params, ("model", "report"))
    assert result["ok"], body
    here = {o: json.loads(v) for o, v in call(params, tables, ("model", "report")).items()}
    there = {o: json.loads(kit.read(outs[o], LAB)) for o in ("model", "report")}
    assert here["report"] == there["report"] and here["report"]["converged"] is False  # 3 iterations
    for key, value in here["model"].items():
        if key in ("coef", "intercept", "means", "scales"):
            np.testing.assert_allclose(value, there["model"][key], rtol=1e-12, atol=1e-15)
        else:
            assert value == there["model"][key]
    pca_params = {"n_components": 1, "min_rows": 2, "columns": ["x2"]}
    result, body, outs = run(kit, "pca", tables, pca_params, ("projected",))
    assert result["ok"], body
    mine = pd.read_csv(io.BytesIO(call(pca_params, tables, ("projected",))["projected"]))
    theirs = pd.read_csv(io.BytesIO(kit.read(outs["projected"], LAB)))
    pd.testing.assert_frame_equal(mine, theirs, rtol=1e-12)


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ({"a": b"x1,y\n1,0\n"}, ("result",), "outputs ['result'] are those of none of"),
        ({}, ("model",), "logistic-regression-train: no inputs"),
        ({"a": b"x1,y\n1,0\n", "b": b"x1,z\n1,0\n"}, ("model",), "input 'b' has header ['x1', 'z']"),
        ({"a": b""}, ("model",), "input 'a' is empty (no header)"),
        ({"a": b"x1,x1\n1,0\n"}, ("model",), "must name every column once"),
        ({"a": b"x1,y\n1,0,3\n"}, ("model",), "input 'a', line 2: 3 fields, but the header has 2"),
        ({"a": b'x1,y\n1,"0\n'}, ("model",), "input 'a', line 2: not a readable CSV row"),
        ({"a": b"x1,y\n1,\xff\n"}, ("model",), "input 'a' is not UTF-8 text (byte 7, line 2)"),
        ({"a": b"x1,y\n1,\n"}, ("model",), "line 2, column 'y': a label must have 1..256 characters"),
        ({"a": b"y\n1\n2\n"}, ("model",), "no feature columns besides the label"),
        (
            {"a": b"x1,y\n" + b"".join(b"%d,c%d\n" % (i, i) for i in range(1001))},
            ("model",),
            "label column 'y' has 1001 classes; at most 1000",
        ),
        ({"a": b"id,name\na,b\nc,d\n"}, ("components",), "pca: no column holds only numbers"),
    ],
)
def test_in_process_refusals(inputs: dict[str, bytes], outputs: tuple[str, ...], message: str) -> None:
    params = {"label": "y"} if "model" in outputs else {"n_components": 1, "min_rows": 2}
    with pytest.raises(ValueError) as info:
        call(params, inputs, outputs)
    assert message in str(info.value)


def test_in_process_predict_multiclass_numeric_classes() -> None:
    model = _model(classes=[1, 2.5, 7], coef=[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], intercept=[0.0, 0.0, 0.0])
    out = call({}, {"model": _json(model), "data": b"x2,x1\n10,0\n10,5\n13,0\n"}, ("predictions",))
    lines = out["predictions"].decode().splitlines()
    assert lines[0] == "probability_1,probability_2.5,probability_7,class"
    assert [line.rsplit(",", 1)[1] for line in lines[1:]] == ["1", "2.5", "7"]


@pytest.mark.parametrize(
    ("inputs", "params", "outputs", "message"),
    [({"a": csv(table(6, 30))}, p, ("model", "report"), m) for p, m in BAD_TRAIN]
    + [({"model": model, "data": DATA}, {}, ("predictions",), m) for model, m in HOSTILE_MODELS]
    + [({"a": csv(table(11, 30))}, p, ("components",), m) for p, m in BAD_PCA],
)
def test_in_process_gives_the_sandboxed_refusals(
    inputs: dict[str, bytes], params: dict, outputs: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        call(params, inputs, outputs)
    assert message in str(info.value)


def test_in_process_pca_components_match_the_sandboxed_run(kit) -> None:
    tables = {"a": csv(table(14, 50))}
    params = {"n_components": 2, "min_rows": 10, "standardize": True}
    result, body, outs = run(kit, "pca", tables, params, ("components",))
    assert result["ok"], body
    here = json.loads(call(params, tables, ("components",))["components"])
    there = json.loads(kit.read(outs["components"], LAB))
    assert here.keys() == there.keys() and here["columns"] == there["columns"] == ["x1", "x2", "x3", "y"]
    for key in ("mean", "scale", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_allclose(here[key], there[key], rtol=1e-9, atol=1e-12)
