"""The model owner's side: the visible metadata of an ONNX model and its sealed upload file.

``model_meta`` is computed on the owner's machine from the model itself and travels in the clear in
the sealed file's header (authenticated by the header MAC, so nobody can change it unnoticed, but
readable by the host and every party): input and output names, element types and shapes (symbolic
dimensions kept as their names), the parameter count, and the FLOPs of one sample. It says how big
the model is and what it takes, not its weights or its layers; the FLOP and parameter counts do
narrow down the architecture (e.g. they identify a well-known public network).

FLOPs count a multiply-add as 2, per sample (every symbolic or zero dimension of an input set to 1):
MatMul 2·|out|·K, Gemm 2·M·N·K (+ M·N with a bias), Conv 2·|out|·(C/group)·kh·kw (+ |out| with a
bias), and |out| for every other operator.

``layout``: a model is sealed whole (``inline``, its weights inside the graph) or in ONNX's own
external-data layout (``external``: the sealed plaintext is the weights blob followed by the graph,
whose initializers name offsets into it; the graph's offset and size go into the header's
``layout``, confide.enclave.model_layout). Every inference mode takes both; ``split`` (a model
larger than the enclave's memory budget) needs ``external``. ``auto`` (the SDK's default) is
``external`` for a model over ``EXTERNAL_ABOVE`` bytes (64 MiB), else ``inline``. Converting
also turns each top-level Constant node holding a tensor into an initializer of the same name
(exporters such as paddle2onnx put every weight in one), so that its bytes are weights too.

PyTorch owners export first on their own machine::

    torch.onnx.export(model.eval(), example_input, "model.onnx", opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import helper, shape_inference

from confide.client.sealing import encrypt_file
from confide.enclave.errors import FormatError
from confide.enclave.keys import PublicIdentity
from confide.enclave.model_layout import LOCATION, Layout
from confide.enclave.sealed_file import DEFAULT_CHUNK_SIZE, SealedHeader

META_FORMAT = "confide-onnx-meta-v1"
KIND = "onnx-model"
LAYOUTS = ("auto", "inline", "external")
EXTERNAL_ABOVE = 64 << 20
SMALL_TENSOR = 1024  # tensors below this many bytes stay in the graph (shapes, axes, scalars)


def _dims(t: onnx.TypeProto) -> list[int | str]:
    out: list[int | str] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return out


def _value(v: onnx.ValueInfoProto) -> dict[str, Any]:
    elem = v.type.tensor_type.elem_type
    return {
        "name": v.name,
        "dtype": helper.tensor_dtype_to_np_dtype(elem).name if elem else "?",
        "shape": _dims(v.type),
    }


def load(data: bytes, *, where: str = "model") -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise FormatError(f"not a valid ONNX model ({type(exc).__name__}: {exc})", where=where) from None
    return model


def _shape_of(shapes: dict[str, list[int]], name: str) -> list[int] | None:
    return shapes.get(name)


def count_flops(model: onnx.ModelProto) -> int:
    """FLOPs of one sample (see the module docstring), from ONNX shape inference."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for v in m.graph.input:
        if v.name in inits:
            continue
        for d in v.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") or d.dim_value == 0:
                d.Clear()
                d.dim_value = 1
    inferred = shape_inference.infer_shapes(m, strict_mode=False)
    shapes: dict[str, list[int]] = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = _dims(v.type)
        if all(isinstance(d, int) for d in dims):
            shapes[v.name] = [int(d) for d in dims]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for node in inferred.graph.node:
        out = _shape_of(shapes, node.output[0]) if node.output else None
        if out is None:
            continue
        size = math.prod(out)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            a = _shape_of(shapes, node.input[0])
            total += 2 * size * (a[-1] if a else 1)
        elif node.op_type == "Gemm":
            a = _shape_of(shapes, node.input[0])
            k = (a[0] if attrs.get("transA", 0) else a[-1]) if a else 1
            total += 2 * size * k + (size if len(node.input) > 2 and node.input[2] else 0)
        elif node.op_type == "Conv":
            w = _shape_of(shapes, node.input[1])
            per = math.prod(w[1:]) if w else 1
            total += 2 * size * per + (size if len(node.input) > 2 and node.input[2] else 0)
        else:
            total += size
    return int(total)


