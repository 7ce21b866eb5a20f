"""Built-in onnx-infer v1: run an ONNX model on the data, in one of three modes (``params.mode``).

Inputs: ``model`` (an ONNX model, decrypted from its sealed file by the enclave) and ``data``
(a NumPy ``.npz`` archive with one array per model input, named as the model names them; or a
``.npy`` array for a model with exactly one input). Output: ``outputs``, an ``.npz`` archive of
every model output (or of ``params.outputs``, a list of output names). On the platform this module
is the built-in ``infer``. Modes (docs/inference/):

- ``all-in-enclave`` (the default): ONNX Runtime on the CPU, nothing leaves the sandbox;
- ``outsourced-verified``: the numpy executor (enclave/infer/executor.py) with every MatMul/Gemm/
  Conv product computed by the host's accelerator on quantized activations in clear and checked
  with Freivalds' algorithm before use (integrity only);
- ``outsourced-blinded+verified``: the same with activations blinded by fresh CSPRNG masks in
  p = 2^23 + 2^21 + 7, so the accelerator sees only uniform field elements (integrity and input
  privacy). In both outsourced modes the accelerator holds the model's 8-bit weights in clear;
- ``split``: a model larger than the memory budget (sealed in the external-weights layout,
  model_layout.py) runs as submodels that each fit (enclave/infer/split.py): the enclave decrypts
  only the graph, and each segment's weights come through the weight stream (``ctx.accelerator``
  in this mode: the enclave's own model_stream.py, never the host), chunk by chunk; the run's
  figures go to the optional ``report`` output (JSON) if the manifest names it.

A model in the external-weights layout runs in every mode: the enclave passes its layout, read
from the authenticated header, and the memory allowance in ``params._enclave`` (a manifest may not
set it).

The outsourced modes read and write ``ctx.accelerator``, the byte stream to the accelerator that
the enclave opened for this run (accelerator_link.py); without one they refuse. Each reply must
arrive complete within ``params.reply_timeout_s`` (default 120 s) of its request, or the layer fails. Every frame read
from it is parsed as hostile (wire.py) and every product checked; a wrong one stops the inference
naming the layer, and no output is written (the enclave publishes outputs only of a run that ends
well). The offline phase (masks, unblinding factors r·W, Freivalds vectors) runs before any
activation is sent.

Runs in the sandbox child like any party's function: the model is hostile input to the data owner
and the data to the model owner. ONNX Runtime is imported here, in the child (it cannot be
pre-imported in the zygote: importing it starts a thread, and the zygote must stay single-threaded
to fork safely), with one intra-op and one inter-op thread, sequential execution, no spinning and
the CPU provider only; its memory is capped by the sandbox's memory limit. The executor and onnx
are pre-imported by the zygote of an enclave whose host offers an accelerator
(zygote.INFER_PREIMPORT). Arrays are read with ``allow_pickle=False``; dtypes and ranks must match
the model's declared inputs.
"""

from typing import Any, cast


