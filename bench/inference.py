"""Protected inference benchmark (issue 9, step 1); results in bench/results/inference.json.

On one MLP (784-1024-1024-10, Gemm + ReLU, softmax; built with onnx.helper), batch 1 and 16, one
thread everywhere (ONNX Runtime intra/inter-op 1, BLAS 1):

- ``plain-ort``: ONNX Runtime in this process, float32 (the baseline);
- ``enclave-ort``: the same runtime inside the sandbox child (all-in-enclave mode, built-in
  onnx-infer's session options), timed inside the child; plus the whole sandboxed task's wall time;
- ``enclave-numpy``: the numpy executor with every layer in the enclave (float64);
- ``outsourced-verified`` / ``outsourced-blinded``: the numpy executor, MatMul/Gemm sent to the
  accelerator as an external process (python -m confide.infer.accelerator, numpy float64 BLAS)
  over pipes, every product checked with Freivalds. The executor runs in this process, not yet in
  the sandbox child (the sandbox has no accelerator channel yet).

Per mode: latency p50/p99 (ms), Freivalds time per inference, offline precompute per inference,
share of FLOPs done in the enclave, bytes moved enclave <-> accelerator per input, and accuracy
against plain ONNX Runtime (max |Δ| of the softmax outputs, top-1 agreement).

The real models (all-MiniLM-L6-v2, PP-OCRv4 det; bench/inference_models.py) go under
``real_models``: ``--only real`` measures only them and keeps the MLP figures, ``--only mlp`` the
reverse.

Usage: python bench/inference.py [--reps 200] [--only all|mlp|real] [--real-reps 20]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from common import ORT_SESSION_SRC, Sink, machine, ort_session, percentiles  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from confide.enclave.infer import wire  # noqa: E402
from confide.enclave.infer.executor import Executor, Graph  # noqa: E402
from confide.enclave.infer.slalom import Mode  # noqa: E402
from confide.enclave.sandbox import SandboxLimits, Zygote, make_input_memfd  # noqa: E402
from confide.infer.model_meta import model_meta  # noqa: E402
from infer_support import mlp  # noqa: E402

SIZES = (784, 1024, 1024, 10)

CHILD_BENCH = r"""
def run(ctx):
    import io, json, time
    import numpy as np
    s = ort_session(ctx.inputs["model"].read())
    x = np.load(io.BytesIO(ctx.inputs["data"].read()), allow_pickle=False)
    out = {}
    for b in ctx.params["batches"]:
        xb = x[:b]
        for _ in range(5):
            s.run(None, {"x": xb})
        ts = []
        for _ in range(ctx.params["reps"]):
            t = time.perf_counter(); s.run(None, {"x": xb}); ts.append(time.perf_counter() - t)
        out[str(b)] = ts
    ctx.outputs["t"].write(json.dumps(out).encode())