def _parameters(g: onnx.GraphProto) -> int:
    """Elements of the initializers and of floating-point Constant nodes (exporters such as
    paddle2onnx put every weight in a Constant node; integer constants are shapes and axes)."""
    total = sum(math.prod(t.dims) for t in g.initializer)
    floats = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    }
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    total += math.prod(a.t.dims)
    return int(total)


def model_meta(data: bytes, *, where: str = "model") -> dict[str, Any]:
    """The visible metadata of an ONNX model (see the module docstring)."""
    model = load(data, where=where)
    g = model.graph
    inits = {t.name for t in g.initializer}
    return {
        "format": META_FORMAT,
        "inputs": [_value(v) for v in g.input if v.name not in inits],
        "outputs": [_value(v) for v in g.output],
        "parameters": _parameters(g),
        "flops_per_sample": count_flops(model),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "bytes": len(data),
    }


def seal_model(
    src: Path,
    dst: Path,
    *,
    recipients: Sequence[PublicIdentity],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SealedHeader:
    """Seal an ONNX file (CNFSEAL1) with its metadata in the header; the model is checked first."""
    try:
        data = Path(src).read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read model ({exc.strerror})", where=str(src)) from None
    meta = model_meta(data, where=str(src))
    return encrypt_file(
        Path(src),
        Path(dst),
        recipients=recipients,
        metadata={"kind": KIND, "model": meta},
        chunk_size=chunk_size,
    )


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Each top-level Constant node with a tensor ``value`` becomes an initializer of its output's
    name (the same graph: a Constant's output is a constant tensor either way)."""
    if model.ir_version < 4:  # initializers must then be graph inputs too: left as they are
        return
    keep = []
    for n in model.graph.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and set(attrs) == {"value"}:
            t = onnx.TensorProto()
            t.CopyFrom(attrs["value"].t)
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def external_layout(data: bytes, *, where: str = "model") -> tuple[bytes, dict[str, Any]]:
    """The model in the external-weights layout, written by onnx's own external-data writer:
    (plaintext = weights blob + graph, the header's ``layout``). The graph is checked as the
    enclave will check it (confide.enclave.infer.split.SplitGraph)."""
    import tempfile

    from confide.enclave.infer.split import SplitError, SplitGraph

    model = load(data, where=where)
    _constants_to_initializers(model)
    with tempfile.TemporaryDirectory(prefix="confide-model-") as tmp:
        onnx.save_model(
            model,
            str(Path(tmp) / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=LOCATION,
            size_threshold=SMALL_TENSOR,
        )
        blob = Path(tmp) / LOCATION
        weights = blob.read_bytes() if blob.exists() else b""
        graph = (Path(tmp) / "model.onnx").read_bytes()
    layout = Layout(len(weights), len(weights), len(graph))
    try:
        SplitGraph(graph, layout)
    except SplitError as exc:
        raise FormatError(f"cannot be put in the external-weights layout ({exc})", where=where) from None
    return weights + graph, layout.to_json()


def upload_parts(data: bytes, *, layout: str = "auto", where: str = "model") -> tuple[bytes, dict[str, Any]]:
    """What an upload seals: (plaintext, header metadata ``{"kind", "model"[, "layout"]}``)."""
    if layout not in LAYOUTS:
        raise FormatError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}", where=where)
    meta = model_meta(data, where=where)
    if layout == "inline" or (layout == "auto" and len(data) <= EXTERNAL_ABOVE):
        return data, {"kind": KIND, "model": meta}
    plaintext, external = external_layout(data, where=where)
    return plaintext, {"kind": KIND, "model": meta, "layout": external}