def run(ctx: Any) -> None:
    import io

    import numpy as np  # only inside the sandbox child, never in the enclave process

    modes = ("all-in-enclave", "outsourced-verified", "outsourced-blinded+verified", "split")
    unknown = sorted(set(ctx.params) - {"outputs", "mode", "reply_timeout_s", "_enclave"})
    if unknown:
        raise ValueError(f"onnx-infer: unknown parameter(s) {', '.join(unknown)}")
    mode = ctx.params.get("mode", "all-in-enclave")
    if mode not in modes:
        raise ValueError(f"onnx-infer: mode {str(mode)[:40]!r} is not one of {', '.join(modes)}")
    if "reply_timeout_s" in ctx.params and mode in ("all-in-enclave", "split"):
        raise ValueError("onnx-infer: params.reply_timeout_s applies only to the outsourced modes")
    if "report" in ctx.outputs and mode != "split":
        raise ValueError("onnx-infer: output 'report' is written only in mode split")
    enclave = ctx.params.get("_enclave", {})
    if not isinstance(enclave, dict):
        raise ValueError("onnx-infer: params._enclave must be an object (the enclave fills it in)")
    layout = _layout(enclave)
    if mode == "split":
        _split(ctx, enclave, layout)
        return
    if mode != "all-in-enclave":
        _outsourced(ctx, mode, layout)  # without ONNX Runtime
        return
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    from confide.enclave.infer.split import session_options

    ort.set_default_logger_severity(3)
    so = session_options(ort)
    model_bytes = ctx.inputs["model"].read()
    weights: dict[str, Any] = {}  # an external-layout model: its weights, fed as inputs (no copy)
    if layout is not None:
        from confide.enclave.infer.split import weight_arrays

        graph = _graph(model_bytes, layout)
        weights = weight_arrays(graph, model_bytes)
        model_bytes = graph.full.SerializeToString()
    try:
        session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(f"onnx-infer: input 'model' is not a model ONNX Runtime can load ({exc})") from None
    declared = {i.name: i for i in session.get_inputs() if i.name not in weights}
    raw = ctx.inputs["data"].read()
    try:  # arrays are read eagerly, without pickle: an object array is refused here
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        arrays = {"": loaded} if isinstance(loaded, np.ndarray) else {n: loaded[n] for n in loaded.files}
    except Exception as exc:
        raise ValueError(f"onnx-infer: input 'data' is not a .npy/.npz file ({exc})") from None
    if isinstance(loaded, np.ndarray):
        if len(declared) != 1:
            raise ValueError(f"onnx-infer: a .npy input needs a one-input model (it has {sorted(declared)})")
        feeds = {next(iter(declared)): arrays[""]}
    else:
        feeds = arrays
    if set(feeds) != set(declared):
        raise ValueError(
            f"onnx-infer: input 'data' has arrays {sorted(feeds)}, the model takes {sorted(declared)}"
        )
    types = {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(bool)": np.bool_,
        "tensor(float16)": np.float16,
    }
    for name, arg in declared.items():
        arr = feeds[name]
        want = types.get(arg.type)
        if want is None or arr.dtype != want:
            raise ValueError(f"onnx-infer: array {name!r} is {arr.dtype}, the model takes {arg.type}")
        if len(arg.shape) != arr.ndim or any(
            isinstance(d, int) and d != n for d, n in zip(arg.shape, arr.shape, strict=False)
        ):
            raise ValueError(f"onnx-infer: array {name!r} has shape {arr.shape}, the model takes {arg.shape}")
    names = [o.name for o in session.get_outputs()]
    wanted = ctx.params.get("outputs", names)
    if not isinstance(wanted, list) or not wanted or any(w not in names for w in wanted):
        raise ValueError(f"onnx-infer: params.outputs must be a non-empty list of {names}")
    results = session.run(wanted, {**feeds, **weights})
    _write_outputs(ctx, dict(zip(wanted, results, strict=False)))


def _write_outputs(ctx: Any, arrays: dict[str, Any]) -> None:
    import io

    import numpy as np

    if "outputs" in ctx.outputs:  # the manifest may name only `report` (split mode)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        ctx.outputs["outputs"].write(buf.getvalue())


def _layout(enclave: dict[str, Any]) -> Any:
    """The model's external-weights layout, as the enclave read it from the sealed header; None for
    a model sealed whole (then nothing more is imported: a zygote may pre-import numpy only)."""
    if enclave.get("model_layout") is None:
        return None
    from confide.enclave.errors import ConfideError
    from confide.enclave.model_layout import from_params

    try:
        return from_params(enclave.get("model_layout"), where="params._enclave.model_layout")
    except ConfideError as exc:
        raise ValueError(f"onnx-infer: {exc}") from None


def _graph(model_bytes: bytes, layout: Any) -> Any:
    """The graph of an external-layout model given whole (all-in-enclave, outsourced)."""
    from confide.enclave.infer.split import SplitGraph

    if len(model_bytes) != layout.weights_bytes + layout.graph_bytes:
        raise ValueError(
            f"onnx-infer: input 'model' has {len(model_bytes)} bytes, its layout says "
            f"{layout.weights_bytes} + {layout.graph_bytes}"
        )
    return SplitGraph(model_bytes[layout.graph_offset :], layout)


def _split(ctx: Any, enclave: dict[str, Any], layout: Any) -> None:
    """Mode split: the model run as submodels that fit the memory allowance (infer/split.py)."""
    import json

    from confide.enclave.infer import split

    start = split.memory_status()  # before onnx, ONNX Runtime, the graph and the data
    allowance = enclave.get("memory_allowance")
    lacking = "the weight stream" if ctx.accelerator is None else "a layout" if layout is None else None
    if lacking is None and (isinstance(allowance, bool) or not isinstance(allowance, int) or allowance <= 0):
        lacking = "a memory allowance"
    if lacking is not None:
        raise ValueError(
            "onnx-infer: mode split needs the weight stream, the model's external-weights layout and "
            "the memory allowance that the enclave gives an infer task (platform tasks, a model "
            f"uploaded with --layout external); this run has no {lacking.split(' ', 1)[1]}"
        )
    graph = split.SplitGraph(ctx.inputs["model"].read(), layout)
    feeds = _read_data(ctx.inputs["data"].read(), [v.name for v in graph.inputs])
    split.check_feeds(graph.inputs, feeds)
    wanted = ctx.params.get("outputs", graph.outputs)
    if not isinstance(wanted, list) or not wanted or any(w not in graph.outputs for w in wanted):
        raise ValueError(f"onnx-infer: params.outputs must be a non-empty list of {graph.outputs}")
    results, figures = split.run_split(
        graph,
        feeds,
        list(wanted),
        split.WeightStream(*ctx.accelerator),
        allowance=cast(int, allowance),
        start=start,
    )
    _write_outputs(ctx, results)
    if "report" in ctx.outputs:  # sizes of the model and the batch only, to the report's recipients
        ctx.outputs["report"].write(json.dumps(figures, sort_keys=True).encode())


