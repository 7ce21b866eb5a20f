"""The numpy executor's operators that always run inside (executor.py outsources the linear ones).

The model is hostile to the data owner, so every node is checked before anything runs
(``check_node``: the operator is implemented, its input count fits, every attribute is one this
code implements with a value it accepts, one output) and every tensor it makes is checked when it
runs (shapes and indices in range, at most ``MAX_ELEMENTS`` elements, at most ``MAX_RANK``
dimensions): a graph that asks for something else is refused naming the node, never computed
approximately. Values are float64 (any float type), int64 (any integer type) or bool inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from confide.enclave.errors import FormatError

MAX_ELEMENTS = 1 << 27  # 1 GiB of float64 per tensor
MAX_RANK = 8

Args = list[np.ndarray | None]


class UnsupportedModel(FormatError):
    """The model uses something this executor does not implement."""


def norm(x: Any) -> np.ndarray:
    """A tensor in one of the three inside dtypes (float64, int64, bool)."""
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "f":
        return a.astype(np.float64, copy=False)
    raise FormatError(f"tensor of dtype {a.dtype} is not supported")


def check_size(shape: Sequence[int], what: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise FormatError(f"{what}: rank {len(dims)} (at most {MAX_RANK})")
    if any(d < 0 for d in dims):
        raise FormatError(f"{what}: negative dimension in {dims}")
    if math.prod(dims) > MAX_ELEMENTS:
        raise FormatError(f"{what}: {math.prod(dims)} elements (at most {MAX_ELEMENTS})")
    return dims


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _axis(axis: int, rank: int, what: str = "axis", *, extra: int = 0) -> int:
    r = rank + extra
    if not -r <= axis < r:
        raise FormatError(f"{what} {axis} out of range for rank {rank}")
    return axis % r if r else 0


def _ints(x: np.ndarray | None, what: str) -> list[int]:
    if x is None:
        raise FormatError(f"missing {what}")
    a = np.asarray(x)
    if a.dtype.kind not in "iu" or a.ndim > 1:
        raise FormatError(f"{what} must be a 1-D integer tensor, not {a.dtype} {a.shape}")
    return [int(v) for v in a.reshape(-1)]


def _float(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind != "f":
        raise FormatError(f"expected a float tensor, got {x.dtype}")
    return x


def _bin(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Args, dict[str, Any]], np.ndarray]:
    def op(args: Args, a: dict[str, Any]) -> np.ndarray:
        x, y = _need(args, 2)
        check_size(np.broadcast_shapes(x.shape, y.shape), "broadcast result")
        return fn(x, y)

    return op


def _need(args: Args, n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        v = args[i] if i < len(args) else None
        if v is None:
            raise FormatError(f"missing input {i}")
        out.append(v)
    return out


def _div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "f" or y.dtype.kind == "f":
        return np.asarray(x, dtype=np.float64) / y
    if np.any(y == 0):
        raise FormatError("integer division by zero")
    q = np.abs(x) // np.abs(y)  # ONNX integer Div truncates toward zero
    return np.where((x < 0) != (y < 0), -q, q)


def _pow(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = _float(x)
    return np.power(x, np.asarray(y, dtype=np.float64))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (absolute error at most 1.5e-7; float32's step at 1 is 6e-8)."""
    x = _float(x)
    s = np.sign(x)
    ax = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-ax * ax))


