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
  privacy). In both outsourced modes the accelerator holds the model's 8-bit weights in clear.

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

    modes = ("all-in-enclave", "outsourced-verified", "outsourced-blinded+verified")
    unknown = sorted(set(ctx.params) - {"outputs", "mode", "reply_timeout_s"})
    if unknown:
        raise ValueError(f"onnx-infer: unknown parameter(s) {', '.join(unknown)}")
    mode = ctx.params.get("mode", "all-in-enclave")
    if mode not in modes:
        raise ValueError(f"onnx-infer: mode {str(mode)[:40]!r} is not one of {', '.join(modes)}")
    if "reply_timeout_s" in ctx.params and mode == "all-in-enclave":
        raise ValueError("onnx-infer: params.reply_timeout_s applies only to the outsourced modes")
    if mode != "all-in-enclave":
        _outsourced(ctx, mode)  # without ONNX Runtime
        return
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(ctx.inputs["model"].read(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(f"onnx-infer: input 'model' is not a model ONNX Runtime can load ({exc})") from None
    declared = {i.name: i for i in session.get_inputs()}
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
    results = session.run(wanted, feeds)
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(wanted, results, strict=False)))
    ctx.outputs["outputs"].write(buf.getvalue())


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


def _outsourced(ctx: Any, mode: str) -> None:
    """The outsourced modes: the numpy executor, linear layers on the accelerator, every product checked."""
    if ctx.accelerator is None:  # before the imports: only an accelerator's zygote pre-imports them
        raise ValueError(
            f"onnx-infer: mode {mode} needs the accelerator stream and the enclave gave this run none"
        )
    import io

    import numpy as np
    import onnx

    from confide.enclave.infer.deadline_stream import DeadlineReader, DeadlineWriter
    from confide.enclave.infer.executor import Executor, Graph
    from confide.enclave.infer.slalom import Mode
    from confide.enclave.infer.wire import AcceleratorClient

    try:
        model = onnx.load_model_from_string(ctx.inputs["model"].read())
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
    buf = io.BytesIO()
    out: dict[str, Any] = {n: results[n] for n in wanted}
    np.savez(buf, **out)
    ctx.outputs["outputs"].write(buf.getvalue())