REPLY_TIMEOUT_S = 120.0  # default wait for each accelerator reply (params.reply_timeout_s)


def _read_data(raw: bytes, declared: list[str]) -> dict[str, Any]:
    """The `data` input as {model input name: array} (.npz, or .npy for a one-input model)."""
    import io

    import numpy as np

    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        arrays = {"": loaded} if isinstance(loaded, np.ndarray) else {n: loaded[n] for n in loaded.files}
    except Exception as exc:
        raise ValueError(f"onnx-infer: input 'data' is not a .npy/.npz file ({exc})") from None
    if "" in arrays:
        if len(declared) != 1:
            raise ValueError(f"onnx-infer: a .npy input needs a one-input model (it has {sorted(declared)})")
        return {declared[0]: arrays[""]}
    if set(arrays) != set(declared):
        raise ValueError(
            f"onnx-infer: input 'data' has arrays {sorted(arrays)}, the model takes {sorted(declared)}"
        )
    return arrays


def _outsourced(ctx: Any, mode: str, layout: Any = None) -> None:
    """The outsourced modes: the numpy executor, linear layers on the accelerator, every product checked."""
    if ctx.accelerator is None:  # before the imports: only an accelerator's zygote pre-imports them
        raise ValueError(
            f"onnx-infer: mode {mode} needs the accelerator stream and the enclave gave this run none"
        )

    import numpy as np
    import onnx

    from confide.enclave.infer.deadline_stream import DeadlineReader, DeadlineWriter
    from confide.enclave.infer.executor import Executor, Graph
    from confide.enclave.infer.slalom import Mode
    from confide.enclave.infer.wire import AcceleratorClient

    try:
        raw = ctx.inputs["model"].read()
        # an external-layout model: its weights put inline (the executor takes a whole ModelProto)
        model = _inline(raw, layout) if layout is not None else onnx.load_model_from_string(raw)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ValueError(f"onnx-infer: input 'model' is not a valid ONNX model ({exc})") from None
    graph = Graph(model, where="input 'model'")  # refuses operators the executor does not implement
    feeds = _read_data(ctx.inputs["data"].read(), list(graph.inputs))
    for arg in model.graph.input:
        if arg.name not in feeds:
            continue  # an initializer listed as an input
        arr = feeds[arg.name]
        t = arg.type.tensor_type
        want = {
            onnx.TensorProto.FLOAT: np.float32,
            onnx.TensorProto.INT64: np.int64,  # token ids, as a transformer takes them
            onnx.TensorProto.INT32: np.int32,
            onnx.TensorProto.BOOL: np.bool_,
        }.get(t.elem_type)
        if want is None or arr.dtype != want:
            raise ValueError(
                f"onnx-infer: array {arg.name!r} is {arr.dtype}, the model takes "
                f"{onnx.TensorProto.DataType.Name(t.elem_type).lower()}; the outsourced modes take float32, "
                "int64, int32 or bool inputs"
            )
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) != arr.ndim or any(
            d is not None and d != n for d, n in zip(dims, arr.shape, strict=True)
        ):
            raise ValueError(f"onnx-infer: array {arg.name!r} has shape {arr.shape}, the model takes {dims}")
        if arr.size == 0 or (arr.dtype.kind == "f" and not np.all(np.isfinite(arr))):
            raise ValueError(f"onnx-infer: array {arg.name!r} is empty or not finite")
    names = list(graph.outputs)
    wanted = ctx.params.get("outputs", names)
    if not isinstance(wanted, list) or not wanted or any(w not in names for w in wanted):
        raise ValueError(f"onnx-infer: params.outputs must be a non-empty list of {names}")
    timeout = ctx.params.get("reply_timeout_s", REPLY_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ValueError(
            f"onnx-infer: params.reply_timeout_s must be a number of seconds in (0, 3600], not {timeout!r}"
        )
    reader, writer = ctx.accelerator
    timed = DeadlineReader(reader, float(timeout))
    client = AcceleratorClient(cast(Any, timed), cast(Any, DeadlineWriter(writer, timed, float(timeout))))
    slalom_mode = Mode.BLINDED if mode == "outsourced-blinded+verified" else Mode.VERIFIED
    executor = Executor(graph, slalom_mode, client)  # sends the quantized weights (load)
    executor.precompute({n: tuple(a.shape) for n, a in feeds.items()}, 1)  # offline phase
    results, _stats = executor.run(feeds)  # raises naming the layer on any wrong product
    client.close()
    _write_outputs(ctx, {n: results[n] for n in wanted})


def _inline(raw: bytes, layout: Any) -> Any:
    from confide.enclave.infer.split import inline_weights

    return inline_weights(_graph(raw, layout), raw)