def _softmax(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
    (x,) = _need(args, 1)
    x = _float(x)
    axis = _axis(int(a.get("axis", -1 if opset >= 13 else 1)), x.ndim)
    if opset < 13 and axis != x.ndim - 1:
        raise UnsupportedModel(f"Softmax before opset 13 on axis {axis} of a rank-{x.ndim} input")
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _clip(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
    x = _need(args, 1)[0]
    if opset < 11:
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    else:
        lo = args[1] if len(args) > 1 and args[1] is not None else None
        hi = args[2] if len(args) > 2 and args[2] is not None else None
        for b in (lo, hi):
            if b is not None and np.size(b) != 1:
                raise FormatError("Clip bounds must be scalars")
        lo = -np.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
        hi = np.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
    out = np.clip(x, lo, hi)
    return out.astype(x.dtype) if x.dtype.kind != "f" else out


_CAST: dict[int, type] = {
    onnx.TensorProto.FLOAT: np.float64,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float64,
    onnx.TensorProto.INT8: np.int64,
    onnx.TensorProto.INT16: np.int64,
    onnx.TensorProto.INT32: np.int64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT8: np.int64,
    onnx.TensorProto.UINT16: np.int64,
    onnx.TensorProto.UINT32: np.int64,
    onnx.TensorProto.BOOL: np.bool_,
}


def _cast(args: Args, a: dict[str, Any]) -> np.ndarray:
    (x,) = _need(args, 1)
    to = _CAST[int(a["to"])]
    if to is np.int64 and x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or np.any(np.abs(x) >= 2.0**62):
            raise FormatError("Cast to an integer type of a value that is not finite or too large")
        return np.trunc(x).astype(np.int64)
    return x.astype(to)


def _constant(a: dict[str, Any]) -> np.ndarray:
    if "value" in a:
        return norm(numpy_helper.to_array(a["value"]))
    if "value_float" in a:
        return np.asarray(float(a["value_float"]), dtype=np.float64)
    if "value_floats" in a:
        return np.asarray(list(a["value_floats"]), dtype=np.float64)
    if "value_int" in a:
        return np.asarray(int(a["value_int"]), dtype=np.int64)
    if "value_ints" in a:
        return np.asarray(list(a["value_ints"]), dtype=np.int64)
    raise UnsupportedModel("Constant without a value, value_float(s) or value_int(s)")


def _shape(args: Args, a: dict[str, Any]) -> np.ndarray:
    (x,) = _need(args, 1)
    dims = list(x.shape)
    r = len(dims)
    start = int(a.get("start", 0))
    end = int(a.get("end", r))
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return np.asarray(dims[start:end], dtype=np.int64)


def _constant_of_shape(args: Args, a: dict[str, Any]) -> np.ndarray:
    shape = check_size(_ints(args[0] if args else None, "shape"), "ConstantOfShape")
    if "value" in a:
        v = norm(numpy_helper.to_array(a["value"]))
        if v.size != 1:
            raise FormatError("ConstantOfShape value must have one element")
        return np.full(shape, v.reshape(-1)[0], dtype=v.dtype)
    return np.zeros(shape, dtype=np.float64)


def _gather(args: Args, a: dict[str, Any]) -> np.ndarray:
    x, idx = _need(args, 2)
    if idx.dtype.kind not in "iu":
        raise FormatError(f"Gather indices must be integers, not {idx.dtype}")
    if x.ndim == 0:
        raise FormatError("Gather from a scalar")
    axis = _axis(int(a.get("axis", 0)), x.ndim)
    n = x.shape[axis]
    if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise FormatError(f"Gather index out of range [-{n}, {n}) on axis {axis}")
    check_size(x.shape[:axis] + idx.shape + x.shape[axis + 1 :], "Gather result")
    return np.take(x, np.where(idx < 0, idx + n, idx), axis=axis)


def _axes_arg(args: Args, a: dict[str, Any], opset: int, since: int) -> list[int] | None:
    if opset >= since:
        if "axes" in a:
            raise UnsupportedModel(f"axes is an input from opset {since}, not an attribute")
        return _ints(args[1], "axes") if len(args) > 1 and args[1] is not None else None
    return [int(v) for v in a["axes"]] if "axes" in a else None


def _unsqueeze(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
    (x,) = _need(args, 1)
    axes = _axes_arg(args, a, opset, 13)
    if not axes:
        raise FormatError("Unsqueeze needs axes")
    r = x.ndim + len(axes)
    norm_axes = sorted(_axis(v, r, "Unsqueeze axis") for v in axes)
    if len(set(norm_axes)) != len(norm_axes):
        raise FormatError("Unsqueeze axes repeat")
    shape = list(x.shape)
    for ax in norm_axes:
        shape.insert(ax, 1)
    return x.reshape(check_size(shape, "Unsqueeze result"))


def _squeeze(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
    (x,) = _need(args, 1)
    axes = _axes_arg(args, a, opset, 13)
    if axes is None:
        return np.squeeze(x)
    ax = sorted({_axis(v, x.ndim, "Squeeze axis") for v in axes})
    if any(x.shape[i] != 1 for i in ax):
        raise FormatError(f"Squeeze of a dimension that is not 1 (shape {x.shape}, axes {ax})")
    return np.squeeze(x, axis=tuple(ax))


def _concat(args: Args, a: dict[str, Any]) -> np.ndarray:
    if "axis" not in a:
        raise FormatError("Concat needs an axis")
    xs = [v for v in args if v is not None]
    if not xs:
        raise FormatError("Concat of nothing")
    r = xs[0].ndim
    if any(v.ndim != r for v in xs):
        raise FormatError("Concat inputs differ in rank")
    axis = _axis(int(a["axis"]), r)
    for v in xs:
        if v.shape[:axis] + v.shape[axis + 1 :] != xs[0].shape[:axis] + xs[0].shape[axis + 1 :]:
            raise FormatError(f"Concat input shapes {[v.shape for v in xs]} differ off axis {axis}")
    out_dtype = np.result_type(*xs)
    check_size((*xs[0].shape[:axis], sum(v.shape[axis] for v in xs), *xs[0].shape[axis + 1 :]), "Concat")
    return np.concatenate([v.astype(out_dtype, copy=False) for v in xs], axis=axis)


def _reshape(args: Args, a: dict[str, Any]) -> np.ndarray:
    x, s = _need(args, 2)
    shape = _ints(s, "Reshape shape")
    allowzero = int(a.get("allowzero", 0))
    if not allowzero:
        if any(d == 0 and j >= x.ndim for j, d in enumerate(shape)):
            raise FormatError(f"Reshape shape {shape} copies a dimension the input {x.shape} lacks")
        shape = [x.shape[j] if d == 0 else d for j, d in enumerate(shape)]
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        raise FormatError(f"Reshape shape {shape}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.size % known:
            raise FormatError(f"cannot reshape {x.shape} to {shape}")
        shape[shape.index(-1)] = x.size // known
    if math.prod(shape) != x.size:
        raise FormatError(f"cannot reshape {x.shape} to {shape}")
    return x.reshape(check_size(shape, "Reshape"))


def _flatten(args: Args, a: dict[str, Any]) -> np.ndarray:
    (x,) = _need(args, 1)
    axis = _axis(int(a.get("axis", 1)), x.ndim, extra=1)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(args: Args, a: dict[str, Any]) -> np.ndarray:
    (x,) = _need(args, 1)
    perm = a.get("perm")
    if perm is None:
        return np.transpose(x)
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(x.ndim)):
        raise FormatError(f"Transpose perm {perm} is not a permutation of rank {x.ndim}")
    return np.transpose(x, perm)


def _slice(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
    if opset < 10:
        raise UnsupportedModel("Slice before opset 10 (attributes)")
    x = _need(args, 3)[0]
    starts = _ints(args[1], "starts")
    ends = _ints(args[2], "ends")
    axes = _ints(args[3], "axes") if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4], "steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise FormatError("Slice starts, ends, axes and steps differ in length")
    index: list[slice] = [slice(None)] * x.ndim
    seen: set[int] = set()
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        ax = _axis(ax, x.ndim, "Slice axis")
        if ax in seen or sp == 0:
            raise FormatError("Slice repeats an axis or has a zero step")
        seen.add(ax)
        d = x.shape[ax]
        st = st + d if st < 0 else st
        en = en + d if en < 0 else en
        if sp > 0:
            st, en = min(max(st, 0), d), min(max(en, 0), d)
            index[ax] = slice(st, en, sp)
        else:
            st, en = min(max(st, -1), d - 1), min(max(en, -1), d - 1)
            index[ax] = slice(st, None if en < 0 else en, sp) if st >= 0 else slice(0, 0)
    return x[tuple(index)]


def _expand(args: Args, a: dict[str, Any]) -> np.ndarray:
    x, s = _need(args, 2)
    shape = _ints(s, "Expand shape")
    try:
        out = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        raise FormatError(f"cannot expand {x.shape} to {shape}") from None
    return np.broadcast_to(x, check_size(out, "Expand")).copy()


def _where(args: Args, a: dict[str, Any]) -> np.ndarray:
    c, x, y = _need(args, 3)
    if c.dtype != np.bool_:
        raise FormatError("Where condition must be bool")
    check_size(np.broadcast_shapes(c.shape, x.shape, y.shape), "Where")
    return np.where(c, x, y)


def _reduce(kind: str) -> Callable[[Args, dict[str, Any], int], np.ndarray]:
    def op(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
        (x,) = _need(args, 1)
        since = 13 if kind == "sum" else 18
        axes = _axes_arg(args, a, opset, since)
        keep = bool(int(a.get("keepdims", 1)))
        if not axes:
            if int(a.get("noop_with_empty_axes", 0)):
                return x
            ax: tuple[int, ...] = tuple(range(x.ndim))
        else:
            ax = tuple(sorted({_axis(v, x.ndim, "reduce axis") for v in axes}))
        if kind == "sum":
            return np.sum(x, axis=ax, keepdims=keep)
        xf = _float(x)
        if kind == "mean":
            return np.mean(xf, axis=ax, keepdims=keep)
        if kind == "max":
            return np.max(xf, axis=ax, keepdims=keep)
        return np.sqrt(np.sum(xf * xf, axis=ax, keepdims=keep))  # l2

    return op


def _layer_norm(args: Args, a: dict[str, Any]) -> np.ndarray:
    x, scale = _need(args, 2)
    x = _float(x)
    bias = args[2] if len(args) > 2 else None
    axis = _axis(int(a.get("axis", -1)), x.ndim)
    eps = float(a.get("epsilon", 1e-5))
    if not 0.0 <= eps < 1.0:
        raise FormatError(f"LayerNormalization epsilon {eps}")
    ax = tuple(range(axis, x.ndim))
    for name, p in (("scale", scale), ("bias", bias)):
        if p is not None:
            try:
                np.broadcast_shapes(x.shape[axis:], p.shape)
            except ValueError:
                raise FormatError(f"LayerNormalization {name} shape {p.shape} for {x.shape}") from None
            if p.ndim > x.ndim - axis:
                raise FormatError(f"LayerNormalization {name} has rank {p.ndim}")
    mean = np.mean(x, axis=ax, keepdims=True)
    d = x - mean
    var = np.mean(d * d, axis=ax, keepdims=True)
    y = d / np.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def _batch_norm(args: Args, a: dict[str, Any]) -> np.ndarray:
    x, scale, b, mean, var = _need(args, 5)
    x = _float(x)
    if int(a.get("training_mode", 0)):
        raise UnsupportedModel("BatchNormalization in training mode")
    if x.ndim < 2:
        raise FormatError(f"BatchNormalization input of rank {x.ndim}")
    c = x.shape[1]
    for name, p in (("scale", scale), ("B", b), ("mean", mean), ("var", var)):
        if p.shape != (c,):
            raise FormatError(f"BatchNormalization {name} has shape {p.shape}, the input {c} channels")
    eps = float(a.get("epsilon", 1e-5))
    if not 0.0 <= eps < 1.0:
        raise FormatError(f"BatchNormalization epsilon {eps}")
    shape = (1, c) + (1,) * (x.ndim - 2)
    k = (scale / np.sqrt(var + eps)).reshape(shape)
    return (x - mean.reshape(shape)) * k + b.reshape(shape)


def _resize(args: Args, a: dict[str, Any], opset: int) -> np.ndarray:
    if opset < 11:
        raise UnsupportedModel("Resize before opset 11")
    x = _need(args, 1)[0]
    if x.ndim != 4:
        raise UnsupportedModel(f"Resize of a rank-{x.ndim} input (4-D only)")
    scales = args[2] if len(args) > 2 else None
    sizes = args[3] if len(args) > 3 else None
    if sizes is not None and sizes.size:
        out = _ints(sizes, "sizes")
        if len(out) != 4:
            raise FormatError("Resize sizes must have 4 entries")
        sc = [o / i if i else 0.0 for o, i in zip(out, x.shape, strict=True)]
    elif scales is not None and scales.size:
        sc = [float(v) for v in np.asarray(scales, dtype=np.float64).reshape(-1)]
        if len(sc) != 4 or not all(math.isfinite(v) and v > 0 for v in sc):
            raise FormatError(f"Resize scales {sc}")
        out = [math.floor(d * s) for d, s in zip(x.shape, sc, strict=True)]
    else:
        raise FormatError("Resize needs scales or sizes")
    if out[:2] != list(x.shape[:2]):
        raise UnsupportedModel("Resize of the batch or channel dimension")
    check_size(out, "Resize result")
    res = x
    for ax in (2, 3):
        idx = np.floor(np.arange(out[ax]) / sc[ax]).astype(np.int64)
        res = np.take(res, np.minimum(idx, x.shape[ax] - 1), axis=ax)
    return res


def conv_nchw(
    x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, a: dict[str, Any], where: str
) -> np.ndarray:
    """A (grouped) 2-D convolution inside, float64, through im2col per group."""
    conv = conv_params(w.shape, a, where)
    g = conv["group"]
    if x.ndim != 4 or x.shape[1] != conv["cin"] * g:
        raise FormatError(f"Conv input shape {x.shape} for kernel {w.shape} in {g} group(s)")
    m = w.shape[0]
    mg = m // g
    outs = []
    for gi in range(g):
        xg = x[:, gi * conv["cin"] : (gi + 1) * conv["cin"]]
        cols, (b, ho, wo) = im2col(xg, conv)
        wg = w[gi * mg : (gi + 1) * mg].reshape(mg, -1).T
        outs.append((cols @ wg).reshape(b, ho, wo, mg))
    y = np.concatenate(outs, axis=3).transpose(0, 3, 1, 2)
    if bias is not None:
        y = y + bias.reshape(1, m, 1, 1)
    return y


def depthwise_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, conv: dict[str, Any]) -> np.ndarray:
    """A depthwise convolution (group = channels, one kernel each): a sum of shifted windows."""
    kh, kw = conv["kernel"]
    pt, pl, pb, pr = conv["pads"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    b, c, h, wd = x.shape[0], x.shape[1], x.shape[2] + pt + pb, x.shape[3] + pl + pr
    check_size((b, c, h, wd), "padded Conv input")
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (h - ((kh - 1) * dh + 1)) // sh + 1
    wo = (wd - ((kw - 1) * dw + 1)) // sw + 1
    if ho <= 0 or wo <= 0:
        raise FormatError(f"Conv kernel larger than the padded input {x.shape}")
    m = w.shape[0]
    check_size((b, m, ho, wo), "Conv result")
    mult = m // c
    y = np.zeros((b, m, ho, wo))
    xr = np.repeat(xp, mult, axis=1) if mult > 1 else xp
    for i in range(kh):
        for j in range(kw):
            win = xr[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            y += win * w[:, 0, i, j].reshape(1, m, 1, 1)
    if bias is not None:
        y = y + bias.reshape(1, m, 1, 1)
    return y


def conv_params(wshape: tuple[int, ...], a: dict[str, Any], where: str) -> dict[str, Any]:
    """Conv attributes checked against a constant 4-D kernel (M, C/group, kh, kw)."""
    if len(wshape) != 4 or 0 in wshape:
        raise UnsupportedModel(f"Conv needs a constant 4-D kernel, not shape {wshape}", where=where)
    m, cin, kh, kw = (int(v) for v in wshape)
    g = int(a.get("group", 1))
    if g < 1 or m % g:
        raise FormatError(f"Conv group {g} does not divide {m} output channels", where=where)
    if _s(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise UnsupportedModel(f"Conv auto_pad {_s(a.get('auto_pad'))}", where=where)
    ks = tuple(int(v) for v in a.get("kernel_shape", (kh, kw)))
    pads = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0)))
    strides = tuple(int(v) for v in a.get("strides", (1, 1)))
    dil = tuple(int(v) for v in a.get("dilations", (1, 1)))
    if ks != (kh, kw):
        raise FormatError(f"Conv kernel_shape {ks} does not match the kernel {wshape}", where=where)
    if len(pads) != 4 or any(not 0 <= p <= 1024 for p in pads):
        raise FormatError(f"Conv pads {pads}", where=where)
    if len(strides) != 2 or len(dil) != 2 or any(not 1 <= v <= 1024 for v in strides + dil):
        raise FormatError(f"Conv strides {strides} or dilations {dil}", where=where)
    return {
        "kernel": (kh, kw),
        "cin": cin,
        "m": m,
        "group": g,
        "pads": pads,
        "strides": strides,
        "dilations": dil,
    }


def im2col(x: np.ndarray, conv: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int, int]]:
    kh, kw = conv["kernel"]
    pt, pl, pb, pr = conv["pads"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    check_size((x.shape[0], x.shape[1], x.shape[2] + pt + pb, x.shape[3] + pl + pr), "padded Conv input")
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    b, c, h, w = xp.shape
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    ho, wo = (h - eh) // sh + 1, (w - ew) // sw + 1
    if ho <= 0 or wo <= 0:
        raise FormatError(f"Conv kernel larger than the padded input {x.shape}")
    check_size((b * ho * wo, c * kh * kw), "im2col")
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))  # b,c,H',W',eh,ew
    win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :ho, :wo]  # b,c,ho,wo,kh,kw
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)
    return np.ascontiguousarray(cols), (b, ho, wo)


