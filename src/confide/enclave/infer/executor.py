"""Runs an ONNX graph in numpy inside the enclave, its linear layers outsourced (slalom.py).

The model is hostile input to the data owner and the inputs are hostile to the model owner, so this
runs in the sandbox child. The graph is parsed and checked by the ``onnx`` library (no parser of
our own); every node is then checked by ``ops.check_node`` (operator, input count, attributes and
their values) and anything not implemented is refused naming the node:

- linear, outsourced in ``outsourced-*`` modes (computed here in float64 in ``enclave`` mode):
  MatMul with a constant 2-D right operand, Gemm with a constant B (alpha, beta, transA/transB, a
  constant C), Conv with group 1 (any pads/strides/dilations) through im2col, and ConvTranspose
  with group 1 and strides equal to its kernel (no overlap: one product, then a reshape);
- everything else, always here (ops.py): element-wise arithmetic and comparisons, Relu, Sigmoid,
  Tanh, Erf, Sqrt, Exp, HardSigmoid, HardSwish, LeakyRelu, Softmax, Clip, Cast, LayerNormalization,
  BatchNormalization (inference), ReduceSum/Mean/Max/L2, the shape operators (Shape, Constant,
  ConstantOfShape, Gather, Unsqueeze, Squeeze, Concat, Reshape, Flatten, Transpose, Slice, Expand,
  Where), Resize (nearest, asymmetric, floor), pooling, grouped/depthwise Conv and MatMul of two
  activations.

Offline phase: ``Executor.precompute(shapes, count)`` plans the row count of every linear layer for
those input shapes and draws ``count`` single-use pads per layer (masks, unblinding factors,
Freivalds vectors); ``run`` uses one, or draws one on the spot (counted as online time) when none
is left.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from confide.enclave.errors import ConfideError, FormatError
from confide.enclave.infer import ops
from confide.enclave.infer.ops import UnsupportedModel, attrs, conv_params, depthwise_conv, im2col
from confide.enclave.infer.slalom import (
    Accelerator,
    LayerStats,
    Mode,
    Pad,
    QuantLinear,
    precompute,
    run_linear,
)

MAX_NODES = 100_000
LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
SUPPORTED = set(ops.OPS) | LINEAR_OPS
__all__ = ["SUPPORTED", "Executor", "Graph", "RunStats", "UnsupportedModel"]

_INPUT_KINDS = {
    onnx.TensorProto.FLOAT: "f",
    onnx.TensorProto.DOUBLE: "f",
    onnx.TensorProto.FLOAT16: "f",
    onnx.TensorProto.INT64: "i",
    onnx.TensorProto.INT32: "i",
    onnx.TensorProto.BOOL: "b",
}
_ZERO = {"f": np.float32, "i": np.int64, "b": np.bool_}


@dataclass
class _Linear:
    node: int
    layer: QuantLinear
    w: np.ndarray  # float64 (K, N), for enclave mode
    bias: np.ndarray | None
    conv: dict[str, Any] | None = None  # kernel, pads, strides, dilations, out channels
    deconv: dict[str, Any] | None = None  # ConvTranspose: kernel, in and out channels


@dataclass
class RunStats:
    enclave_ops: int = 0
    accelerator_flops: int = 0
    freivalds_ops: int = 0
    bytes_to_accelerator: int = 0
    bytes_from_accelerator: int = 0
    outsourced_calls: int = 0
    freivalds_s: float = 0.0
    online_pad_s: float = 0.0
    accelerator_wait_s: float = 0.0
    per_layer: dict[str, LayerStats] = field(default_factory=dict)

    def enclave_share(self) -> float:
        total = self.enclave_ops + self.accelerator_flops
        return self.enclave_ops / total if total else 1.0


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return attrs(node)


class Graph:
    """A parsed, checked ONNX model: nodes in order, constants, inputs and outputs."""

    def __init__(self, model: onnx.ModelProto, *, where: str = "model") -> None:
        self.where = where
        g = model.graph
        if len(g.node) > MAX_NODES:
            raise UnsupportedModel(f"{len(g.node)} nodes (at most {MAX_NODES})", where=where)
        for op in model.opset_import:
            if op.domain not in ("", "ai.onnx"):
                raise UnsupportedModel(f"operator set {op.domain!r} is not supported", where=where)
        self.opset = 0
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                self.opset = int(op.version)
        if not 7 <= self.opset <= 22:
            raise UnsupportedModel(f"ONNX operator set {self.opset} (7 to 22 are implemented)", where=where)
        self.consts: dict[str, np.ndarray] = {}
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise UnsupportedModel(f"initializer {t.name!r} has external data", where=where)
            try:
                self.consts[t.name] = ops.norm(numpy_helper.to_array(t))
            except FormatError as exc:
                raise UnsupportedModel(f"initializer {t.name!r}: {exc.message}", where=where) from None
        self.nodes = []
        self.node_names = []
        for i, n in enumerate(g.node):
            name = n.name or f"{n.op_type}#{i}"
            ops.check_node(n, self.opset, name)
            if n.op_type == "Constant":  # folded now: a constant kernel is a constant however given
                if n.output[0] in self.consts:
                    raise FormatError(f"constant {n.output[0]!r} is defined twice", where=f"node {name}")
                try:
                    self.consts[n.output[0]] = ops.run_op(n, [], self.opset)
                except FormatError as exc:
                    raise FormatError(exc.message, where=f"node {name} (Constant)") from None
                continue
            self.nodes.append(n)
            self.node_names.append(name)
        self.inputs = [v.name for v in g.input if v.name not in self.consts]
        self.input_types: dict[str, tuple[str, tuple[int | None, ...]]] = {}
        for v in g.input:
            if v.name in self.consts:
                continue
            tt = v.type.tensor_type
            kind = _INPUT_KINDS.get(tt.elem_type)
            if kind is None:
                raise UnsupportedModel(f"input {v.name!r} has element type {tt.elem_type}", where=where)
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            self.input_types[v.name] = (kind, dims)
        self.outputs = [v.name for v in g.output]
        defined = set(self.consts) | set(self.inputs)
        for n, name in zip(self.nodes, self.node_names, strict=True):
            if n.output[0] in defined:  # single assignment: no node may overwrite a weight or an input
                raise FormatError(f"output {n.output[0]!r} is defined twice", where=f"node {name}")
            defined.add(n.output[0])
        missing = [o for o in self.outputs if o not in defined]
        if missing:
            raise FormatError(f"graph output(s) {missing} are computed by no node", where=where)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "model") -> Graph:
        try:
            model = onnx.load_model_from_string(data)
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
            raise FormatError(f"not a valid ONNX model ({type(exc).__name__}: {exc})", where=where) from None
        return cls(model, where=where)


class Executor:
    def __init__(
        self,
        graph: Graph,
        mode: Mode,
        accelerator: Accelerator | None = None,
        *,
        bits_w: int = 8,
        per_column: bool = True,
    ) -> None:
        if mode is not Mode.ENCLAVE and accelerator is None:
            raise ConfideError(f"mode {mode.value} needs an accelerator", where=graph.where)
        self.graph = graph
        self.mode = mode
        self.accelerator = accelerator
        self.linear: dict[int, _Linear] = {}
        for i, node in enumerate(graph.nodes):
            if node.op_type in LINEAR_OPS:
                lin = self._linear(i, node, bits_w, per_column)
                if lin is not None:
                    self.linear[i] = lin
        self._pads: dict[tuple[tuple[int, ...], ...], deque[dict[int, Pad]]] = {}
        self._plans: dict[tuple[tuple[int, ...], ...], dict[int, int]] = {}
        self.offline_s = 0.0
        if accelerator is not None and mode is not Mode.ENCLAVE:
            for lin in self.linear.values():
                accelerator.load(lin.layer.name, lin.layer.w_q)

    # ---- linear layers ----------------------------------------------------------------------
    def _linear(self, i: int, node: onnx.NodeProto, bits_w: int, per_column: bool) -> _Linear | None:
        name = self.graph.node_names[i]
        c = self.graph.consts
        a = _attrs(node)
        if node.op_type == "MatMul":
            w = c.get(node.input[1])
            if w is None or w.ndim != 2:
                return None  # two activations: computed in the enclave
            w64 = w.astype(np.float64)
            return _Linear(
                i, QuantLinear.from_float(name, w64, None, bits_w=bits_w, per_column=per_column), w64, None
            )
        if node.op_type == "Gemm":
            w = c.get(node.input[1])
            if w is None:
                raise UnsupportedModel(f"Gemm with a non-constant B (node {name})", where=self.graph.where)
            w64 = w.astype(np.float64)
            if a.get("transB", 0):
                w64 = w64.T
            w64 = w64 * float(a.get("alpha", 1.0))
            bias = None
            if len(node.input) > 2 and node.input[2]:
                cb = c.get(node.input[2])
                if cb is None or cb.size not in (1, w64.shape[1]):
                    raise UnsupportedModel(
                        f"Gemm C must be a constant row (node {name})", where=self.graph.where
                    )
                bias = np.broadcast_to(cb.astype(np.float64).reshape(-1), (w64.shape[1],)) * float(
                    a.get("beta", 1.0)
                )
            return _Linear(
                i, QuantLinear.from_float(name, w64, bias, bits_w=bits_w, per_column=per_column), w64, bias
            )
        w = c.get(node.input[1])
        if w is None:
            raise UnsupportedModel(
                f"{node.op_type} needs a constant kernel (node {name})", where=self.graph.where
            )
        where = f"node {name} ({node.op_type})"
        bias = None
        if len(node.input) > 2 and node.input[2]:
            cb = c.get(node.input[2])
            if cb is None:
                raise UnsupportedModel(
                    f"{node.op_type} bias must be constant (node {name})", where=self.graph.where
                )
            bias = cb.astype(np.float64).reshape(-1)
        if node.op_type == "ConvTranspose":
            return self._conv_transpose(i, name, w, bias, a, bits_w, where, per_column)
        conv = conv_params(w.shape, a, where)
        m, cin, kh, kw = w.shape
        if bias is not None and bias.shape != (m,):
            raise FormatError(f"Conv bias has {bias.size} entries for {m} channels", where=where)
        if conv["group"] != 1:
            return None  # grouped / depthwise: computed in the enclave (ops.conv_nchw)
        w64 = w.astype(np.float64).reshape(m, cin * kh * kw).T.copy()
        return _Linear(
            i, QuantLinear.from_float(name, w64, bias, bits_w=bits_w, per_column=per_column), w64, bias, conv
        )

    def _conv_transpose(
        self,
        i: int,
        name: str,
        w: np.ndarray,
        bias: np.ndarray | None,
        a: dict[str, Any],
        bits_w: int,
        where: str,
        per_column: bool,
    ) -> _Linear:
        """ConvTranspose with strides equal to the kernel and no padding: every output pixel comes
        from one input pixel, so it is one product (B·H·W, Cin) x (Cin, Cout·kh·kw) and a reshape."""
        if w.ndim != 4 or 0 in w.shape:
            raise UnsupportedModel(f"ConvTranspose kernel of shape {w.shape}", where=where)
        cin, cout, kh, kw = (int(v) for v in w.shape)
        ks = tuple(int(v) for v in a.get("kernel_shape", (kh, kw)))
        strides = tuple(int(v) for v in a.get("strides", (1, 1)))
        if (
            int(a.get("group", 1)) != 1
            or ks != (kh, kw)
            or strides != (kh, kw)
            or tuple(int(v) for v in a.get("pads", (0, 0, 0, 0))) != (0, 0, 0, 0)
            or tuple(int(v) for v in a.get("dilations", (1, 1))) != (1, 1)
            or tuple(int(v) for v in a.get("output_padding", (0, 0))) != (0, 0)
            or ops._s(a.get("auto_pad", "NOTSET")) != "NOTSET"
        ):
            raise UnsupportedModel(
                "ConvTranspose is implemented only with group 1, strides equal to the kernel, no pads, "
                f"dilations or output_padding (node {name})",
                where=where,
            )
        if bias is not None and bias.shape != (cout,):
            raise FormatError(f"ConvTranspose bias has {bias.size} entries for {cout} channels", where=where)
        w64 = w.astype(np.float64).reshape(cin, cout * kh * kw)
        full_bias = None if bias is None else np.repeat(bias, kh * kw)
        deconv = {"kernel": (kh, kw), "cin": cin, "m": cout}
        layer = QuantLinear.from_float(name, w64, full_bias, bits_w=bits_w, per_column=per_column)
        return _Linear(i, layer, w64, full_bias, None, deconv)

    # ---- offline phase ----------------------------------------------------------------------
    @staticmethod
    def _key(shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(shapes[k]) for k in sorted(shapes))

    def plan(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[int, int]:
        """Rows of every linear layer's product for these input shapes (one zero-input dry run)."""
        key = self._key(shapes)
        if key not in self._plans:
            rows: dict[int, int] = {}
            zeros = {
                n: np.zeros(s, dtype=_ZERO[self.graph.input_types[n][0]])
                if n in self.graph.input_types
                else np.zeros(s, dtype=np.float32)
                for n, s in shapes.items()
            }
            self._execute(zeros, rows_out=rows)
            self._plans[key] = rows
        return self._plans[key]

    def precompute(self, shapes: Mapping[str, tuple[int, ...]], count: int = 1) -> float:
        """Draw `count` pad sets for inputs of `shapes`; returns the seconds it took."""
        if self.mode is Mode.ENCLAVE:
            return 0.0
        t0 = time.perf_counter()
        rows = self.plan(shapes)
        pool = self._pads.setdefault(self._key(shapes), deque())
        for _ in range(count):
            pool.append(self._pad_set(rows))
        spent = time.perf_counter() - t0
        self.offline_s += spent
        return spent

    def _pad_set(self, rows: Mapping[int, int]) -> dict[int, Pad]:
        blinded = self.mode is Mode.BLINDED
        return {i: precompute(self.linear[i].layer, r, blinded=blinded) for i, r in rows.items()}

    def pads_left(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        return len(self._pads.get(self._key(shapes), ()))

    # ---- online ----------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        g = self.graph
        missing = [n for n in g.inputs if n not in inputs]
        extra = [n for n in inputs if n not in g.inputs]
        if missing or extra:
            raise ConfideError(f"inputs {sorted(inputs)} do not match the model's {g.inputs}", where=g.where)
        for n in g.inputs:
            kind, dims = g.input_types[n]
            arr = np.asarray(inputs[n])
            got = "b" if arr.dtype == np.bool_ else arr.dtype.kind.replace("u", "i")
            if got != kind:
                raise ConfideError(
                    f"input {n!r} is {arr.dtype}; the model takes {kind!r} values", where=g.where
                )
            if arr.ndim != len(dims) or any(
                d is not None and d != k for d, k in zip(dims, arr.shape, strict=True)
            ):
                raise ConfideError(
                    f"input {n!r} has shape {arr.shape}; the model takes {dims}", where=g.where
                )
            ops.check_size(arr.shape, f"input {n!r}")
        stats = RunStats()
        pads: dict[int, Pad] | None = None
        if self.mode is not Mode.ENCLAVE:
            shapes = {n: tuple(np.shape(v)) for n, v in inputs.items()}
            pool = self._pads.get(self._key(shapes))
            if pool:
                pads = pool.popleft()
            else:
                t0 = time.perf_counter()
                pads = self._pad_set(self.plan(shapes))
                stats.online_pad_s = time.perf_counter() - t0
        env = self._execute(dict(inputs), pads=pads, stats=stats)
        return {
            n: env[n].astype(np.float32) if env[n].dtype.kind == "f" else env[n] for n in g.outputs
        }, stats

    def _execute(
        self,
        inputs: dict[str, np.ndarray],
        *,
        pads: dict[int, Pad] | None = None,
        stats: RunStats | None = None,
        rows_out: dict[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {k: ops.norm(v) for k, v in inputs.items()}
        if any(v.dtype.kind == "f" and not np.all(np.isfinite(v)) for v in env.values()):
            raise ConfideError("an input is not finite (NaN or infinity)", where=self.graph.where)
        for name, value in self.graph.consts.items():
            env.setdefault(name, value)
        opset = self.graph.opset
        for i, node in enumerate(self.graph.nodes):
            where = f"node {self.graph.node_names[i]} ({node.op_type})"
            try:
                args = [env[n] if n else None for n in node.input]
            except KeyError as exc:
                raise FormatError(f"input {exc.args[0]!r} is computed nowhere before", where=where) from None
            lin = self.linear.get(i)
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    if lin is not None:
                        out = self._run_linear(lin, args[0], pads, stats, rows_out)
                    elif node.op_type in LINEAR_OPS:
                        out = self._inside_linear(node, args, where)
                    else:
                        out = ops.run_op(node, args, opset)
            except FormatError as exc:
                if exc.where:
                    raise
                raise FormatError(exc.message, where=where) from None
            except (ValueError, TypeError, IndexError, ArithmeticError, MemoryError) as exc:
                raise FormatError(f"cannot compute ({type(exc).__name__}: {exc})", where=where) from None
            if stats is not None and lin is None:
                stats.enclave_ops += _inside_cost(node, args, out)
            env[node.output[0]] = out
        return env

    def _inside_linear(self, node: onnx.NodeProto, args: list[np.ndarray | None], where: str) -> np.ndarray:
        """A linear op not outsourced: MatMul of two activations, or a grouped / depthwise Conv."""
        if node.op_type == "MatMul":
            return ops.run_op(node, args, self.graph.opset)
        if node.op_type != "Conv":
            raise UnsupportedModel(f"{node.op_type} here", where=where)
        x, w = args[0], args[1]
        if x is None or w is None:
            raise FormatError("missing input", where=where)
        x = np.asarray(x, dtype=np.float64)
        bias = args[2] if len(args) > 2 else None
        a = attrs(node)
        conv = conv_params(w.shape, a, where)
        if x.ndim != 4 or x.shape[1] != conv["cin"] * conv["group"]:
            raise FormatError(f"Conv input shape {x.shape} for kernel {w.shape}", where=where)
        if conv["cin"] == 1:
            return depthwise_conv(x, w, bias, conv)
        return ops.conv_nchw(x, w, bias, a, where)

    def _run_linear(
        self,
        lin: _Linear,
        x: np.ndarray | None,
        pads: dict[int, Pad] | None,
        stats: RunStats | None,
        rows_out: dict[int, int] | None,
    ) -> np.ndarray:
        where = f"layer {lin.layer.name}"
        if x is None:
            raise FormatError("linear layer without an input", where=where)
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ConfideError("activations are not finite (NaN or infinity)", where=where)
        if lin.conv is not None:
            if x.ndim != 4 or x.shape[1] != lin.conv["cin"]:
                raise ConfideError(f"Conv input shape {x.shape}", where=where)
            cols, out_shape = im2col(x, lin.conv)
            x2 = cols
        elif lin.deconv is not None:
            if x.ndim != 4 or x.shape[1] != lin.deconv["cin"]:
                raise ConfideError(f"ConvTranspose input shape {x.shape}", where=where)
            b, _, h, w = x.shape
            out_shape = (b, h, w)
            x2 = x.transpose(0, 2, 3, 1).reshape(b * h * w, lin.deconv["cin"])
        else:
            node = self.graph.nodes[lin.node]
            if node.op_type == "Gemm" and _attrs(node).get("transA", 0):
                x = x.T
            if x.ndim < 1 or x.shape[-1] != lin.layer.k:
                raise ConfideError(f"input shape {x.shape} does not fit weights {lin.w.shape}", where=where)
            lead = x.shape[:-1]
            x2 = x.reshape(-1, lin.layer.k)
        if rows_out is not None:
            rows_out[lin.node] = int(x2.shape[0])
        if self.mode is Mode.ENCLAVE or rows_out is not None:
            y2 = x2 @ lin.w
            if lin.bias is not None:
                y2 = y2 + lin.bias
            if stats is not None:
                stats.enclave_ops += 2 * x2.shape[0] * lin.layer.k * lin.layer.n
        else:
            assert pads is not None and self.accelerator is not None and stats is not None
            pad = pads.get(lin.node)
            if pad is None:
                raise ConfideError("no offline pad for this layer (shapes changed?)", where=where)
            y2, ls = run_linear(lin.layer, x2, self.accelerator, pad, self.mode)
            stats.enclave_ops += ls.enclave_ops
            stats.accelerator_flops += ls.accelerator_flops
            stats.freivalds_ops += ls.freivalds_ops
            stats.bytes_to_accelerator += ls.bytes_out
            stats.bytes_from_accelerator += ls.bytes_in
            stats.outsourced_calls += 1
            stats.freivalds_s += ls.extra.get("freivalds_s", 0.0)
            stats.accelerator_wait_s += ls.extra.get("accelerator_s", 0.0)
            stats.per_layer[lin.layer.name] = ls
        if lin.conv is not None:
            b, ho, wo = out_shape
            return y2.reshape(b, ho, wo, lin.layer.n).transpose(0, 3, 1, 2)
        if lin.deconv is not None:
            b, h, w = out_shape
            kh, kw = lin.deconv["kernel"]
            m = lin.deconv["m"]
            y6 = y2.reshape(b, h, w, m, kh, kw).transpose(0, 3, 1, 4, 2, 5)
            return y6.reshape(b, m, h * kh, w * kw)
        return y2.reshape(*lead, lin.layer.n)


def _inside_cost(node: onnx.NodeProto, args: list[np.ndarray | None], out: np.ndarray) -> int:
    """Operations an inside node did: 2·K per output of a product, one per output element otherwise."""
    if node.op_type == "MatMul" and args[0] is not None:
        return 2 * int(out.size) * int(np.shape(args[0])[-1])
    if node.op_type == "Conv" and args[1] is not None:
        w = np.shape(args[1])
        return 2 * int(out.size) * int(math.prod(w[1:]))
    return int(out.size)
