"""Runs an ONNX graph in numpy inside the enclave, its MatMul/Gemm/Conv outsourced (slalom.py).

The model is hostile input to the data owner and the inputs are hostile to the model owner, so this
runs in the sandbox child. The graph is parsed and checked by the ``onnx`` library (no parser of
our own); the operators below are the ones implemented, any other is refused naming the node:

- linear, outsourced in ``outsourced-*`` modes (computed here in float64 in ``enclave`` mode):
  MatMul with a constant 2-D right operand, Gemm with a constant B (alpha, beta, transA/transB, a
  constant C), Conv (group 1, any pads/strides/dilations) through im2col;
- everything else, always here: Add, Sub, Mul, Div, Relu, Sigmoid, Tanh, Softmax, Flatten,
  Reshape (constant shape), Transpose, Identity, MaxPool/AveragePool (no padding beyond pads),
  GlobalAveragePool, and MatMul of two activations.

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
from onnx import helper, numpy_helper

from confide.enclave.errors import ConfideError, FormatError
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
LINEAR_OPS = {"MatMul", "Gemm", "Conv"}
SUPPORTED = LINEAR_OPS | {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Flatten",
    "Reshape",
    "Transpose",
    "Identity",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
}


class UnsupportedModel(FormatError):
    """The model uses something this executor does not implement."""


@dataclass
class _Linear:
    node: int
    layer: QuantLinear
    w: np.ndarray  # float64 (K, N), for enclave mode
    bias: np.ndarray | None
    conv: dict[str, Any] | None = None  # kernel, pads, strides, dilations, out channels


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
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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
        self.consts: dict[str, np.ndarray] = {}
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise UnsupportedModel(f"initializer {t.name!r} has external data", where=where)
            self.consts[t.name] = numpy_helper.to_array(t)
        self.nodes = list(g.node)
        for i, n in enumerate(self.nodes):
            if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED:
                name = n.name or f"#{i}"
                raise UnsupportedModel(
                    f"operator {n.domain or 'ai.onnx'}.{n.op_type} (node {name})", where=where
                )
            if n.op_type == "Constant":
                continue
        self.inputs = [v.name for v in g.input if v.name not in self.consts]
        self.outputs = [v.name for v in g.output]
        self.node_names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]

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
    ) -> None:
        if mode is not Mode.ENCLAVE and accelerator is None:
            raise ConfideError(f"mode {mode.value} needs an accelerator", where=graph.where)
        self.graph = graph
        self.mode = mode
        self.accelerator = accelerator
        self.linear: dict[int, _Linear] = {}
        for i, node in enumerate(graph.nodes):
            if node.op_type in LINEAR_OPS:
                lin = self._linear(i, node, bits_w)
                if lin is not None:
                    self.linear[i] = lin
        self._pads: dict[tuple[tuple[int, ...], ...], deque[dict[int, Pad]]] = {}
        self._plans: dict[tuple[tuple[int, ...], ...], dict[int, int]] = {}
        self.offline_s = 0.0
        if accelerator is not None and mode is not Mode.ENCLAVE:
            for lin in self.linear.values():
                accelerator.load(lin.layer.name, lin.layer.w_q)

    # ---- linear layers ----------------------------------------------------------------------
    def _linear(self, i: int, node: onnx.NodeProto, bits_w: int) -> _Linear | None:
        name = self.graph.node_names[i]
        c = self.graph.consts
        a = _attrs(node)
        if node.op_type == "MatMul":
            w = c.get(node.input[1])
            if w is None or w.ndim != 2:
                return None  # two activations: computed in the enclave
            w64 = w.astype(np.float64)
            return _Linear(i, QuantLinear.from_float(name, w64, None, bits_w=bits_w), w64, None)
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
            return _Linear(i, QuantLinear.from_float(name, w64, bias, bits_w=bits_w), w64, bias)
        # Conv
        w = c.get(node.input[1])
        if w is None or w.ndim != 4:
            raise UnsupportedModel(f"Conv needs a constant 4-D kernel (node {name})", where=self.graph.where)
        if int(a.get("group", 1)) != 1:
            raise UnsupportedModel(f"grouped Conv (node {name})", where=self.graph.where)
        if _s(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
            raise UnsupportedModel(f"Conv auto_pad (node {name})", where=self.graph.where)
        m, cin, kh, kw = w.shape
        w64 = w.astype(np.float64).reshape(m, cin * kh * kw).T.copy()
        bias = None
        if len(node.input) > 2 and node.input[2]:
            cb = c.get(node.input[2])
            if cb is None:
                raise UnsupportedModel(f"Conv bias must be constant (node {name})", where=self.graph.where)
            bias = cb.astype(np.float64).reshape(m)
        conv = {
            "kernel": (kh, kw),
            "cin": cin,
            "m": m,
            "pads": tuple(a.get("pads", (0, 0, 0, 0))),
            "strides": tuple(a.get("strides", (1, 1))),
            "dilations": tuple(a.get("dilations", (1, 1))),
        }
        return _Linear(i, QuantLinear.from_float(name, w64, bias, bits_w=bits_w), w64, bias, conv)

    # ---- offline phase ----------------------------------------------------------------------
    @staticmethod
    def _key(shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(shapes[k]) for k in sorted(shapes))

    def plan(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[int, int]:
        """Rows of every linear layer's product for these input shapes (one zero-input dry run)."""
        key = self._key(shapes)
        if key not in self._plans:
            rows: dict[int, int] = {}
            zeros = {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()}
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
        return {n: env[n].astype(np.float32) for n in g.outputs}, stats

    def _execute(
        self,
        inputs: dict[str, np.ndarray],
        *,
        pads: dict[int, Pad] | None = None,
        stats: RunStats | None = None,
        rows_out: dict[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}
        for name, value in self.graph.consts.items():
            env.setdefault(name, value)
        for i, node in enumerate(self.graph.nodes):
            where = f"node {self.graph.node_names[i]} ({node.op_type})"
            try:
                args = [env[n] if n else None for n in node.input]
            except KeyError as exc:
                raise FormatError(f"input {exc.args[0]!r} is computed nowhere before", where=where) from None
            lin = self.linear.get(i)
            try:
                if lin is not None:
                    out = self._run_linear(lin, args[0], pads, stats, rows_out)
                else:
                    out = _op(node, args, where)
            except (ValueError, TypeError, IndexError, ArithmeticError) as exc:
                raise FormatError(f"cannot compute ({type(exc).__name__}: {exc})", where=where) from None
                if stats is not None:
                    stats.enclave_ops += (
                        int(np.size(out))
                        * (2 if node.op_type == "MatMul" else 1)
                        * (int(np.shape(args[0])[-1]) if node.op_type == "MatMul" else 1)
                    )
            env[node.output[0]] = out
        return env

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
        if lin.conv is not None:
            if x.ndim != 4 or x.shape[1] != lin.conv["cin"]:
                raise ConfideError(f"Conv input shape {x.shape}", where=where)
            cols, out_shape = _im2col(x, lin.conv)
            x2 = cols
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
        return y2.reshape(*lead, lin.layer.n)


def _im2col(x: np.ndarray, conv: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int, int]]:
    kh, kw = conv["kernel"]
    pt, pl, pb, pr = conv["pads"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    b, c, h, w = xp.shape
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    ho, wo = (h - eh) // sh + 1, (w - ew) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ConfideError(f"Conv kernel larger than the padded input {x.shape}", where="im2col")
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))  # b,c,H',W',eh,ew
    win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :ho, :wo]  # b,c,ho,wo,kh,kw
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)
    return np.ascontiguousarray(cols), (b, ho, wo)