def _pool(kind: str) -> Callable[[Args, dict[str, Any]], np.ndarray]:
    def op(args: Args, a: dict[str, Any]) -> np.ndarray:
        (x,) = _need(args, 1)
        x = _float(x)
        if x.ndim != 4:
            raise UnsupportedModel(f"{kind} pooling of a rank-{x.ndim} input (4-D only)")
        if "kernel_shape" not in a:
            raise FormatError("pooling needs kernel_shape")
        kh, kw = (int(v) for v in a["kernel_shape"])
        sh, sw = (int(v) for v in a.get("strides", (1, 1)))
        pads = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0)))
        if int(a.get("ceil_mode", 0)) or _s(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
            raise UnsupportedModel("pooling with ceil_mode or auto_pad SAME")
        if tuple(int(v) for v in a.get("dilations", (1, 1))) != (1, 1) or int(a.get("storage_order", 0)):
            raise UnsupportedModel("pooling with dilations or storage_order")
        if not (1 <= kh <= 1024 and 1 <= kw <= 1024 and 1 <= sh <= 1024 and 1 <= sw <= 1024):
            raise FormatError(f"pooling kernel {(kh, kw)} or strides {(sh, sw)}")
        if len(pads) != 4 or any(not 0 <= p < max(kh, kw) for p in pads):
            raise FormatError(f"pooling pads {pads}")
        if kind == "avg" and any(pads) and not int(a.get("count_include_pad", 0)):
            raise UnsupportedModel("AveragePool with pads and count_include_pad 0")
        pt, pl, pb, pr = pads
        fill = -np.inf if kind == "max" else 0.0
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
        if xp.shape[2] < kh or xp.shape[3] < kw:
            raise FormatError(f"pooling kernel larger than the padded input {x.shape}")
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        return win.max(axis=(4, 5)) if kind == "max" else win.mean(axis=(4, 5))

    return op


def _matmul(args: Args, a: dict[str, Any]) -> np.ndarray:
    x, y = _need(args, 2)
    if x.ndim == 0 or y.ndim == 0:
        raise FormatError("MatMul of a scalar")
    if x.shape[-1] != (y.shape[-2] if y.ndim > 1 else y.shape[0]):
        raise FormatError(f"MatMul shapes {x.shape} and {y.shape}")
    lead = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    check_size((*lead, x.shape[-2] if x.ndim > 1 else 1, y.shape[-1] if y.ndim > 1 else 1), "MatMul")
    return np.matmul(_float(x), _float(y))


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Args, dict[str, Any]], np.ndarray]:
    def op(args: Args, a: dict[str, Any]) -> np.ndarray:
        return fn(_need(args, 1)[0])

    return op


