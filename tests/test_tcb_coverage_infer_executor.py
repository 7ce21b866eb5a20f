"""confide.enclave.infer.executor: hostile models (foreign operator sets and domains, external data,
unsupported or malformed linear layers, undecodable bytes) are refused naming the node; the enclave's
own non-linear operators agree with NumPy references."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from confide.enclave.errors import ConfideError, FormatError
from confide.enclave.infer import ops
from confide.enclave.infer.executor import Executor, Graph, RunStats, UnsupportedModel
from confide.enclave.infer.slalom import Mode


def _graph(
    nodes: list[onnx.NodeProto],
    inits: tuple[onnx.TensorProto, ...] | list[onnx.TensorProto] = (),
    *,
    opset: str = "",
) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inits),
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid(opset, 17)])


W = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")


def test_undecodable_bytes_are_not_a_model() -> None:
    with pytest.raises(FormatError, match="not a valid ONNX model"):
        Graph.from_bytes(b"\x08\x07garbage", where="model m")


def test_foreign_operator_sets_and_domains_are_refused() -> None:
    with pytest.raises(UnsupportedModel, match="operator set 'com.evil' is not supported"):
        Graph(_graph([helper.make_node("Relu", ["x"], ["y"])], opset="com.evil"))
    node = helper.make_node("Relu", ["x"], ["y"], domain="com.microsoft", name="r")
    with pytest.raises(UnsupportedModel, match=r"operator com.microsoft.Relu \(node r\)"):
        Graph(_graph([node]))
    with pytest.raises(UnsupportedModel, match=r"node Loop#0 \(Loop\): operator ai.onnx.Loop"):
        Graph(_graph([helper.make_node("Loop", ["x"], ["y"])]))


def test_external_initializers_are_refused() -> None:
    t = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    t.data_location = TensorProto.EXTERNAL
    with pytest.raises(UnsupportedModel, match="initializer 'W' has external data"):
        Graph(_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], [t]))


@pytest.mark.parametrize(
    ("node", "inits", "message"),
    [
        (helper.make_node("Gemm", ["x", "B"], ["y"], name="g"), [], "Gemm with a non-constant B (node g)"),
        (
            helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="g"),
            [W, numpy_helper.from_array(np.ones(2, np.float32), "C")],
            "Gemm C must be a constant row (node g)",
        ),
        (
            helper.make_node("Conv", ["x", "W"], ["y"], name="c"),
            [W],
            "node c (Conv): Conv needs a constant 4-D kernel, not shape (4, 3)",
        ),
        (
            helper.make_node("Conv", ["x", "K"], ["y"], name="c", auto_pad="SAME_UPPER"),
            [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "K")],
            "node c (Conv): Conv auto_pad SAME_UPPER",
        ),
        (
            helper.make_node("Conv", ["x", "K", "bias"], ["y"], name="c"),
            [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "K")],
            "Conv bias must be constant (node c)",
        ),
    ],
)
def test_malformed_linear_layers_are_refused(
    node: onnx.NodeProto, inits: list[onnx.TensorProto], message: str
) -> None:
    with pytest.raises(UnsupportedModel, match=message.replace("(", r"\(").replace(")", r"\)")):
        Executor(Graph(_graph([node], inits)), Mode.ENCLAVE)


def test_an_outsourcing_mode_needs_an_accelerator() -> None:
    graph = Graph(_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], [W]))
    for mode in Mode:
        if mode is not Mode.ENCLAVE:
            with pytest.raises(ConfideError, match=f"mode {mode.value} needs an accelerator"):
                Executor(graph, mode)


def test_run_stats_share() -> None:
    assert RunStats().enclave_share() == 1.0
    assert RunStats(enclave_ops=1, accelerator_flops=3).enclave_share() == 0.25


RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 3, 4, 4))


def _n(op: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, ["a", "b"], ["c"], **attrs)


@pytest.mark.parametrize(
    ("node", "args", "want"),
    [
        (_n("Add"), [X, 1.0], X + 1),
        (_n("Sub"), [X, X], np.zeros_like(X)),
        (_n("Mul"), [X, 2.0], 2 * X),
        (_n("Div"), [X, 2.0], X / 2),
        (_n("Relu"), [X], np.maximum(X, 0)),
        (_n("Sigmoid"), [np.zeros(3)], np.full(3, 0.5)),
        (_n("Tanh"), [np.zeros(3)], np.zeros(3)),
        (_n("Softmax", axis=1), [np.zeros((2, 4))], np.full((2, 4), 0.25)),
        (_n("Identity"), [X], X),
        (_n("Flatten", axis=2), [X], X.reshape(6, 16)),
        (_n("Reshape"), [X, np.array([0, -1])], X.reshape(2, 48)),
        (_n("Reshape", allowzero=1), [np.zeros((0, 3)), np.array([0, 3])], np.zeros((0, 3))),
        (_n("Transpose", perm=[0, 2, 3, 1]), [X], X.transpose(0, 2, 3, 1)),
        (_n("MatMul"), [np.eye(3), np.arange(9.0).reshape(3, 3)], np.arange(9.0).reshape(3, 3)),
        (_n("GlobalAveragePool"), [X], X.mean(axis=(2, 3), keepdims=True)),
        (
            _n("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
            [X],
            X.reshape(2, 3, 2, 2, 2, 2).max(axis=(3, 5)),
        ),
        (
            _n("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
            [X],
            X.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)),
        ),
    ],
)
def test_enclave_operators_match_numpy(node: onnx.NodeProto, args: list[object], want: np.ndarray) -> None:
    got = ops.run_op(node, [np.asarray(a) for a in args], 17)
    assert got.shape == want.shape and np.allclose(got, want)


def test_missing_inputs_and_unknown_operators_are_refused() -> None:
    with pytest.raises(FormatError, match="input"):
        ops.run_op(_n("Relu"), [None], 17)
    with pytest.raises(FormatError, match="input"):
        ops.run_op(_n("Add"), [X], 17)
    assert "Loop" not in ops.OPS
    with pytest.raises(UnsupportedModel, match="max pooling of a rank-2 input"):
        ops.run_op(_n("MaxPool", kernel_shape=[2, 2]), [np.zeros((2, 3))], 17)


def test_a_kernel_larger_than_the_input_is_refused() -> None:
    conv = {"kernel": (5, 5), "pads": (0, 0, 0, 0), "strides": (1, 1), "dilations": (1, 1)}
    with pytest.raises(ConfideError, match="Conv kernel larger than the padded input"):
        ops.im2col(np.zeros((1, 1, 3, 3)), conv)
