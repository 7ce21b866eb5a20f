"""The built-in onnx-infer called as run(ctx) in this process (in the sandbox child it is compiled as
"<function>", invisible to coverage): results equal ONNX Runtime's own, and hostile models, arrays and
parameters fail with the built-in's error. tests/test_infer_onnx.py runs it sandboxed."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from confide.enclave.builtins import onnx_infer
from confide.enclave.sandbox.context import Context
from infer_support import mlp, ort_run

MODEL = mlp(1, (8, 6, 3))


def npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy(arr: Any, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def call(params: dict[str, Any], model: bytes, data: bytes) -> dict[str, Any]:
    out = io.BytesIO()
    ctx = Context(dict(params), {"model": io.BytesIO(model), "data": io.BytesIO(data)}, {"outputs": out})  # type: ignore[dict-item]
    onnx_infer.run(ctx)
    with np.load(io.BytesIO(out.getvalue()), allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


X = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)


def test_npz_and_npy_inputs_give_onnx_runtimes_result() -> None:
    (want,) = ort_run(MODEL, {"x": X})
    got = call({}, MODEL, npz(x=X))
    assert list(got) == ["y"] and np.array_equal(got["y"], want)
    assert np.array_equal(call({"outputs": ["y"]}, MODEL, npy(X))["y"], want)


@pytest.mark.parametrize(
    ("params", "model", "data", "message"),
    [
        ({"threads": 4}, MODEL, npz(x=X), "unknown parameter(s) threads"),
        ({}, b"not a model", npz(x=X), "input 'model' is not a model ONNX Runtime can load"),
        ({}, MODEL, b"PK\x03\x04 broken", "input 'data' is not a .npy/.npz file"),
        ({}, MODEL, npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "is not a .npy/.npz file"),
        ({}, MODEL, npz(z=X), "input 'data' has arrays ['z'], the model takes ['x']"),
        ({}, MODEL, npz(x=X, extra=X), "has arrays ['extra', 'x']"),
        ({}, MODEL, npz(x=X.astype(np.float64)), "array 'x' is float64, the model takes tensor(float)"),
        ({}, MODEL, npz(x=X[:, :7]), "array 'x' has shape (5, 7)"),
        ({}, MODEL, npz(x=X[0]), "array 'x' has shape (8,)"),
        ({"outputs": []}, MODEL, npz(x=X), "params.outputs must be a non-empty list of ['y']"),
        ({"outputs": ["h0"]}, MODEL, npz(x=X), "params.outputs must be a non-empty list"),
        ({"outputs": "y"}, MODEL, npz(x=X), "params.outputs must be a non-empty list"),
    ],
)
def test_hostile_models_arrays_and_parameters_are_refused(
    params: dict[str, Any], model: bytes, data: bytes, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        call(params, model, data)
    assert str(info.value).startswith("onnx-infer: ") and message in str(info.value)