def _hard_sigmoid(args: Args, a: dict[str, Any]) -> np.ndarray:
    x = _float(_need(args, 1)[0])
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    return np.clip(alpha * x + beta, 0.0, 1.0)


def _leaky_relu(args: Args, a: dict[str, Any]) -> np.ndarray:
    x = _float(_need(args, 1)[0])
    return np.where(x >= 0, x, float(a.get("alpha", 0.01)) * x)


def _sqrt(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.sqrt(_float(x))


# op -> (implementation, takes the opset, (min inputs, max inputs), attributes it implements)
_Impl = Callable[..., np.ndarray]
OPS: dict[str, tuple[_Impl, bool, tuple[int, int], frozenset[str]]] = {}


def _reg(
    name: str, fn: _Impl, arity: tuple[int, int], attrs_: Sequence[str] = (), *, opset: bool = False
) -> None:
    OPS[name] = (fn, opset, arity, frozenset(attrs_))


for _n, _f in (
    ("Add", np.add),
    ("Sub", np.subtract),
    ("Mul", np.multiply),
    ("Div", _div),
    ("Pow", _pow),
    ("Equal", np.equal),
    ("Less", np.less),
    ("LessOrEqual", np.less_equal),
    ("Greater", np.greater),
    ("GreaterOrEqual", np.greater_equal),
    ("And", np.logical_and),
    ("Or", np.logical_or),
):
    _reg(_n, _bin(_f), (2, 2))
for _n, _g in (
    ("Relu", lambda x: np.maximum(x, 0)),
    ("Sigmoid", lambda x: 1.0 / (1.0 + np.exp(-_float(x)))),
    ("Tanh", lambda x: np.tanh(_float(x))),
    ("Erf", _erf),
    ("Sqrt", _sqrt),
    ("Exp", lambda x: np.exp(_float(x))),
    ("Neg", np.negative),
    ("Abs", np.abs),
    ("Identity", lambda x: x),
    ("Not", np.logical_not),
    ("Floor", lambda x: np.floor(_float(x))),
    ("Ceil", lambda x: np.ceil(_float(x))),
    ("HardSwish", lambda x: _float(x) * np.clip(x / 6.0 + 0.5, 0.0, 1.0)),
):
    _reg(_n, _unary(_g), (1, 1))
_reg("HardSigmoid", _hard_sigmoid, (1, 1), ("alpha", "beta"))
_reg("LeakyRelu", _leaky_relu, (1, 1), ("alpha",))
_reg("Softmax", _softmax, (1, 1), ("axis",), opset=True)
_reg("Clip", _clip, (1, 3), ("min", "max"), opset=True)
_reg("Cast", _cast, (1, 1), ("to",))
_reg(
    "Constant",
    lambda args, a: _constant(a),
    (0, 0),
    ("value", "value_float", "value_floats", "value_int", "value_ints"),
)
_reg("Shape", _shape, (1, 1), ("start", "end"))
_reg("ConstantOfShape", _constant_of_shape, (1, 1), ("value",))
_reg("Gather", _gather, (2, 2), ("axis",))
_reg("Unsqueeze", _unsqueeze, (1, 2), ("axes",), opset=True)
_reg("Squeeze", _squeeze, (1, 2), ("axes",), opset=True)
_reg("Concat", _concat, (1, 64), ("axis",))
_reg("Reshape", _reshape, (2, 2), ("allowzero",))
_reg("Flatten", _flatten, (1, 1), ("axis",))
_reg("Transpose", _transpose, (1, 1), ("perm",))
_reg("Slice", _slice, (3, 5), (), opset=True)
_reg("Expand", _expand, (2, 2))
_reg("Where", _where, (3, 3))
for _n, _k in (("ReduceSum", "sum"), ("ReduceMean", "mean"), ("ReduceMax", "max"), ("ReduceL2", "l2")):
    _reg(_n, _reduce(_k), (1, 2), ("axes", "keepdims", "noop_with_empty_axes"), opset=True)
_reg("LayerNormalization", _layer_norm, (2, 3), ("axis", "epsilon", "stash_type"))
_reg("BatchNormalization", _batch_norm, (5, 5), ("epsilon", "momentum", "training_mode", "spatial"))
_reg("Resize", _resize, (1, 4), ("mode", "coordinate_transformation_mode", "nearest_mode"), opset=True)
_reg(
    "MaxPool",
    _pool("max"),
    (1, 1),
    ("kernel_shape", "strides", "pads", "ceil_mode", "auto_pad", "dilations", "storage_order"),
)
_reg(
    "AveragePool",
    _pool("avg"),
    (1, 1),
    ("kernel_shape", "strides", "pads", "ceil_mode", "auto_pad", "count_include_pad"),
)
_reg(
    "GlobalAveragePool", _unary(lambda x: _float(x).mean(axis=tuple(range(2, x.ndim)), keepdims=True)), (1, 1)
)
_reg("MatMul", _matmul, (2, 2))
# the linear layers (executor.py outsources them; attributes checked there); Conv with group > 1 runs here
LINEAR_ATTRS = {
    "Gemm": frozenset({"alpha", "beta", "transA", "transB"}),
    "Conv": frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}),
    "ConvTranspose": frozenset(
        {"auto_pad", "dilations", "group", "kernel_shape", "output_padding", "pads", "strides"}
    ),
}
LINEAR_ARITY = {"Gemm": (2, 3), "Conv": (2, 3), "ConvTranspose": (2, 3)}


