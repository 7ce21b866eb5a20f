"""The `infer` built-in as platform tasks, in each mode, through one enclave worker with an accelerator
process (issue 9): the enclave's `task` call end to end (inputs decrypted, sandbox child forked, the
model's weights sent to the accelerator and the offline pads drawn per task in the outsourced modes,
outputs sealed), on an MLP 784-1024-1024-10 at batch 1 and 16, vs plain ONNX Runtime's outputs.

bench/inference.py measures the executor's online latency in-process; this measures what a task
costs. Writes bench/results/inference_tasks.json. `--runs N` (default 10).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from common import machine, percentiles  # noqa: E402
from confide.client.home import Home  # noqa: E402
from confide.client.manifest_build import build_manifest, sign_approval  # noqa: E402
from confide.enclave import manifest as mf  # noqa: E402
from confide.enclave.keys import Identity, PublicIdentity  # noqa: E402
from conftest import TaskKit  # noqa: E402
from infer_support import mlp, ort_run  # noqa: E402

SIZES = (784, 1024, 1024, 10)
MODES = ("all-in-enclave", "outsourced-verified", "outsourced-blinded+verified")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference_tasks.json")
    args = ap.parse_args()
    vendor, clinic, lab = (Identity.generate(n) for n in ("vendor", "clinic", "lab"))
    parties = {"vendor": vendor.public, "clinic": clinic.public, "lab": lab.public}
    model = mlp(0, SIZES)
    root = Path(tempfile.mkdtemp(prefix="confide-bench-infer-"))
    enclave = Home(root / "home").start_enclave(accelerator="numpy")
    kit = TaskKit(root / "work", enclave, PublicIdentity.from_line(enclave.service_init()["service"]))
    results: dict[str, Any] = {}
    try:
        for batch in (1, 16):
            x = np.random.default_rng(1).normal(size=(batch, SIZES[0])).astype(np.float32)
            buf = io.BytesIO()
            np.savez(buf, x=x)
            ref = ort_run(model, {"x": x})[0]
            per: dict[str, Any] = {}
            for mode in MODES:
                times: list[float] = []
                got = None
                for _ in range(args.runs):
                    ds = {"model": kit.dataset(vendor, model), "data": kit.dataset(clinic, buf.getvalue())}
                    m = build_manifest(
                        service=kit.service,
                        creator=lab.public,
                        function=mf.builtin_descriptor("infer"),
                        params={"mode": mode},
                        inputs=[kit.task_input(n, d) for n, d in ds.items()],
                        outputs=[mf.TaskOutput("outputs", (lab.fingerprint,))],
                        participants=parties,
                    )
                    approvals = [sign_approval(p, m) for p in (vendor, clinic, lab)]
                    t0 = time.perf_counter()
                    result, body, outs = kit.run(m, approvals, ds)
                    times.append(time.perf_counter() - t0)
                    if not result["ok"]:
                        raise SystemExit(f"{mode} batch {batch} failed: {body.get('error')}")
                    got = np.load(io.BytesIO(kit.read(outs["outputs"], lab)), allow_pickle=False)["y"]
                assert got is not None
                per[mode] = {
                    "task_ms": percentiles(times, scale=1000.0, digits=1),
                    "max_abs_error_vs_ort": float(np.max(np.abs(got - ref))),
                    "top1_agreement": float(np.mean(np.argmax(got, 1) == np.argmax(ref, 1))),
                }
                print(f"batch {batch:2d} {mode:28s} p50 {per[mode]['task_ms']['p50']:7.1f} ms", flush=True)
            base = per["all-in-enclave"]["task_ms"]["p50"]
            for mode in MODES:
                per[mode]["vs_all_in_enclave_p50"] = round(per[mode]["task_ms"]["p50"] / base, 2)
            results[str(batch)] = per
    finally:
        enclave.close()
    weights = sum(k * n for k, n in itertools.pairwise(SIZES))
    report = {
        "machine": machine(),
        "model": {"sizes": list(SIZES), "linear_weights_sent_per_task": weights},
        "accelerator": "numpy-cpu (same CPU as the enclave)",
        "bytes_to_accelerator_per_input_row": 4 * sum(SIZES[:-1]),
        "bytes_from_accelerator_per_input_row": 4 * sum(SIZES[1:]),
        "batches": results,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
