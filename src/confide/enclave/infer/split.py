"""MazeNet-style splitting in the sandbox child: the infer built-in's ``split`` mode (issue 9).

A model larger than the enclave's memory budget runs as a sequence of submodels that each fit:

1. the graph (the model sealed in the external-weights layout, model_layout.py; the enclave
   decrypted only this part) is parsed with ``onnx`` and never given a path: every initializer
   with external data must name ``weights.bin``, lie inside the weights region and hold exactly
   its dims times its element size; no other tensor may be external. The checker runs on a copy
   whose external weights are graph inputs (onnx's checker would otherwise look for the file);
2. ONNX shape inference for the actual batch gives each tensor's size (a tensor it cannot size
   counts as the largest it could: refused below if that does not fit);
3. the nodes, in their topological order, are cut greedily into consecutive segments whose
   weights + ``ACTIVATION_FACTOR`` x the peak of live activation bytes + ``MARGIN`` fit what is left
   of the child's allowance after the imports (the enclave tells the child its allowance in
   ``params._enclave.memory_allowance``; the address-space limit is the same figure, enforced by
   the kernel); a node that does not fit alone fails the run naming it and the sizes;
4. per segment: its weights are read through the weight stream (``WeightStream``: bounded reads
   that the enclave answers from the sealed file, decrypting only those chunks) into fresh arrays,
   a submodel (inputs: the tensors it reads, weights among them; outputs: what later segments or
   the caller need) runs in ONNX Runtime with the weights *fed as inputs* (measured: ONNX
   Runtime keeps a fed array as it is, +6 MiB over 32 MiB of weights, where embedding them in the
   submodel took +70 MiB and ``add_external_initializers`` +38 MiB), and the session and the
   weights are dropped before the next segment; activations no later segment needs are dropped
   too.

The other modes read the same layout from the whole plaintext: ``weight_arrays`` (views of the
weights for ONNX Runtime, all-in-enclave) and ``inline_weights`` (a ModelProto with the weights
inline, for the outsourced executor).

The run's figures (segments, their weight and activation bytes, weight bytes read, peak memory)
are sizes of the model and the batch, nothing of the data; they go to the ``report`` output's
recipients only when the manifest names that output. The host sees the reads on the weight stream
(which byte ranges, when): the layer boundaries and each segment's duration.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from confide.enclave.model_layout import LOCATION, MAX_READ, OK, REPLY, REQUEST, Layout

MARGIN = 8 << 20  # per segment: the session, the submodel, allocator slack
ACTIVATION_FACTOR = 2  # live activations: ours, and ONNX Runtime's copies of its outputs
RESERVE = 8 << 20  # kept free of the plan: Python objects, the reply of a read, the outputs
MAX_MESSAGE = 4096


class SplitError(ValueError):
    """The model cannot be split to fit, or the weight stream failed (the run fails closed)."""


def memory_status() -> dict[str, int]:
    """This process's peak resident memory (``maxrss``, getrusage) and, where /proc is readable
    (not in the sandbox: it has no /proc), VmSize, VmPeak, VmRSS and VmHWM, in bytes."""
    out = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                key = line.split(b":", 1)[0].decode()
                if key in ("VmSize", "VmPeak", "VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def address_space_free() -> int | None:
    """Bytes of address space left under RLIMIT_AS (None without a limit), found as the kernel
    enforces it: the largest PROT_NONE anonymous mapping it grants (binary search to 1 MiB; the
    probe maps no memory and is unmapped at once)."""
    import mmap

    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    lo, hi = 0, soft >> 20  # in MiB: lo fits, hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            mmap.mmap(-1, mid << 20, flags=flags, prot=0).close()
            lo = mid
        except OSError:
            hi = mid - 1
    return lo << 20


# ---- the weight stream (the child's end) ----------------------------------------------------------


class WeightStream:
    """Reads byte ranges of the weights region from the enclave (model_layout's frames). Every reply
    is checked: its status, its length (exactly what was asked), and a refusal's message is cut."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self._r, self._w = reader, writer
        self.bytes_read = 0
        self.requests = 0

    def _exact(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            n = self._r.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise SplitError(f"onnx-infer: the weight stream ended inside {what}")
            got += n

    def read_into(self, offset: int, view: memoryview) -> None:
        head = bytearray(REPLY.size)
        at = 0
        while at < len(view):
            n = min(MAX_READ, len(view) - at)
            self._w.write(REQUEST.pack(offset + at, n))
            self._w.flush()
            self._exact(memoryview(head), "a reply header")
            status, length = REPLY.unpack(head)
            if status != OK:
                message = bytearray(min(length, MAX_MESSAGE))
                self._exact(memoryview(message), "a refusal")
                raise SplitError(
                    "onnx-infer: the enclave refused a weight read: " + message.decode("utf-8", "replace")
                )
            if length != n:
                raise SplitError(f"onnx-infer: the weight stream sent {length} bytes for a read of {n}")
            self._exact(view[at : at + n], f"the weights at {offset + at}")
            at += n
            self.requests += 1
        self.bytes_read += len(view)


# ---- the graph ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class External:
    name: str
    offset: int
    length: int
    dtype: np.dtype
    shape: tuple[int, ...]
    elem_type: int


def _external(t: Any, weights_bytes: int) -> External:
    import onnx
    from onnx import helper

    where = f"onnx-infer: input 'model': initializer {t.name!r}"
    fields = {e.key: e.value for e in t.external_data}
    if len(fields) != len(t.external_data) or not set(fields) <= {"location", "offset", "length"}:
        raise SplitError(
            f"{where} has external-data fields {sorted(fields)} (location, offset, length allowed)"
        )
    if fields.get("location") != LOCATION:
        raise SplitError(f"{where} names location {fields.get('location', '')[:60]!r}, not {LOCATION!r}")
    offset_s, length_s = fields.get("offset", "0"), fields.get("length", "")
    if not (offset_s.isdigit() and length_s.isdigit()) or len(offset_s) > 15 or len(length_s) > 15:
        raise SplitError(f"{where} has offset {offset_s[:20]!r} and length {length_s[:20]!r}")
    offset, length = int(offset_s), int(length_s)
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or t.raw_data:
        raise SplitError(f"{where}: external data of type {t.data_type} or with inline bytes too")
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    except Exception:
        raise SplitError(f"{where} has element type {t.data_type}, which is not supported") from None
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape) or dtype.itemsize == 0:
        raise SplitError(f"{where} has dims {list(shape)}")
    if length != math.prod(shape) * dtype.itemsize:
        raise SplitError(
            f"{where}: {length} bytes for dims {list(shape)} of {dtype} ({math.prod(shape) * dtype.itemsize})"
        )
    if offset > weights_bytes or length > weights_bytes - offset:
        raise SplitError(
            f"{where}: bytes {offset}..{offset + length} lie outside the weights (0..{weights_bytes})"
        )
    return External(t.name, offset, length, dtype, shape, int(t.data_type))


def _tensors_in(attr: Any) -> Iterable[Any]:
    yield from ([attr.t] if attr.HasField("t") else [])
    yield from attr.tensors
    for g in [attr.g] if attr.HasField("g") else []:
        yield from _graph_tensors(g)
    for g in attr.graphs:
        yield from _graph_tensors(g)


def _graph_tensors(g: Any) -> Iterable[Any]:
    yield from g.initializer
    for s in g.sparse_initializer:
        yield s.values
        yield s.indices
    for n in g.node:
        for a in n.attribute:
            yield from _tensors_in(a)


class SplitGraph:
    """The model's graph with its weights outside: `externals` (name -> External), `full` (the
    model with every external weight a graph input: what the checker, shape inference and ONNX
    Runtime see), `inputs` (the data inputs)."""

    def __init__(self, graph_bytes: bytes, layout: Layout) -> None:
        import onnx
        from onnx import helper

        try:
            model = onnx.load_model_from_string(graph_bytes)  # parses only: never opens a file
        except Exception as exc:
            raise SplitError(f"onnx-infer: input 'model' has no valid ONNX graph ({exc})") from None
        self.model = model
        self.externals: dict[str, External] = {}
        names = set()
        for t in model.graph.initializer:
            if t.name in names:
                raise SplitError(f"onnx-infer: input 'model': initializer {t.name!r} is defined twice")
            names.add(t.name)
            if t.data_location == onnx.TensorProto.EXTERNAL:
                self.externals[t.name] = _external(t, layout.weights_bytes)
            elif len(t.external_data):
                raise SplitError(
                    f"onnx-infer: input 'model': initializer {t.name!r} has stray external-data fields"
                )
        inline = [t for t in model.graph.initializer if t.name not in self.externals]
        nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
        others = [x for n in nodes for a in n.attribute for x in _tensors_in(a)]
        others += [x for sp in model.graph.sparse_initializer for x in (sp.values, sp.indices)]
        if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in others):
            raise SplitError("onnx-infer: input 'model': only top-level initializers may have external data")
        full = onnx.ModelProto()
        full.CopyFrom(model)  # small: the weights are not in it
        del full.graph.initializer[:]
        full.graph.initializer.extend(inline)
        declared = {v.name for v in full.graph.input}
        for e in self.externals.values():
            if e.name not in declared:
                full.graph.input.append(helper.make_tensor_value_info(e.name, e.elem_type, list(e.shape)))
        try:
            onnx.checker.check_model(full)
        except Exception as exc:
            raise SplitError(f"onnx-infer: input 'model' is not a valid ONNX model ({exc})") from None
        self.full = full
        self.inline = {t.name: t for t in inline}
        self.inputs = [v for v in model.graph.input if v.name not in names]
        self.outputs = [v.name for v in model.graph.output]
        self.weights_bytes = sum(e.length for e in self.externals.values())