def _pool(x: np.ndarray, a: dict[str, Any], kind: str, where: str) -> np.ndarray:
    kh, kw = a.get("kernel_shape", (1, 1))
    sh, sw = a.get("strides", (1, 1))
    pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
    if x.ndim != 4:
        raise ConfideError(f"{kind} needs a 4-D input, not {x.shape}", where=where)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return win.max(axis=(4, 5)) if kind == "max" else win.mean(axis=(4, 5))


def _op(node: onnx.NodeProto, args: list[np.ndarray | None], where: str) -> np.ndarray:
    op = node.op_type
    a = _attrs(node)
    x = args[0]
    if x is None:
        raise FormatError("missing first input", where=where)
    y = args[1] if len(args) > 1 else None
    if op in ("Add", "Sub", "Mul", "Div", "MatMul", "Reshape") and y is None:
        raise FormatError("missing second input", where=where)
    if op == "Add":
        return x + np.asarray(y)
    if op == "Sub":
        return x - np.asarray(y)
    if op == "Mul":
        return x * np.asarray(y)
    if op == "Div":
        return x / np.asarray(y)
    if op == "Relu":
        return np.maximum(x, 0.0)
    if op == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if op == "Tanh":
        return np.tanh(x)
    if op == "Softmax":
        axis = int(a.get("axis", -1))
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)
    if op == "Identity":
        return x
    if op == "Flatten":
        axis = int(a.get("axis", 1))
        return x.reshape(math.prod(x.shape[:axis]), -1)
    if op == "Reshape":
        shape = [int(d) for d in np.asarray(y).reshape(-1)]
        shape = [x.shape[j] if d == 0 and not a.get("allowzero", 0) else d for j, d in enumerate(shape)]
        return x.reshape(shape)
    if op == "Transpose":
        perm = a.get("perm")
        return np.transpose(x, perm)
    if op == "MatMul":  # two activations
        return np.matmul(x, np.asarray(y))
    if op == "MaxPool":
        return _pool(x, a, "max", where)
    if op == "AveragePool":
        return _pool(x, a, "avg", where)
    if op == "GlobalAveragePool":
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
    raise UnsupportedModel(f"operator {op}", where=where)
