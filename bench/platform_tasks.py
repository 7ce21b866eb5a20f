"""Platform benchmarks against real `confide serve` processes on loopback (SQLite, sim enclaves);
results in bench/results/platform.json.

- task round trip for a trivial function: create, two approvals, run, wait, fetch and decrypt
  (target p50 <= 150 ms), with one worker;
- tasks per minute with 1 and with 2 enclave workers (the same batch of tasks, measured side by side);
- API latency with 32 concurrent clients (signed GET of a task), p50 and p99.

Usage: python bench/platform_tasks.py [--round-trips 40] [--batch 40] [--api-requests 1600]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from common import machine, percentiles
from confide.attest.anchors import load_trust_anchors
from confide.client import Client
from confide.client.policy import Policy
from confide.enclave.config import EnclaveConfig
from confide.enclave.keys import Identity
from confide.enclave.measurement import measure

HERE = Path(__file__).resolve().parent
TRIVIAL = 'def run(ctx):\n    ctx.outputs["out"].write(ctx.inputs["data"].read()[:64])\n'


def summary_ms(values: list[float]) -> dict[str, float]:
    return {**percentiles(values, scale=1000), "mean": round(statistics.fmean(values) * 1000, 2)}


class Server:
    def __init__(self, work: Path, workers: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.data = work / f"server-{workers}w"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / f"server-{workers}w.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "confide.cli.main", "serve", "--data", str(self.data),
             "--port", str(self.port), "--workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                info = httpx.get(f"{self.url}/v1/service", timeout=1).json()
                ready = [w for w in info.get("workers") or [] if w.get("ready")]
                if info.get("fingerprint") and len(ready) >= workers:  # every enclave started
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited; see {self.log.name}")
            time.sleep(0.2)
        raise SystemExit(f"server not ready; see {self.log.name}")

    def clients(self) -> tuple[Client, Client]:
        policy = Policy(
            backends=("sim",), measurements=(measure(EnclaveConfig()).value,), allow_simulation=True
        )
        anchors = load_trust_anchors(sim=[self.data / "platform" / "vendor_root.crt"])
        out = []
        for name in ("owner", "lab"):
            c = Client(self.url, Identity.generate(name), policy=policy, anchors=anchors)
            c.register(name)
            out.append(c)
        return out[0], out[1]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def prepare(owner: Client, lab: Client, work: Path) -> tuple[str, str]:
    data = work / "data.csv"
    data.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(100)))
    ds = owner.upload_dataset(data)
    fn = lab.register_function(TRIVIAL, name="head", description="first 64 bytes", outputs=["out"])
    return ds.dataset_id, fn


def new_task(owner: Client, lab: Client, dataset_id: str, fn: str) -> str:
    # the lab's approval (as creator and function owner) is signed and sent by create_task itself
    task = lab.create_task(function=fn, inputs={"data": dataset_id}, outputs={"out": [lab.fingerprint]})
    owner.approve(task)
    return task


def round_trips(server: Server, n: int, work: Path) -> dict[str, Any]:
    owner, lab = server.clients()
    dataset_id, fn = prepare(owner, lab, work)
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        task = new_task(owner, lab, dataset_id, fn)
        lab.run(task)
        lab.wait(task)
        lab.results(task, work / "rt-out")
        if i >= 3:  # warm-up: first tasks load the sandbox's imports
            times.append(time.perf_counter() - t0)
    return summary_ms(times)


def throughput(server: Server, batch: int, work: Path) -> dict[str, Any]:
    owner, lab = server.clients()
    dataset_id, fn = prepare(owner, lab, work)
    tasks = [new_task(owner, lab, dataset_id, fn) for _ in range(batch)]
    t0 = time.perf_counter()
    for task in tasks:
        lab.run(task)
    for task in tasks:
        info = lab.wait(task)
        if info["state"] != "succeeded":
            raise SystemExit(f"task {task} ended {info['state']}")
    seconds = time.perf_counter() - t0
    return {"tasks": batch, "seconds": round(seconds, 3), "tasks_per_minute": round(batch / seconds * 60, 1)}


def api_latency(server: Server, total: int, concurrency: int) -> dict[str, Any]:
    owner, lab = server.clients()
    dataset_id, fn = prepare(owner, lab, Path(tempfile.mkdtemp(prefix="confide-bench-")))
    task = lab.create_task(function=fn, inputs={"data": dataset_id}, outputs={"out": [lab.fingerprint]})
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = total // concurrency

    def worker() -> None:
        c = Client(lab.api.url, lab.identity, policy=lab.policy, anchors=lab.anchors)
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            c.task(task)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return {
        **summary_ms(latencies),
        "concurrency": concurrency,
        "requests_per_s": round(len(latencies) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round-trips", type=int, default=40)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--api-requests", type=int, default=1600)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="confide-bench-platform-"))
    results: dict[str, Any] = {
        "machine": {**machine(), "db": "sqlite", "backend": "sim"},
        "unit": "milliseconds",
    }
    one = Server(work, 1)
    two = Server(work, 2)
    try:
        print("task round trip (1 worker) ...", file=sys.stderr)
        results["task_round_trip"] = {**round_trips(one, args.round_trips, work), "target_p50_ms": 150}
        print("throughput with 1 and 2 workers ...", file=sys.stderr)
        t1 = throughput(one, args.batch, work)
        t2 = throughput(two, args.batch, work)
        results["throughput"] = {
            "workers_1": t1,
            "workers_2": t2,
            "ratio_2_vs_1": round(t2["tasks_per_minute"] / t1["tasks_per_minute"], 2),
        }
        print("API latency, 32 concurrent clients ...", file=sys.stderr)
        results["api_latency_32_clients"] = api_latency(two, args.api_requests, 32)
    finally:
        one.stop()
        two.stop()
    out = HERE / "results" / "platform.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