def check_node(node: onnx.NodeProto, opset: int, name: str) -> None:
    """Refuse, naming the node, anything about it this executor does not implement exactly."""
    op = node.op_type
    where = f"node {name} ({op})"
    if node.domain not in ("", "ai.onnx") or (op not in OPS and op not in LINEAR_ATTRS):
        raise UnsupportedModel(f"operator {node.domain or 'ai.onnx'}.{op} (node {name})", where=where)
    allowed = OPS[op][3] if op in OPS else LINEAR_ATTRS[op]
    lo, hi = OPS[op][2] if op in OPS else LINEAR_ARITY[op]
    a = attrs(node)
    unknown = sorted(set(a) - allowed)
    if unknown:
        raise UnsupportedModel(f"attribute(s) {', '.join(unknown)} of node {name}", where=where)
    n_in = len(node.input)
    if not lo <= n_in <= hi:
        raise FormatError(f"{n_in} inputs ({lo} to {hi} expected)", where=where)
    outs = [o for o in node.output]
    if len(outs) != 1 or not outs[0]:
        raise UnsupportedModel(f"node {name} has outputs {outs} (exactly one is implemented)", where=where)
    if op == "Cast" and int(a.get("to", -1)) not in _CAST:
        raise UnsupportedModel(f"Cast to type {a.get('to')} (node {name})", where=where)
    if op == "Resize":
        got = (
            _s(a.get("mode", "nearest")),
            _s(a.get("coordinate_transformation_mode", "half_pixel")),
            _s(a.get("nearest_mode", "round_prefer_floor")),
        )
        if got != ("nearest", "asymmetric", "floor"):
            raise UnsupportedModel(
                f"Resize {got} (node {name}): only nearest, asymmetric, floor is implemented", where=where
            )
    if op == "LayerNormalization" and int(a.get("stash_type", 1)) != 1:
        raise UnsupportedModel(f"LayerNormalization stash_type (node {name})", where=where)
    if op == "BatchNormalization" and int(a.get("training_mode", 0)):
        raise UnsupportedModel(f"BatchNormalization in training mode (node {name})", where=where)


def run_op(node: onnx.NodeProto, args: Args, opset: int) -> np.ndarray:
    fn, takes_opset, _, _ = OPS[node.op_type]
    a = attrs(node)
    out = fn(args, a, opset) if takes_opset else fn(args, a)
    return norm(out)
