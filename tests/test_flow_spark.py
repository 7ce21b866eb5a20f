"""The ``spark`` engine on real PySpark: the same jobs as the local engine (tests/test_flow_ops.py) and
as plain PySpark with the same functions give the same results on ``local[2]``; Spark moves only
sealed batches, its pickled closures hold no code and no plaintext; a Spark-side shuffle that drops,
duplicates or replays a batch (or drops a report) is refused by the enclave's verification; the job
key reaches another node's worker only by grant; and a word count runs across a real standalone
cluster (a master and two workers on 127.0.0.1, stopped at the end even on failure), each worker
with its own node agent.

One SparkSession for the module (the cluster test, last, replaces it with its own)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import test_flow_ops as ops
from confide.enclave.flow import FlowIntegrityError, FlowTaskError
from confide.enclave.keys import Identity
from confide.flow import Flow, LocalEngine, open_result, seal_text
from confide.flow.malicious import FlakySparkEngine, MaliciousSparkEngine, SpeculativeSparkEngine
from confide.flow.node_agent import AgentClient, NodeAgent, ZygotePool, start_agent
from confide.flow.spark_engine import SparkEngine, spark_session
from confide.flow.spark_stub import SOCKET_ENV
from flow_support import (
    FUNCTIONS,
    enclave_identity,
    make_enclave,
    recipient,
    run_and_open,
    sim_backend,
    zygote,
)

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cf-flow-") as d:  # short: unix socket paths are <108 bytes
        yield Path(d)


@pytest.fixture(scope="module")
def agent(enclave_identity: Identity, sockdir: Path) -> Iterator[NodeAgent]:
    a, pool = start_agent(enclave_identity, sockdir / "agent.sock", zygotes=2, backend=sim_backend())
    yield a
    a.stop()
    pool.close()


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    s = spark_session("local[2,2]", **{"spark.default.parallelism": "2"})  # a failed task runs again once
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(spark: Any, agent: NodeAgent) -> SparkEngine:
    return SparkEngine(spark, AgentClient(agent.socket_path), agent.socket_path)


# ---- the same jobs as the local engine's tests -----------------------------------------------------


def test_operators_on_spark_match_plain_python(
    tmp_path: Path, engine: SparkEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    ops.test_narrow_wide_and_actions_match_plain_python(tmp_path, engine, enclave_identity, recipient)  # type: ignore[arg-type]


def test_count_joins_csv_json_on_spark(
    tmp_path: Path, engine: SparkEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    ops.test_count_joins_csv_and_json_lines(tmp_path, engine, enclave_identity, recipient)  # type: ignore[arg-type]


def test_empty_input_and_long_lines_on_spark(
    tmp_path: Path, engine: SparkEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "l").mkdir()
    ops.test_empty_input_and_text_sink(tmp_path / "e", engine, enclave_identity, recipient)  # type: ignore[arg-type]
    ops.test_lines_spanning_chunks_are_read_once(tmp_path / "l", engine, enclave_identity, recipient)  # type: ignore[arg-type]


def test_same_results_as_plain_pyspark_and_the_local_engine(
    tmp_path: Path,
    spark: Any,
    engine: SparkEngine,
    zygote: Any,
    enclave_identity: Identity,
    recipient: Identity,
) -> None:
    lines = ops.gen_lines(7, 300)
    path = seal_text(tmp_path / "in.sealed", lines, [enclave_identity.public], chunk_size=1024)
    module = FUNCTIONS + ops.AGG_FUNCTIONS
    fns: dict[str, Any] = {"__name__": "flow_functions"}
    exec(compile(module, "<flow functions>", "exec"), fns)  # the same functions, for plain PySpark
    sc = spark.sparkContext
    words_rdd = sc.parallelize(lines, 3).flatMap(fns["words"])
    lens_rdd = words_rdd.map(fns["word_len"])
    plain = {
        "agg": sorted(lens_rdd.aggregateByKey((0, 0), fns["sum_count"], fns["merge_sum_count"], 3).collect()),
        "agg_lists": sorted(
            (k, sorted(v)) for k, v in lens_rdd.aggregateByKey([], fns["append"], fns["concat"]).collect()
        ),
        "fold": sorted(words_rdd.map(fns["one"]).foldByKey(0, fns["add"], 2).collect()),
        "wc": sorted(words_rdd.map(fns["one"]).reduceByKey(fns["add"], 3).collect()),
        "distinct": sorted(words_rdd.distinct(2).collect()),
        "groups": sorted(
            (k, sorted(v)) for k, v in words_rdd.keyBy(fns["first_char"]).groupByKey(2).collect()
        ),
        "sorted": words_rdd.sortBy(fns["length"], numPartitions=1).collect(),
        "long": words_rdd.filter(fns["is_long"]).map(fns["upper"]).collect(),
    }

    def confidential(eng: Any, out: Path) -> dict[str, Any]:
        flow = Flow(module)
        words = flow.text(path, partitions=3).flat_map("words")
        lens = words.map("word_len")
        res = run_and_open(
            flow,
            {
                "agg": lens.aggregate_by_key((0, 0), "sum_count", "merge_sum_count", 3),
                "agg_lists": lens.aggregate_by_key([], "append", "concat"),
                "fold": words.map("one").fold_by_key(0, "add", 2),
                "wc": words.map("one").reduce_by_key("add", 3),
                "distinct": words.distinct(2),
                "groups": words.key_by("first_char").group_by_key(2),
                "sorted": words.sort_by("length"),
                "long": words.filter("is_long").map("upper"),
            },
            eng,
            recipient,
            out,
        )
        return {
            "agg": sorted(res["agg"]),
            "agg_lists": sorted((k, sorted(v)) for k, v in res["agg_lists"]),
            "fold": sorted(res["fold"]),
            "wc": sorted(res["wc"]),
            "distinct": sorted(res["distinct"]),
            "groups": sorted((k, sorted(v)) for k, v in res["groups"]),
            "sorted": res["sorted"],
            "long": res["long"],
        }

    on_spark = confidential(engine, tmp_path / "spark")
    local = confidential(LocalEngine([make_enclave(zygote, enclave_identity)]), tmp_path / "local")
    assert on_spark == plain
    assert local == plain
    assert plain["wc"] and plain["groups"] and plain["sorted"] and plain["agg"] and plain["agg_lists"]


def test_range_sort_on_spark_matches_plain_pyspark_sort_by(
    tmp_path: Path, spark: Any, engine: SparkEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    """sort_by into 3 ranges on Spark vs plain PySpark's sortBy(numPartitions=3) with the same key
    function, ascending and descending, on skewed (90 % one key), duplicated and unicode keys with
    empty source partitions: the same records in the same key order (PySpark leaves the order of
    equal keys open: ours is sorted()'s, stable), and every output partition is a range."""
    import itertools
    import json
    import random

    import test_flow_sort as srt

    rng = random.Random(11)
    records = [
        {"k": "日本" if rng.random() < 0.9 else rng.choice(srt.WORDS) + str(rng.randrange(9)), "i": i}
        for i in range(600)
    ]
    path = seal_text(
        tmp_path / "in.sealed", [json.dumps(r, ensure_ascii=False) for r in records],
        [enclave_identity.public], chunk_size=4096,
    )  # fmt: skip
    fns: dict[str, Any] = {}
    exec(compile(srt.FUNCTIONS, "<flow functions>", "exec"), fns)
    for ascending in (True, False):
        out = tmp_path / f"o-{ascending}"
        flow = Flow(srt.FUNCTIONS)
        action = flow.json_lines(path, partitions=4).sort_by("by_k", ascending, 3).save("s")
        assert flow.run(action, engine=engine, recipients=[recipient.public], out_dir=out)["accepted"]
        parts = srt._parts(out, "s", recipient)
        got = [r for p in parts for r in p]
        plain = spark.sparkContext.parallelize(records, 4).sortBy(fns["by_k"], ascending, 3).collect()
        assert [r["k"] for r in got] == [r["k"] for r in plain]
        assert sorted(got, key=repr) == sorted(plain, key=repr)
        assert got == sorted(records, key=lambda r: r["k"], reverse=not ascending)
        keys = [[r["k"] for r in p] for p in parts if p]
        for a, b in itertools.pairwise(keys):
            assert (max(a) <= min(b)) if ascending else (min(a) >= max(b))


# ---- what Spark sees ------------------------------------------------------------------------------

SECRETS = ["zebra-secret", "ünïcörn-token", "kiwi-private"]
LINES = [f"{SECRETS[i % 3]} common{i % 5} {SECRETS[(i + 1) % 3]}" for i in range(120)]


@pytest.fixture(scope="module")
def secret_input(tmp_path_factory: pytest.TempPathFactory, enclave_identity: Identity) -> Path:
    d = tmp_path_factory.mktemp("flow-spark-in")
    return seal_text(d / "a.sealed", LINES, [enclave_identity.public], chunk_size=1024)


def word_count(path: Path, eng: Any, out: Path, recipient: Identity, *, partitions: int = 3) -> dict:
    flow = Flow(FUNCTIONS)
    wc = flow.text(path, partitions=partitions).flat_map("words").map("one").reduce_by_key("add", 2)
    return flow.run(wc.save("wc"), engine=eng, recipients=[recipient.public], out_dir=out)


def malicious(spark: Any, agent: NodeAgent, attack: str = "none", stage: int = 1) -> MaliciousSparkEngine:
    return MaliciousSparkEngine(
        spark, AgentClient(agent.socket_path), agent.socket_path, attack=attack, stage=stage
    )


def test_spark_handles_no_plaintext_no_code_no_key(
    tmp_path: Path, spark: Any, agent: NodeAgent, secret_input: Path, recipient: Identity
) -> None:
    eng = malicious(spark, agent)
    assert word_count(secret_input, eng, tmp_path / "out", recipient)["accepted"]
    assert dict(open_result(tmp_path / "out", "wc", recipient))["zebra-secret"] == 80
    assert len(eng.seen) > 10 and len(eng.pickled) == 2
    handled = b"".join(eng.seen) + b"".join(eng.pickled)
    for token in [*SECRETS, "common1", "def words", "line.split", "reduce_local", "flat_map"]:
        assert token.encode() not in handled, token
        assert token.encode("utf-16-le") not in handled, token
    for closure in eng.pickled:  # the stub by reference, and its public conf
        assert b"confide.flow.spark_stub" in closure and b"run_partition" in closure


SPARK_ATTACKS = {
    "drop": r"stage 1 partition 0: stream from stage 0 partition \d: .*a batch is missing|stage 1 partition 0: .*end batch counts",
    "duplicate": r"stage 1 partition 0: stream from stage 0 partition \d: batch seq 0 where seq 1 was due \(duplicated",
    "drop_report": r"stage 0 partition 0: no report",
}


@pytest.mark.parametrize("attack", sorted(SPARK_ATTACKS))
def test_spark_side_tampering_is_refused(
    attack: str, tmp_path: Path, spark: Any, agent: NodeAgent, secret_input: Path, recipient: Identity
) -> None:
    eng = malicious(spark, agent, attack)
    with pytest.raises(FlowIntegrityError, match=SPARK_ATTACKS[attack]):
        word_count(secret_input, eng, tmp_path / "out", recipient)
    assert eng.done
    assert not list((tmp_path / "out").glob("*.manifest.cnfseal"))


SORT_ATTACKS = {
    (
        "drop",
        1,
    ): r"stage 1 partition 0: stream from stage 0 partition \d: .*(a batch is missing|end batch counts)",
    (
        "duplicate",
        2,
    ): (
        r"stage 2 partition 0: stream from stage 1 partition \d: "
        r"(batch seq \d+ where seq \d+ was due \(duplicated|batch after the end batch)"
    ),
    ("replay", 2): r"stage 2 partition 0: batch from stage 0 delivered to stage 2",
}


@pytest.mark.parametrize(("attack", "stage"), list(SORT_ATTACKS))
def test_spark_side_tampering_with_a_range_sort_is_refused(
    attack: str,
    stage: int,
    tmp_path: Path,
    spark: Any,
    agent: NodeAgent,
    secret_input: Path,
    recipient: Identity,
) -> None:
    """A batch of the sort's map-to-routing exchange (the samples travel in it) or of its range
    exchange dropped, duplicated or replayed inside Spark's shuffle fails the job."""
    eng = malicious(spark, agent, attack, stage)
    flow = Flow(FUNCTIONS)
    action = (
        flow.text(secret_input, partitions=3).flat_map("words").sort_by("ident", num_partitions=2).save("s")
    )
    with pytest.raises(FlowIntegrityError, match=SORT_ATTACKS[(attack, stage)]):
        flow.run(action, engine=eng, recipients=[recipient.public], out_dir=tmp_path / "out")
    assert eng.done and not list((tmp_path / "out").glob("*.manifest.cnfseal"))


def test_tasks_spark_runs_again_after_a_lost_executor_are_accepted(
    tmp_path: Path, spark: Any, agent: NodeAgent, secret_input: Path, recipient: Identity
) -> None:
    """Every task of both stages (the source-and-map stage and the reduce-and-sink stage) fails once
    after the enclave ran it; Spark runs it again and keeps the second attempt's rows."""
    failed = tmp_path / "failed"
    failed.mkdir()
    eng = FlakySparkEngine(
        spark, AgentClient(agent.socket_path), agent.socket_path, stages=(0, 1), record=str(failed)
    )
    accepted = word_count(secret_input, eng, tmp_path / "out", recipient)
    assert accepted["accepted"]
    # 3 source partitions, 2 reduce partitions: each failed once, then ran again
    assert sorted(p.name for p in failed.iterdir()) == [
        "stage0-part0", "stage0-part1", "stage0-part2", "stage1-part0", "stage1-part1"
    ]  # fmt: skip
    want = Counter(w for line in LINES for w in line.split())
    assert dict(open_result(tmp_path / "out", "wc", recipient)) == dict(want)


def test_speculative_second_attempts_are_accepted_and_leave_one_file_per_part(
    tmp_path: Path, spark: Any, agent: NodeAgent, secret_input: Path, recipient: Identity
) -> None:
    """Every task runs twice and Spark keeps the first attempt's rows (speculative execution): the
    sink's two attempts write two part files (named per attempt), the manifest names the one whose
    report was accepted, and the other is removed when the job finishes. (With one file name per
    part, the later attempt replaced the kept one, and the recipient's open failed its SHA-256 check.)"""
    eng = SpeculativeSparkEngine(spark, AgentClient(agent.socket_path), agent.socket_path, stages=(0, 1))
    before = agent.stats.tasks
    assert word_count(secret_input, eng, tmp_path / "out", recipient)["accepted"]
    assert agent.stats.tasks - before == 2 * (3 + 2)
    want = Counter(w for line in LINES for w in line.split())
    assert dict(open_result(tmp_path / "out", "wc", recipient)) == dict(want)
    parts = sorted(p.name for p in (tmp_path / "out").glob("wc-part-*"))
    assert [n[: len("wc-part-00000")] for n in parts] == ["wc-part-00000", "wc-part-00001"], parts


def test_spark_side_replay_of_an_earlier_stage_is_refused(
    tmp_path: Path, spark: Any, agent: NodeAgent, secret_input: Path, recipient: Identity
) -> None:
    flow = Flow(FUNCTIONS)
    wc = flow.text(secret_input, partitions=2).flat_map("words").map("one").reduce_by_key("add", 2)
    action = wc.map("ident").distinct(2).save("d")
    eng = malicious(spark, agent, "replay", stage=2)
    with pytest.raises(
        FlowIntegrityError, match=r"stage 2 partition 0: batch from stage 0 delivered to stage 2"
    ):
        flow.run(action, engine=eng, recipients=[recipient.public], out_dir=tmp_path / "out")
    assert eng.done


def test_user_function_error_through_spark_names_stage_and_partition(
    tmp_path: Path, engine: SparkEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    path = seal_text(tmp_path / "in.sealed", ["alpha beta"], [enclave_identity.public], chunk_size=1024)
    flow = Flow(FUNCTIONS)
    with pytest.raises(FlowTaskError, match=r"stage 0 partition 0: .*exception \(KeyError\)") as info:
        run_and_open(flow, {"x": flow.text(path).map("boom")}, engine, recipient, tmp_path / "out")  # type: ignore[arg-type]
    assert "secret" not in str(info.value) and "alpha" not in str(info.value)


def test_another_nodes_worker_gets_the_job_key_only_by_grant(
    tmp_path: Path, spark: Any, agent: NodeAgent, zygote: Any, secret_input: Path, recipient: Identity
) -> None:
    """The executors' node agent is another enclave worker: without a grant to its identity it
    cannot run the job's tasks; with one it runs them (the coordinator only opens and verifies)."""
    other = make_enclave(ZygotePool([zygote]), Identity.generate("other-node"))  # type: ignore[arg-type]
    sock = str(Path(agent.socket_path).with_name("other.sock"))
    with NodeAgent(other, sock):
        coord = AgentClient(agent.socket_path)
        denied = SparkEngine(spark, coord, sock)
        with pytest.raises(FlowIntegrityError, match="no job key grant is addressed to it"):
            word_count(secret_input, denied, tmp_path / "o1", recipient)
        granted = SparkEngine(spark, coord, sock, workers=[(other.public_line, other.evidence())])
        assert word_count(secret_input, granted, tmp_path / "o2", recipient)["accepted"]
        assert dict(open_result(tmp_path / "o2", "wc", recipient))["kiwi-private"] == 80


# ---- a real standalone cluster (last: it replaces the module's local session) ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def standalone_cluster(
    work: Path, workers: int = 2, worker_env: list[dict[str, str]] | None = None
) -> Iterator[str]:
    import pyspark

    home = Path(pyspark.__file__).parent
    spark_class = str(home / "bin" / "spark-class")
    env = {
        **os.environ,
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_MEMORY": "192m",
        "PYSPARK_PYTHON": sys.executable,
    }
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str, extra: dict[str, str] | None = None) -> None:
        log = work / f"{name}.log"
        with open(log, "wb") as fh:
            p = subprocess.Popen(
                [spark_class, *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**env, **(extra or {})},
                start_new_session=True,
            )
        procs.append((p, log))

    def wait_for(text: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + 120
        while text not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{log.name}: no {text!r}:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)

    try:
        start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
              "--webui-port", str(_free_port()))  # fmt: skip
        wait_for("I have been elected leader", *procs[0])
        for i in range(workers):
            (work / f"w{i}").mkdir()
            start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                  "--cores", "1", "--memory", "600m", "--webui-port", str(_free_port()),
                  "--work-dir", str(work / f"w{i}"), extra=(worker_env or [{}] * workers)[i])  # fmt: skip
        for p, log in procs[1:]:
            wait_for("Successfully registered with master", p, log)
        yield url
    finally:
        for p, _ in reversed(procs):  # each daemon and the executors it started: its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_word_count_across_two_nodes_each_with_its_own_agent(
    tmp_path: Path, sockdir: Path, agent: NodeAgent, secret_input: Path, recipient: Identity
) -> None:
    """A real standalone cluster of two workers, each standing for a host with its own node agent
    (its own identity, its socket in that worker's CONFIDE_FLOW_SOCKET): the driver's agent opens and
    verifies the job, each node's agent gets the job key only by a grant made after its evidence was
    checked, and the tasks run on both nodes' agents, none on the driver's."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    nodes = [
        start_agent(
            Identity.generate(f"node{i}"), sockdir / f"node{i}.sock", zygotes=1, backend=sim_backend()
        )
        for i in range(2)
    ]
    env = [{SOCKET_ENV: a.socket_path} for a, _ in nodes]
    try:
        with standalone_cluster(tmp_path, worker_env=env) as url:
            session = spark_session(
                url,
                app="confide-flow-cluster",
                **{"spark.executor.memory": "512m", "spark.executor.cores": "1", "spark.cores.max": "2"},
            )
            try:
                sc = session.sparkContext
                deadline = time.monotonic() + 120
                while sc._jsc.sc().getExecutorMemoryStatus().size() < 3:  # the driver and two executors
                    assert time.monotonic() < deadline, "the two executors did not register"
                    time.sleep(0.3)
                coordinator = AgentClient(agent.socket_path)
                workers = [(a.enclave.public_line, a.enclave.evidence()) for a, _ in nodes]
                one = SparkEngine(session, coordinator, agent.socket_path, workers=workers[:1])
                with pytest.raises(FlowIntegrityError, match="no job key grant is addressed to it"):
                    word_count(secret_input, one, tmp_path / "o1", recipient, partitions=4)
                eng = SparkEngine(session, coordinator, agent.socket_path, workers=workers)
                before = agent.stats.tasks
                served = [a.stats.tasks for a, _ in nodes]
                assert word_count(secret_input, eng, tmp_path / "out", recipient, partitions=4)["accepted"]
                served = [a.stats.tasks - n for (a, _), n in zip(nodes, served, strict=True)]
                assert agent.stats.tasks == before  # the driver's agent only opened and verified
                assert sum(served) == 4 + 2 and min(served) > 0, served  # every task, on both nodes
                want = Counter(w for ln in LINES for w in ln.split())
                assert dict(open_result(tmp_path / "out", "wc", recipient)) == want
            finally:
                session.stop()
    finally:
        for a, pool in nodes:
            a.stop()
            pool.close()
