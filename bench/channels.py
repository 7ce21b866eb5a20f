"""Timing as a channel from confidential code to the host: measured, in bits per run.

The host times every `task` call itself, whatever the enclave reports. A confidential function
(sealed to the service: the host never sees its code) reads a secret value s from its input and
busy-loops for s * STEP seconds. The script runs each of LEVELS secret values REPEATS times through a
real enclave worker (sim backend), times each call on the host side, and computes:

- per level: mean and standard deviation of the host-observed duration;
- the noise: pooled standard deviation (sigma) of the duration around its level's mean;
- the measured channel: a nearest-mean decoder, leave-one-out, turns each duration back into a level;
  the mutual information of (sent, decoded) in bits per run (a lower bound on what the host learns);
- the extrapolated capacity: with noise sigma and the wall-clock limit W a function may run, about
  W / (4 sigma) levels stay distinguishable (error rate under 5% between neighbours), i.e.
  log2(W / (4 sigma)) bits per run. Padding sizes does nothing for this; a coarser reported duration
  in the receipt does nothing either (the host has its own clock).

Usage: python bench/channels.py [--levels 8] [--repeats 6] [--step-ms 20]
Writes bench/results/channels.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import machine

HERE = Path(__file__).resolve().parent
SOURCE = """
import time

def run(ctx):
    s = int(ctx.inputs["secret"].read().decode().strip())
    end = time.perf_counter() + s * float(ctx.params["step"])
    x = 0
    while time.perf_counter() < end:  # CPU-bound, like real work that depends on the data
        x += 1
    ctx.outputs["out"].write(b"done")
"""


def mutual_information(pairs: list[tuple[int, int]]) -> float:
    n = len(pairs)
    joint = Counter(pairs)
    px = Counter(a for a, _ in pairs)
    py = Counter(b for _, b in pairs)
    return sum(c / n * math.log2((c / n) / ((px[a] / n) * (py[b] / n))) for (a, b), c in joint.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--step-ms", type=float, default=20.0)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from confide.client.function_seal import seal_function_source
    from confide.client.home import Home
    from confide.client.manifest_build import build_manifest, sign_approval
    from confide.enclave import manifest as mf
    from confide.enclave.config import EnclaveConfig
    from confide.enclave.keys import Identity, PublicIdentity
    from conftest import TaskKit

    lab, owner, algo = Identity.generate("lab"), Identity.generate("owner"), Identity.generate("algo")
    parties = {"lab": lab.public, "owner": owner.public, "algo": algo.public}
    with tempfile.TemporaryDirectory(prefix="confide-bench-channels-") as tmp:
        home = Home(Path(tmp) / "home")
        enclave = home.start_enclave()
        try:
            info = enclave.service_init()
            kit = TaskKit(Path(tmp) / "work", enclave, PublicIdentity.from_line(info["service"]))
            desc = mf.function_descriptor(
                name="secret-timer",
                source=SOURCE,
                owner=algo.public,
                description="loops for a time proportional to a secret",
                inputs=["secret"],
                outputs=["out"],
            )
            datasets = [kit.dataset(owner, f"{s}\n".encode()) for s in range(args.levels)]
            samples: list[tuple[int, float]] = []
            order = [s for _ in range(args.repeats) for s in range(args.levels)]
            for s in order:  # interleaved, so drift does not look like signal
                m = build_manifest(
                    service=kit.service,
                    creator=lab.public,
                    function=desc,
                    confidential=True,
                    params={"step": args.step_ms / 1000},
                    inputs=[kit.task_input("secret", datasets[s])],
                    outputs=[mf.TaskOutput("out", (lab.fingerprint,), 64, "pow2")],
                    participants=parties,
                )
                sealed = seal_function_source(SOURCE, descriptor=desc, service=kit.service)
                approvals = [sign_approval(p, m) for p in (lab, owner, algo)]
                t0 = time.perf_counter()
                result, body, _ = kit.run(
                    m, approvals, {"secret": datasets[s]}, function_source={"sealed": mf.b64e(sealed)}
                )
                dt = time.perf_counter() - t0
                if not result["ok"]:
                    raise SystemExit(f"run failed: {body['error']}")
                samples.append((s, dt))
        finally:
            enclave.close()

    by_level = {s: [d for t, d in samples if t == s] for s in range(args.levels)}
    means = {s: statistics.fmean(v) for s, v in by_level.items()}
    resid = [d - means[s] for s, d in samples]
    sigma = math.sqrt(sum(r * r for r in resid) / max(1, len(resid) - args.levels))
    decoded: list[tuple[int, int]] = []
    for i, (s, d) in enumerate(samples):  # leave-one-out nearest-mean decoding
        loo = {}
        for t in by_level:
            rest = [x for j, (u, x) in enumerate(samples) if u == t and j != i]
            loo[t] = statistics.fmean(rest) if rest else means[t]
        decoded.append((s, min(loo, key=lambda t: abs(loo[t] - d))))
    accuracy = sum(a == b for a, b in decoded) / len(decoded)
    mi = mutual_information(decoded)
    wall = EnclaveConfig().wall_seconds
    capacity_levels = wall / (4 * sigma) if sigma > 0 else float("inf")
    out: dict[str, Any] = {
        "machine": machine(),
        "what": "host-observed duration of the task call vs a secret the confidential function loops on",
        "levels": args.levels,
        "repeats": args.repeats,
        "step_ms": args.step_ms,
        "per_level_ms": {
            str(s): {"mean": round(means[s] * 1000, 2), "stdev": round(statistics.pstdev(v) * 1000, 2)}
            for s, v in by_level.items()
        },
        "noise_sigma_ms": round(sigma * 1000, 2),
        "decoder_accuracy": round(accuracy, 3),
        "measured_bits_per_run": round(mi, 2),
        "max_bits_per_run_for_these_levels": round(math.log2(args.levels), 2),
        "wall_limit_s": wall,
        "extrapolated_levels_within_wall_limit": round(capacity_levels),
        "extrapolated_bits_per_run": round(math.log2(capacity_levels), 1),
        "note": "padding output sizes does not close this; neither would a coarser duration in the receipt",
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "channels.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