def check_feeds(inputs: Iterable[Any], feeds: Mapping[str, np.ndarray]) -> None:
    """Each array's dtype and shape against the model's declared input."""
    from onnx import helper

    for v in inputs:
        arr = feeds[v.name]
        t = v.type.tensor_type
        try:
            want = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
        except Exception:
            raise SplitError(f"onnx-infer: model input {v.name!r} has element type {t.elem_type}") from None
        if arr.dtype != want:
            raise SplitError(f"onnx-infer: array {v.name!r} is {arr.dtype}, the model takes {want}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) != arr.ndim or any(
            d is not None and d != n for d, n in zip(dims, arr.shape, strict=True)
        ):
            raise SplitError(f"onnx-infer: array {v.name!r} has shape {arr.shape}, the model takes {dims}")


# ---- the other modes: the weights from the whole plaintext ---------------------------------------


def weight_arrays(g: SplitGraph, blob: bytes) -> dict[str, np.ndarray]:
    """Read-only views of the external weights in the plaintext (no copy)."""
    return {
        e.name: np.frombuffer(blob, e.dtype, math.prod(e.shape), e.offset).reshape(e.shape)
        for e in g.externals.values()
    }


def inline_weights(g: SplitGraph, blob: bytes) -> Any:
    """The model with its external weights inline (raw_data), as the outsourced executor takes it."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    for t in model.graph.initializer:
        e = g.externals.get(t.name)
        if e is not None:
            t.raw_data = blob[e.offset : e.offset + e.length]
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return model


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    weights: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    activation_bytes: int = 0
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def need(self) -> int:
        return self.weight_bytes + ACTIVATION_FACTOR * self.activation_bytes + MARGIN


def _outer_names(graph: Any) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for n in graph.node:
        used |= {i for i in n.input if i} | _subgraph_reads(n)
        defined |= set(n.output)
    return used - defined


def _subgraph_reads(node: Any) -> set[str]:
    out: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            out |= _outer_names(g)
    return out


def _shapes(g: SplitGraph, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, list[int] | None]]:
    """(element type, dims or None) of every tensor ONNX shape inference can type for this batch."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(g.full)
    for v in m.graph.input:
        if v.name in feeds:
            shape = v.type.tensor_type.shape
            shape.ClearField("dim")
            for n in feeds[v.name].shape:
                shape.dim.add().dim_value = int(n)
    try:
        inferred = shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise SplitError(f"onnx-infer: shape inference failed on input 'model' ({exc})") from None
    out: dict[str, tuple[int, list[int] | None]] = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = v.type.tensor_type
        if not t.elem_type:
            continue
        dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim]
        known = t.HasField("shape") and all(d >= 0 for d in dims)
        out[v.name] = (int(t.elem_type), dims if known else None)
    return out


