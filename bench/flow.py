"""Dataflow benchmarks (issue 8) on Spark; results in bench/results/flow.json.

- word count over generated text (a Zipf vocabulary), side by side in one run on one SparkSession
  (`local[2]`): confidential (sealed input, the spark engine, user functions in the node's enclave
  worker, sealed output) against the same job as plain PySpark with the same Python functions
  (plain text in, `saveAsTextFile` out). Each is run `--repeats` times, alternating, after a small
  warm-up of both; the medians are compared (issue target <= 1.3x at >= 1 GiB);
- padded against plain shuffle: the same confidential word count on the same (Zipf-skewed) input,
  once each, with and without `Flow(padded_shuffle=...)` (every task sends every bucket the same
  number of same-size batches; the bound is 1.1x the vocabulary's share of a bucket plus 64), the
  ratio of the two times and what left the enclave in each;
- the stub <-> enclave worker channel: a Spark-side client pushing 1 MiB frames to the node agent
  and getting them back (the `echo` operation, no enclave work), and what the real job moved
  through it (bytes in and out, the enclave's share of the time).

Usage: python bench/flow.py [--size-mib 64] [--partitions 16] [--repeats 3] (1 GiB: --size-mib 1024 --partitions 256)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine
from confide.client.home import Home
from confide.client.policy import Policy
from confide.enclave.keys import Identity
from confide.enclave.sealed_file import SealedWriter
from confide.flow import Flow, ShufflePadding, open_result, seal_text
from confide.flow.channel import Conn
from confide.flow.node_agent import AgentClient, start_agent
from confide.flow.spark_engine import SparkEngine, spark_session
from confide.flow.workers import local_backend

HERE = Path(__file__).resolve().parent

FUNCTIONS = """
def words(line):
    return line.split()

def one(w):
    return (w, 1)

def add(a, b):
    return a + b
