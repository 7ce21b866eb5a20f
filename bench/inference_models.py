"""Protected inference on the real models (issue 9), called by bench/inference.py (--only real).

Models: all-MiniLM-L6-v2 (exported by confide.infer.models.export_minilm, seq 32, cached in the
temp folder) and PP-OCRv4's text detector (rapidocr-onnxruntime's ONNX file, 96x320 images).
Per model, batch 1 and 16, one thread everywhere, modes:

- ``plain-ort``: ONNX Runtime float32 in a process of its own (the baseline);
- ``enclave-ort``: ONNX Runtime in the sandbox child (all-in-enclave; onnx-infer's session
  options), timed inside the child, the child's peak RSS against its memory limit;
- ``enclave-numpy``: Confide's numpy executor, every op inside (float64);
- ``outsourced-verified`` / ``outsourced-blinded``: the numpy executor, linear layers on the
  accelerator as an external process (python -m confide.infer.accelerator, numpy) over pipes,
  every product checked with Freivalds; the executor runs in the bench process.

Every (model, batch, mode) runs in a fresh worker process (``python bench/inference_models.py
--worker ...``) so its peak RSS (VmHWM) is its own; the sandbox child's is its ru_maxrss. Accuracy: MiniLM, the smallest cosine to
sentence-transformers' float embeddings; PP-OCR, the share of pixels on the same side of the 0.3
threshold as plain ONNX Runtime and the mean |difference| of the probability map.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(tempfile.gettempdir()) / "confide-bench-models"  # the export and references, reused
sys.path.insert(0, str(HERE))

from common import ORT_SESSION_SRC, Sink, ort_session, percentiles  # noqa: E402

SENTENCES = [
    "A confidential enclave runs the model on sealed data.",
    "Freivalds' check catches a wrong product from the accelerator.",
    "The cat sat on the mat.",
    "Stock prices fell sharply on Tuesday.",
    "Sealed datasets are opened only with their owners' approval.",
    "The accelerator sees only blinded field elements.",
    "A sentence embedding maps text to 384 numbers.",
    "Two cores are shared with other engineers.",
]
MODES = ("plain-ort", "enclave-ort", "enclave-numpy", "outsourced-verified", "outsourced-blinded")
SANDBOX_MEMORY = 1 << 30

CHILD = r"""
def run(ctx):
    import io, json, resource, time
    import numpy as np
    s = ort_session(ctx.inputs["model"].read())
    z = np.load(io.BytesIO(ctx.inputs["data"].read()), allow_pickle=False)
    feeds = {k: z[k] for k in z.files}
    for _ in range(2):
        s.run(None, feeds)
    ts = []
    for _ in range(ctx.params["reps"]):
        t = time.perf_counter(); out = s.run(None, feeds)[0]; ts.append(time.perf_counter() - t)
    buf = io.BytesIO(); np.save(buf, out)
    ctx.outputs["t"].write(json.dumps({"t": ts, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}).encode())
    ctx.outputs["y"].write(buf.getvalue())