def _nbytes(elem: int, dims: list[int]) -> int:
    from onnx import helper

    try:
        size = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
    except Exception:
        size = 8
    return math.prod(dims) * size


def plan(
    g: SplitGraph,
    feeds: Mapping[str, np.ndarray],
    wanted: list[str],
    available: int,
) -> tuple[list[Segment], dict[str, tuple[int, list[int] | None]]]:
    """Cut the nodes into consecutive segments that each fit `available` bytes (module docstring)."""
    nodes = list(g.full.graph.node)
    types = _shapes(g, feeds)
    for name, arr in feeds.items():
        types[name] = (types.get(name, (0, None))[0], list(arr.shape))
    sizes: dict[str, int] = {n: int(a.nbytes) for n, a in feeds.items()}
    for name, (elem, dims) in types.items():
        if name not in sizes and dims is not None:
            sizes[name] = _nbytes(elem, dims)
    reads = [[i for i in n.input if i] + sorted(_subgraph_reads(n)) for n in nodes]
    produced: dict[str, int] = {name: -1 for name in feeds}
    for k, n in enumerate(nodes):
        for o in n.output:
            if o:
                if o in produced or o in g.externals or o in g.inline:
                    raise SplitError(f"onnx-infer: input 'model': tensor {o!r} is written twice")
                produced[o] = k
    for w in wanted:
        if w not in produced or produced[w] < 0:
            raise SplitError(f"onnx-infer: output {w!r} is not computed by any node of input 'model'")
    last: dict[str, int] = {}
    for k, names in enumerate(reads):
        for name in names:
            if name not in produced and name not in g.externals and name not in g.inline:
                raise SplitError(
                    f"onnx-infer: node {nodes[k].name or k!r} reads {name!r}, which nothing defines"
                )
            last[name] = k
    for w in wanted:
        last[w] = len(nodes)
    activations = [n for n in produced if n in last]
    guess = max((sizes[n] for n in activations if n in sizes), default=0)
    live = [0] * (len(nodes) + 2)
    for name in activations:  # live from the step that makes it to the step that last reads it
        p, q = max(produced[name], 0), min(last[name], len(nodes) - 1)
        live[p] += sizes.get(name, guess)
        live[q + 1] -= sizes.get(name, guess)
    for name in produced:  # computed, never read: lives for its own step only
        if name not in last and produced[name] >= 0:
            live[produced[name]] += sizes.get(name, guess)
            live[produced[name] + 1] -= sizes.get(name, guess)
    level = 0
    at: list[int] = []
    for k in range(len(nodes)):
        level += live[k]
        at.append(level)
    segments: list[Segment] = []
    seg = Segment(0, 0)
    seen: set[str] = set()
    for k, n in enumerate(nodes):
        mine = [w for w in dict.fromkeys(reads[k]) if w in g.externals]
        alone = Segment(k, k + 1, mine, sum(g.externals[w].length for w in mine), at[k])
        if alone.need() > available:
            raise SplitError(
                f"onnx-infer: node {n.name or k!r} ({n.op_type}) does not fit the memory allowance: its "
                f"weights are {alone.weight_bytes / 2**20:.1f} MiB and the activations live around it "
                f"{at[k] / 2**20:.1f} MiB (x{ACTIVATION_FACTOR}, + {MARGIN >> 20} MiB margin), "
                f"{alone.need() / 2**20:.1f} MiB in all; {available / 2**20:.1f} MiB is free of the "
                "enclave's allowance for this run (raise memory_budget_mib)"
            )
        new = [w for w in mine if w not in seen]
        grown = Segment(
            seg.start,
            k + 1,
            seg.weights + new,
            seg.weight_bytes + sum(g.externals[w].length for w in new),
            max(seg.activation_bytes, at[k]),
        )
        if seg.end > seg.start and grown.need() > available:
            segments.append(seg)
            seg, seen = alone, set(mine)
        else:
            seg, seen = grown, seen | set(new)
    if seg.end > seg.start:
        segments.append(seg)
    for s in segments:
        inside: set[str] = set()
        ins: dict[str, None] = {}
        for k in range(s.start, s.end):
            for name in reads[k]:
                if name not in inside and name not in g.inline:
                    ins[name] = None
            inside |= {o for o in nodes[k].output if o}
        s.inputs = list(ins)
        s.outputs = [
            o for k in range(s.start, s.end) for o in nodes[k].output if o and last.get(o, -1) >= s.end
        ]
    return segments, types