"""


VOCAB = 50_000


def zipf_text(path: Path, size: int, *, vocab: int = VOCAB, s: float = 1.1, seed: int = 1) -> int:
    """`size` bytes (about) of lines of 4..16 words drawn from a Zipf(s) vocabulary; returns words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-s
    p /= p.sum()
    lexicon = np.array([f"w{i:x}" for i in range(vocab)], dtype=object)
    written = n_words = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size:
            idx = rng.choice(vocab, size=200_000, p=p)
            lens = rng.integers(4, 17, size=len(idx) // 4)
            ws = lexicon[idx]
            out, i = [], 0
            for n in lens:
                if i + n > len(ws):
                    break
                out.append(" ".join(ws[i : i + n]))
                i += n
            block = "\n".join(out) + "\n"
            fh.write(block)
            written += len(block)
            n_words += int(i)
    return n_words


def channel_throughput(sock: str, *, mib: int = 256, frame: int = 1 << 20) -> dict[str, Any]:
    payload = os.urandom(frame)
    conn = Conn.connect(sock)
    try:
        rounds = max(1, mib // 16)
        per = 16  # frames per request: a partition of 16 MiB
        t0 = time.perf_counter()
        for _ in range(rounds):
            conn.send_json({"op": "echo"})
            conn.send_list([payload] * per)
            conn.flush()
            assert conn.recv_json()["ok"]
            got = sum(len(f) for f in conn.recv_list())
            assert got == per * frame
        dt = time.perf_counter() - t0
    finally:
        conn.close()
    moved = rounds * per * frame
    return {
        "frame_bytes": frame,
        "frames_per_request": per,
        "mib_each_way": moved >> 20,
        "seconds": round(dt, 3),
        "round_trip_mib_s": round(2 * moved / dt / (1 << 20), 1),
        "one_way_mib_s": round(moved / dt / (1 << 20), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64, help="generated text size (issue target: 1024)")
    ap.add_argument("--partitions", type=int, default=16, help="input partitions")
    ap.add_argument("--buckets", type=int, default=4, help="reduce partitions")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "flow.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cf-bench-flow-"))
    agent = pool = session = None
    try:
        t = time.perf_counter()
        plain_path = work / "text.txt"
        n_words = zipf_text(plain_path, args.size_mib << 20)
        gen_s = time.perf_counter() - t
        enclave_id, recipient = Identity.generate("bench-enclave"), Identity.generate("bench-recipient")
        t = time.perf_counter()
        sealed = work / "text.sealed"
        with (
            open(plain_path, "rb") as src,
            open(sealed, "wb") as dst,
            SealedWriter(dst, recipients=[enclave_id.public]) as w,
        ):  # streamed: 1 GiB fits
            while block := src.read(8 << 20):
                w.write(block)
        seal_s = time.perf_counter() - t
        small = seal_text(work / "small.sealed", "a b c\n" * 1000, [enclave_id.public])
        (work / "small.txt").write_text("a b c\n" * 1000)
        sock = str(work / "agent.sock")
        home = Home(work / "home")  # a simulated TEE vouches for the worker; the client attests it
        backend = local_backend(home)
        trust = {
            "policy": Policy(
                backends=("sim",), measurements=(backend.identity.measurement,), allow_simulation=True
            ),
            "anchors": home.anchors(),
        }
        agent, pool = start_agent(enclave_id, sock, zygotes=2, backend=backend)
        session = spark_session("local[2]", **{"spark.default.parallelism": "2", "spark.driver.memory": "1g"})
        sc = session.sparkContext
        engine = SparkEngine(session, AgentClient(sock), sock)
        fns: dict[str, Any] = {"__name__": "flow_functions"}
        exec(compile(FUNCTIONS, "<flow functions>", "exec"), fns)

        def confidential(src: Path, out: Path, pad: ShufflePadding | None = None) -> float:
            t0 = time.perf_counter()
            flow = Flow(FUNCTIONS, padded_shuffle=pad)
            wc = flow.text(src, partitions=args.partitions).flat_map("words").map("one")
            action = wc.reduce_by_key("add", args.buckets).save("wc")
            flow.run(action, engine=engine, recipients=[recipient.public], out_dir=out, **trust)
            return time.perf_counter() - t0

        def plain(src: Path, out: Path) -> float:
            t0 = time.perf_counter()
            rdd = sc.textFile(str(src), args.partitions).flatMap(fns["words"]).map(fns["one"])
            rdd.reduceByKey(fns["add"], args.buckets).saveAsTextFile(str(out))
            return time.perf_counter() - t0

        confidential(small, work / "warm-c")  # starts Spark's Python workers and the sandboxes
        plain(work / "small.txt", work / "warm-p")
        times: dict[str, list[float]] = {"confidential": [], "plain": []}
        stats0 = (agent.stats.bytes_in, agent.stats.bytes_out, agent.stats.enclave_seconds, agent.stats.tasks)
        for r in range(args.repeats):
            order = ("confidential", "plain") if r % 2 == 0 else ("plain", "confidential")
            for which in order:
                out = work / f"out-{which}-{r}"
                fn = confidential if which == "confidential" else plain
                times[which].append(fn(sealed if which == "confidential" else plain_path, out))
                print(f"{which} run {r}: {times[which][-1]:.2f} s", file=sys.stderr)
        st = agent.stats
        moved_in, moved_out = st.bytes_in - stats0[0], st.bytes_out - stats0[1]
        enclave_s, tasks = st.enclave_seconds - stats0[2], st.tasks - stats0[3]
        counts = dict(open_result(work / "out-confidential-0", "wc", recipient))
        plain_counts: dict[str, int] = {}
        for part in sorted((work / "out-plain-0").glob("part-*")):
            for line in part.read_text().splitlines():
                k, v = ast.literal_eval(line)  # saveAsTextFile writes repr((str, int))
                plain_counts[k] = v
        assert counts == plain_counts and sum(counts.values()) == n_words, "results differ"
        conf_s, plain_s = statistics.median(times["confidential"]), statistics.median(times["plain"])
        # a task sends a bucket at most the vocabulary's keys that hash to it (map-side combined)
        padding = ShufflePadding(
            records=-(-11 * VOCAB // (10 * args.buckets)) + 64, record_bytes=32, batch_records=1024
        )
        shuffle: dict[str, dict[str, float]] = {}
        for name, pad in (("plain", None), ("padded", padding)):
            out_before = agent.stats.bytes_out
            seconds = confidential(sealed, work / f"out-shuffle-{name}", pad)
            shuffle[name] = {
                "seconds": round(seconds, 2),
                "mib_from_enclave": round((agent.stats.bytes_out - out_before) / (1 << 20), 2),
            }
            assert dict(open_result(work / f"out-shuffle-{name}", "wc", recipient)) == counts, name
            print(f"{name} shuffle: {seconds:.2f} s", file=sys.stderr)
        result = {
            "machine": machine(),
            "spark": {"master": "local[2]", "version": session.version},
            "word_count": {
                "input_mib": round(plain_path.stat().st_size / (1 << 20), 1),
                "sealed_mib": round(sealed.stat().st_size / (1 << 20), 1),
                "words": n_words,
                "distinct_words": len(counts),
                "partitions": args.partitions,
                "buckets": args.buckets,
                "repeats": args.repeats,
                "plain_pyspark_s": [round(x, 2) for x in times["plain"]],
                "confidential_spark_s": [round(x, 2) for x in times["confidential"]],
                "ratio_median": round(conf_s / plain_s, 2),
                "target_ratio": 1.3,
                "target_input": "1 GiB (this run: see input_mib)",
                "results_equal": True,
                "generate_s": round(gen_s, 1),
                "seal_input_s": round(seal_s, 2),
            },
            "padded_shuffle": {
                "bound": {"records": padding.records, "record_bytes": 32, "batch_records": 1024},
                "plain_shuffle": shuffle["plain"],
                "padded_shuffle": shuffle["padded"],
                "ratio": round(shuffle["padded"]["seconds"] / shuffle["plain"]["seconds"], 2),
                "results_equal": True,
            },
            "channel": {
                "echo": channel_throughput(sock),
                "word_count_per_run": {
                    "tasks": tasks // args.repeats,
                    "mib_to_enclave": round(moved_in / args.repeats / (1 << 20), 2),
                    "mib_from_enclave": round(moved_out / args.repeats / (1 << 20), 2),
                    "enclave_task_seconds": round(enclave_s / args.repeats, 2),
                },
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        if session is not None:
            session.stop()
        if agent is not None:
            agent.stop()
        if pool is not None:
            pool.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
