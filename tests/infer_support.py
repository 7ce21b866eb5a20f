"""Small real ONNX models for the inference tests, built with onnx.helper (no download)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(graph: onnx.GraphProto) -> bytes:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="confide-tests")
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m.SerializeToString()


def mlp(seed: int = 0, sizes: tuple[int, ...] = (32, 64, 48, 10), *, gemm: bool = True) -> bytes:
    """An MLP: Gemm (or MatMul + Add) layers with ReLU between, Softmax at the end. Input x (N, sizes[0])."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "x"
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
        b = (rng.normal(size=(n,)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"h{i}"
        if gemm:
            nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [out], name=f"fc{i}"))
        else:
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [out + "m"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [out + "m", f"b{i}"], [out], name=f"bias{i}"))
        cur = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [cur + "r"], name=f"relu{i}"))
            cur = cur + "r"
    nodes.append(helper.make_node("Softmax", [cur], ["y"], axis=-1, name="softmax"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    return _model(graph)


def cnn(seed: int = 0) -> bytes:
    """Conv(1→4, 3x3, pad 1) → ReLU → MaxPool 2 → Conv(4→8, 3x3, stride 2) → ReLU → Flatten → Gemm(→10).
    Input x (N, 1, 12, 12)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(4, 1, 3, 3)) / 3).astype(np.float32)
    b1 = (rng.normal(size=(4,)) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(8, 4, 3, 3)) / 6).astype(np.float32)
    b2 = (rng.normal(size=(8,)) * 0.1).astype(np.float32)
    w3 = (rng.normal(size=(8 * 2 * 2, 10)) / np.sqrt(32)).astype(np.float32)
    b3 = (rng.normal(size=(10,)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], strides=[2, 2]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc"),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"))
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _model(graph)


def ort_run(model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
