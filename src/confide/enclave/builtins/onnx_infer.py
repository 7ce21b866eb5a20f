"""Built-in onnx-infer v1 (all-in-enclave mode): run an ONNX model with ONNX Runtime on the CPU.

Inputs: ``model`` (an ONNX model, decrypted from its sealed file by the enclave) and ``data``
(a NumPy ``.npz`` archive with one array per model input, named as the model names them; or a
``.npy`` array for a model with exactly one input). Output: ``outputs``, an ``.npz`` archive of
every model output (or of ``params.outputs``, a list of output names). ``params.mode`` may only be
``all-in-enclave`` (the default); on the platform this module is the built-in ``infer``.

Runs in the sandbox child like any party's function: the model is hostile input to the data owner
and the data to the model owner. ONNX Runtime is imported here, in the child (it cannot be
pre-imported in the zygote: importing it starts a thread, and the zygote must stay single-threaded
to fork safely), with one intra-op and one inter-op thread, sequential execution, no spinning and
the CPU provider only; its memory is capped by the sandbox's memory limit. Arrays are read with
``allow_pickle=False``; dtypes and ranks must match the model's declared inputs.
"""

from typing import Any


def run(ctx: Any) -> None:
    import io

    import numpy as np  # only inside the sandbox child, never in the enclave process
    import onnxruntime as ort

    unknown = sorted(set(ctx.params) - {"outputs", "mode"})
    if unknown:
        raise ValueError(f"onnx-infer: unknown parameter(s) {', '.join(unknown)}")
    mode = ctx.params.get("mode", "all-in-enclave")
    if mode != "all-in-enclave":
        raise ValueError(
            f"onnx-infer: mode {str(mode)[:40]!r} is not available here (all-in-enclave is; the "
            "outsourced modes need the accelerator channel, which platform tasks do not have yet)"
        )
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