"""
CHILD = ORT_SESSION_SRC + CHILD


def model_bytes(name: str) -> bytes:
    from confide.infer.models import export_minilm, ppocr_det_path

    if name == "minilm":
        path = CACHE / "minilm-seq32-opset17.onnx"
        if not path.exists():
            export_minilm(path)
        return path.read_bytes()
    return ppocr_det_path().read_bytes()


def inputs(name: str, batch: int) -> dict[str, np.ndarray]:
    if name == "minilm":
        path = CACHE / f"minilm-b{batch}-tokens.npz"
        if not path.exists():  # the tokenizer imports torch: once, in the parent, not in a timed worker
            from confide.infer.models import minilm_tokenize

            CACHE.mkdir(exist_ok=True)
            np.savez(path, **minilm_tokenize((SENTENCES * 4)[:batch]))
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from PIL import Image, ImageDraw, ImageFont

    out = []
    font = ImageFont.load_default(size=28)
    for i in range(batch):
        img = Image.new("RGB", (320, 96), "white")
        d = ImageDraw.Draw(img)
        d.text((10 + i, 10), f"CONFIDE {2026 + i}", fill="black", font=font)
        d.text((20, 55), "enclave text", fill="black", font=font)
        out.append((np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5)
    return {"x": np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))}


def reference(name: str, batch: int, feeds: dict[str, np.ndarray], model: bytes) -> np.ndarray:
    ref_path = CACHE / f"{name}-b{batch}-ref.npy"
    if ref_path.exists():
        return np.load(ref_path)
    if name == "minilm":
        from confide.infer.models import minilm_reference

        ref = minilm_reference((SENTENCES * 4)[:batch])
    else:
        ref = ort_session(model).run(None, feeds)[0]
    CACHE.mkdir(exist_ok=True)
    np.save(ref_path, ref)
    return ref


def accuracy(name: str, y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    if name == "minilm":
        cos = np.sum(y * ref, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
        return {"min_cosine_vs_pytorch": round(float(np.min(cos)), 6)}
    return {
        "pixel_agreement_vs_ort": round(float(np.mean((y > 0.3) == (ref > 0.3))), 5),
        "mean_abs_diff_vs_ort": round(float(np.mean(np.abs(y - ref))), 6),
        "max_abs_diff_vs_ort": round(float(np.max(np.abs(y - ref))), 6),
    }


def vm_hwm_mib() -> float:
    """This process's resident high-water mark (VmHWM: its own, unlike ru_maxrss, which keeps the
    parent's across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(name: str, batch: int, mode: str, reps: int) -> dict[str, Any]:
    import onnx  # noqa: F401  (imports counted in the baseline, not in the model's memory)
    import onnxruntime  # noqa: F401

    import confide.enclave.infer.executor  # noqa: F401

    baseline = vm_hwm_mib()
    model = model_bytes(name)
    feeds = inputs(name, batch)
    ref = reference(name, batch, feeds, model)
    entry: dict[str, Any] = {}
    if mode == "plain-ort":
        sess = ort_session(model)
        for _ in range(2):
            sess.run(None, feeds)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            y = sess.run(None, feeds)[0]
            ts.append(time.perf_counter() - t)
        entry["enclave_flop_share"] = None
    elif mode == "enclave-ort":
        from confide.enclave.sandbox import SandboxLimits, Zygote, make_input_memfd

        buf = io.BytesIO()
        np.savez(buf, **feeds)
        z = Zygote.start(strict=True, preimport=("numpy", "confide.enclave.infer.split"))
        try:
            sink, ysink = Sink(), Sink()
            res = z.run(
                CHILD,
                params={"reps": reps},
                inputs={
                    "model": make_input_memfd(model, name="model"),
                    "data": make_input_memfd(buf.getvalue(), name="d"),
                },
                outputs={"t": sink, "y": ysink},
                limits=SandboxLimits(memory_bytes=SANDBOX_MEMORY, cpu_seconds=3000, wall_seconds=3000.0),
            )
        finally:
            z.close()
        if not res.ok:
            raise SystemExit(f"error: sandboxed ONNX Runtime failed ({res.category}): {res.detail[-2000:]}")
        got = json.loads(bytes(sink.data))
        ts = got["t"]
        y = np.load(io.BytesIO(bytes(ysink.data)), allow_pickle=False)
        entry["enclave_flop_share"] = 1.0
        entry["sandbox_peak_rss_mib"] = round(got["maxrss_kib"] / 1024, 1)
        entry["sandbox_memory_limit_mib"] = SANDBOX_MEMORY >> 20
    else:
        from confide.enclave.infer import wire
        from confide.enclave.infer.executor import Executor, Graph
        from confide.enclave.infer.slalom import Mode

        graph = Graph.from_bytes(model)
        m = {"enclave-numpy": Mode.ENCLAVE, "outsourced-verified": Mode.VERIFIED}.get(mode, Mode.BLINDED)
        proc = acc = None
        if m is not Mode.ENCLAVE:
            proc = subprocess.Popen(
                [sys.executable, "-m", "confide.infer.accelerator", "--backend", "numpy"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert proc.stdin is not None and proc.stdout is not None
            acc = wire.AcceleratorClient(proc.stdout, proc.stdin)
        try:
            ex = Executor(graph, m, acc)
            shapes = {k: v.shape for k, v in feeds.items()}
            offline = ex.precompute(shapes, reps + 1)
            ts, frv, accw = [], [], []
            for i in range(reps + 1):
                t = time.perf_counter()
                out, st = ex.run(feeds)
                if i:
                    ts.append(time.perf_counter() - t)
                    frv.append(st.freivalds_s)
                    accw.append(st.accelerator_wait_s)
            y = next(iter(out.values()))
            entry["enclave_flop_share"] = round(st.enclave_share(), 4)
            if m is not Mode.ENCLAVE:
                entry.update(
                    {
                        "outsourced_layers": st.outsourced_calls,
                        "freivalds_ms_p50": round(statistics.median(frv) * 1e3, 2),
                        "freivalds_ops": st.freivalds_ops,
                        "accelerator_wait_ms_p50": round(statistics.median(accw) * 1e3, 2),
                        "offline_precompute_ms_per_inference": round(offline / (reps + 1) * 1e3, 1),
                        "bytes_to_accelerator_per_input": st.bytes_to_accelerator // batch,
                        "bytes_from_accelerator_per_input": st.bytes_from_accelerator // batch,
                        "enclave_ops": st.enclave_ops,
                        "accelerator_flops": st.accelerator_flops,
                    }
                )
        finally:
            if proc is not None and acc is not None:
                acc.close()
                proc.wait(timeout=60)
    entry["latency_ms"] = percentiles(ts, scale=1e3, digits=2)
    entry["throughput_inputs_per_s"] = round(batch / statistics.median(ts), 2)
    entry["process_peak_rss_mib"] = round(vm_hwm_mib(), 1)
    entry["process_rss_before_model_mib"] = round(baseline, 1)
    entry.update(accuracy(name, np.asarray(y, dtype=np.float32), ref))
    return entry


def run_all(reps: int, models: list[str], batches: list[int]) -> dict[str, Any]:
    from confide.infer.model_meta import model_meta

    out: dict[str, Any] = {
        "repetitions": reps,
        "note": (
            f"{reps} timed repetitions per cell (after warm-up) on a 2-core machine shared with other "
            "work: p99 is the largest of a few samples, read the p50s. Each cell runs in a fresh process; "
            "process_peak_rss_mib is that process's high-water mark (the accelerator process excluded; "
            "the outsourced modes hold repetitions + 1 precomputed pad sets at once). flops_per_sample is "
            "model_meta's count from the declared shapes (PP-OCR's H and W are dynamic, so its convolutions "
            "are not counted); accelerator_flops is what one inference sent."
        ),
    }
    for name in models:
        meta = model_meta(model_bytes(name))
        for batch in batches:  # export, tokens and references made here, once, outside the timed workers
            reference(name, batch, inputs(name, batch), model_bytes(name))
        out[name] = {
            "parameters": meta["parameters"],
            "flops_per_sample": meta["flops_per_sample"],
            "size_bytes": meta.get("size_bytes", len(model_bytes(name))),
            "batches": {},
        }
        for batch in batches:
            row: dict[str, Any] = {}
            for mode in MODES:
                r = subprocess.run(
                    [sys.executable, __file__, "--worker", name, str(batch), mode, str(reps)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if r.returncode != 0:
                    raise SystemExit(f"error: {name} batch {batch} {mode} failed:\n{r.stderr[-3000:]}")
                row[mode] = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{name} b{batch} {mode}: p50 {row[mode]['latency_ms']['p50']} ms", file=sys.stderr)
            base = row["plain-ort"]["latency_ms"]["p50"]
            for v in row.values():
                v["vs_plain_p50"] = round(v["latency_ms"]["p50"] / base, 2)
            out[name]["batches"][str(batch)] = row
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "BATCH", "MODE", "REPS"))
    args = ap.parse_args()
    if not args.worker:
        raise SystemExit("usage: run through bench/inference.py --only real")
    name, b, mode, reps = args.worker
    print(json.dumps(worker(name, int(b), mode, int(reps))))