# ---- the run --------------------------------------------------------------------------------------


def session_options(ort: Any) -> Any:
    """ONNX Runtime as the infer built-in runs it: one intra-op and one inter-op thread, sequential,
    no spinning (the split submodels, all-in-enclave, and the benchmarks' sandboxed baseline)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _value_info(name: str, types: Mapping[str, tuple[int, list[int] | None]], g: SplitGraph) -> Any:
    from onnx import helper

    if name in g.externals:
        e = g.externals[name]
        return helper.make_tensor_value_info(name, e.elem_type, list(e.shape))
    if name not in types or not types[name][0]:
        raise SplitError(f"onnx-infer: cannot tell the element type of tensor {name!r} of input 'model'")
    elem, dims = types[name]
    return helper.make_tensor_value_info(name, elem, dims)


def submodel(
    g: SplitGraph, seg: Segment, types: Mapping[str, tuple[int, list[int] | None]], index: int
) -> bytes:
    from onnx import helper

    nodes = list(g.full.graph.node)[seg.start : seg.end]
    used = {i for n in nodes for i in n.input} | {i for n in nodes for i in _subgraph_reads(n)}
    graph = helper.make_graph(
        nodes,
        f"segment{index}",
        [_value_info(n, types, g) for n in seg.inputs],
        [_value_info(n, types, g) for n in seg.outputs],
        [t for name, t in g.inline.items() if name in used],
    )
    m = helper.make_model(graph, opset_imports=list(g.model.opset_import), ir_version=g.model.ir_version)
    m.functions.extend(g.model.functions)
    return bytes(m.SerializeToString())


def available_memory(allowance: int, start: Mapping[str, int]) -> int:
    """What is left of the allowance for the segments: in the sandbox, the address space the
    kernel still grants under RLIMIT_AS (the enclave set it to the allowance above the child's size
    at fork, so imports, the graph and the data are already counted); elsewhere (tests) the
    allowance less the growth of VmSize since the function started. Never more than the allowance."""
    free = address_space_free()
    if free is None:
        grown = memory_status().get("VmSize", 0) - start.get("VmSize", 0)
        free = allowance - max(0, grown)
    return min(free, allowance) - RESERVE


def run_split(
    g: SplitGraph,
    feeds: dict[str, np.ndarray],
    wanted: list[str],
    stream: WeightStream,
    *,
    allowance: int,
    start: Mapping[str, int],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the model segment by segment; returns the wanted outputs and the run's figures."""
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    ort.set_default_logger_severity(3)
    available = available_memory(allowance, start)
    segments, types = plan(g, feeds, wanted, available)
    so = session_options(ort)
    so.enable_cpu_mem_arena = False  # freed when the session goes: no arena kept between segments
    env: dict[str, np.ndarray] = dict(feeds)
    lowest: list[int] = []
    needed_later: list[set[str]] = [set() for _ in segments]
    for j in range(len(segments) - 2, -1, -1):
        needed_later[j] = needed_later[j + 1] | set(segments[j + 1].inputs)
    for j, seg in enumerate(segments):
        weights: dict[str, np.ndarray] = {}
        for name in seg.weights:
            e = g.externals[name]
            arr = np.empty(e.shape, e.dtype)
            if arr.size:
                stream.read_into(e.offset, memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
            weights[name] = arr
        try:
            session = ort.InferenceSession(submodel(g, seg, types, j), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise SplitError(f"onnx-infer: segment {j} of input 'model' does not load ({exc})") from None
        missing = [n for n in seg.inputs if n not in env and n not in weights]
        if missing:
            raise SplitError(f"onnx-infer: segment {j} reads {missing[:3]}, which no earlier segment kept")
        results = session.run(seg.outputs, {**{n: env[n] for n in seg.inputs if n not in weights}, **weights})
        free = address_space_free()  # at the segment's fullest: its weights, session and results held
        if free is not None:
            lowest.append(free)
        del session, weights
        env.update(zip(seg.outputs, results, strict=True))
        del results
        keep = needed_later[j] | set(wanted)
        for name in [n for n in env if n not in keep]:
            del env[name]
    end = memory_status()
    tightest = min(lowest, default=None)
    figures = {
        "mode": "split",
        "segments": len(segments),
        "memory_allowance_bytes": allowance,
        "available_bytes": available,
        "weights_bytes": g.weights_bytes,
        "weight_bytes_read": stream.bytes_read,
        "weight_reads": stream.requests,
        "max_segment_weight_bytes": max((s.weight_bytes for s in segments), default=0),
        "max_segment_need_bytes": max((s.need() for s in segments), default=0),
        # the peak resident size above the function's start (getrusage: the high-water mark then
        # was the size at fork), and the least address space left after any segment ran
        "peak_rss_growth_bytes": end["maxrss"] - start["maxrss"],
        "least_address_space_free_bytes": tightest,
        "nodes": [[s.start, s.end] for s in segments],
        "segment_weight_bytes": [s.weight_bytes for s in segments],
        "segment_activation_bytes": [s.activation_bytes for s in segments],
    }
    return {w: env[w] for w in wanted}, figures