"""
CHILD_BENCH = ORT_SESSION_SRC + CHILD_BENCH


def timed(fn: Any, reps: int, warm: int = 5) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--only", choices=("all", "mlp", "real"), default="all")
    ap.add_argument("--real-reps", type=int, default=20, help="repetitions per real-model cell")
    ap.add_argument("--real-batches", default="1,16")
    ap.add_argument("--real-models", default="minilm,ppocr_det")
    args = ap.parse_args()
    out_path = HERE / "results" / "inference.json"
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.only == "real":
        previous["real_models"] = real_models(args)
        write(out_path, previous)
        return
    model = mlp(seed=1, sizes=SIZES)
    meta = model_meta(model)
    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(16, SIZES[0])).astype(np.float32)
    sess = ort_session(model)
    results: dict[str, Any] = {
        "machine": machine(),
        "model": {
            "sizes": list(SIZES),
            "parameters": meta["parameters"],
            "flops_per_sample": meta["flops_per_sample"],
        },
        "threads": 1,
        "batches": {},
    }
    # enclave-ort: one sandboxed task per measurement set
    zygote = Zygote.start(strict=True, preimport=("numpy", "confide.enclave.infer.split"))
    try:
        buf = io.BytesIO()
        np.save(buf, x_all)
        sink = Sink()
        t0 = time.perf_counter()
        res = zygote.run(
            CHILD_BENCH,
            params={"batches": [1, 16], "reps": args.reps},
            inputs={
                "model": make_input_memfd(model, name="model"),
                "data": make_input_memfd(buf.getvalue(), name="d"),
            },
            outputs={"t": sink},
            limits=SandboxLimits(memory_bytes=1 << 30, cpu_seconds=600, wall_seconds=600.0),
        )
        task_wall = time.perf_counter() - t0
        if not res.ok:
            raise SystemExit(f"error: sandboxed ONNX Runtime failed ({res.category}): {res.detail[-2000:]}")
        child_times = json.loads(bytes(sink.data))
        # the whole task once more with one inference: start + import + session + run
        sink2 = Sink()
        t0 = time.perf_counter()
        zygote.run(
            CHILD_BENCH,
            params={"batches": [1], "reps": 1},
            inputs={
                "model": make_input_memfd(model, name="model"),
                "data": make_input_memfd(buf.getvalue(), name="d"),
            },
            outputs={"t": sink2},
            limits=SandboxLimits(memory_bytes=1 << 30),
        )
        one_task_s = time.perf_counter() - t0
    finally:
        zygote.close()
    results["enclave_ort_task_s"] = {
        "one_inference_task": round(one_task_s, 3),
        "bench_task": round(task_wall, 3),
    }

    graph = Graph.from_bytes(model)
    for batch in (1, 16):
        x = x_all[:batch]
        ref = sess.run(None, {"x": x})[0]
        row: dict[str, Any] = {}
        row["plain-ort"] = {
            "latency_ms": percentiles(
                timed(lambda x=x: sess.run(None, {"x": x}), args.reps), scale=1e3, digits=3
            )
        }
        row["enclave-ort"] = {
            "latency_ms": percentiles(child_times[str(batch)], scale=1e3, digits=3),
            "enclave_flop_share": 1.0,
        }
        for mode in Mode:
            proc = None
            acc: Any = None
            if mode is not Mode.ENCLAVE:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "confide.infer.accelerator", "--backend", "numpy"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
                )
                assert proc.stdin is not None and proc.stdout is not None
                acc = wire.AcceleratorClient(proc.stdout, proc.stdin)
            try:
                ex = Executor(graph, mode, acc)
                shapes = {"x": x.shape}
                offline = ex.precompute(shapes, args.reps + 5)
                lat, frv, accw, last = [], [], [], None
                for i in range(args.reps + 5):
                    t = time.perf_counter()
                    out, st = ex.run({"x": x})
                    if i >= 5:
                        lat.append(time.perf_counter() - t)
                        frv.append(st.freivalds_s)
                        accw.append(st.accelerator_wait_s)
                    last = (out, st)
                assert last is not None
                out, st = last
                y = out["y"]
                entry: dict[str, Any] = {
                    "latency_ms": percentiles(lat, scale=1e3, digits=3),
                    "enclave_flop_share": round(st.enclave_share(), 4),
                    "max_abs_error_vs_ort": float(np.max(np.abs(y - ref))),
                    "top1_agreement": float(np.mean(np.argmax(y, 1) == np.argmax(ref, 1))),
                }
                if mode is not Mode.ENCLAVE:
                    entry.update(
                        {
                            "freivalds_ms_p50": round(statistics.median(frv) * 1e3, 3),
                            "accelerator_wait_ms_p50": round(statistics.median(accw) * 1e3, 3),
                            "offline_precompute_ms_per_inference": round(offline / (args.reps + 5) * 1e3, 3),
                            "bytes_to_accelerator_per_input": st.bytes_to_accelerator // batch,
                            "bytes_from_accelerator_per_input": st.bytes_from_accelerator // batch,
                            "enclave_ops": st.enclave_ops,
                            "accelerator_flops": st.accelerator_flops,
                        }
                    )
                row[mode.value if mode is not Mode.ENCLAVE else "enclave-numpy"] = entry
            finally:
                if proc is not None:
                    acc.close()
                    proc.wait(timeout=30)
        base = row["plain-ort"]["latency_ms"]["p50"]
        for v in row.values():
            v["vs_plain_p50"] = round(v["latency_ms"]["p50"] / base, 2)
        results["batches"][str(batch)] = row
        print(
            f"batch {batch}: "
            + ", ".join(f"{k} {v['latency_ms']['p50']} ms ({v['vs_plain_p50']}x)" for k, v in row.items())
        )
    if args.only == "all":
        results["real_models"] = real_models(args)
    elif "real_models" in previous:
        results["real_models"] = previous["real_models"]
    write(out_path, results)


def real_models(args: argparse.Namespace) -> dict[str, Any]:
    """all-MiniLM-L6-v2 and PP-OCRv4 det in every mode (bench/inference_models.py)."""
    import inference_models

    return inference_models.run_all(
        args.real_reps,
        [m for m in args.real_models.split(",") if m],
        [int(b) for b in args.real_batches.split(",") if b],
    )


def write(out_path: Path, results: dict[str, Any]) -> None:
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(f"wrote {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
