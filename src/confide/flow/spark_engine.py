"""The ``spark`` engine: Apache Spark (PySpark RDDs) schedules the tasks and shuffles the batches.

Spark (driver, executors, the JVM and its Python workers) is untrusted and outside the TCB. Each
stage of the job graph becomes RDD transformations over rows ``(bucket, sealed batch)``:

- a source stage is ``parallelize([], n).mapPartitionsWithIndex(stub)``: the stub asks its node's
  enclave worker to read chunk range p of the sealed input;
- any other stage is ``union(parents).partitionBy(n, bucket)`` (Spark's own shuffle moves the
  sealed batches to the partition their public header names) ``.mapPartitionsWithIndex(stub)``.

The stub (``confide.flow.spark_stub``) pushes the whole partition to the node agent
(``confide.flow.node_agent``) over a unix socket, which runs the task in the enclave worker and
sends back the sealed output batches and the task's sealed report. Each stage's output is persisted
and its reports collected to the driver; at the end the coordinator enclave runs the same
completeness verification as with the local engine, so whatever Spark drops, duplicates or replays
fails the job there, naming stage and partition.

The key of a job reaches the other nodes' workers as HPKE grants to their identities, carried in
the task closure (sealed bytes), each made by the coordinator only after it checked that worker's
evidence (the same build, holding that identity), and each carrying the coordinator's evidence for
that grant, which the worker checks before it takes the key.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from confide.enclave.errors import ConfideError

from .engine import Endpoint, Progress
from .node_agent import raise_error
from .spark_stub import ERROR_ROW, REPORT_ROW, TaskConf, bucket_partition, is_batch, is_meta, run_partition


class SparkEngineError(ConfideError):
    """Spark itself failed (not the enclave): a task crashed, an executor was lost, ..."""


Closure = Callable[..., Any]


class SparkEngine:
    """Runs a job on Spark. `spark` is a SparkSession or SparkContext; `coordinator` the enclave
    worker that opens and verifies the job (an ``AgentClient`` of the driver's node agent, or any
    ``Endpoint``); `socket_path` is where every node's agent listens (the job's public conf);
    `workers` the other nodes' agents as (public line, evidence) pairs (each agent prints both when
    it starts, see node_agent): each gets the job key as a grant once its evidence is checked.

    ``run_stages`` alone runs the stages of a job another enclave opened and will verify (the
    platform's flow task: its enclave worker is the coordinator, between two enclave calls); then
    `coordinator` may be None."""

    def __init__(
        self,
        spark: Any,
        coordinator: Endpoint | None,
        socket_path: str,
        *,
        workers: Sequence[tuple[str, bytes]] = (),
        progress: Progress | None = None,
        task_timeout: float = 600.0,
    ) -> None:
        self.sc = getattr(spark, "sparkContext", spark)
        self.coordinator = coordinator
        self.socket_path = socket_path
        self.workers = list(workers)
        self.progress = progress
        self.task_timeout = task_timeout

    def _coordinator(self) -> Endpoint:
        if self.coordinator is None:
            raise SparkEngineError("this engine has no coordinator to open and verify jobs", where="spark")
        return self.coordinator

    @property
    def enclave_public(self) -> str:
        return self._coordinator().public_line

    def evidence(self, nonce: bytes) -> bytes:
        """The coordinator's evidence for a client's fresh `nonce` (Flow.run checks it)."""
        return self._coordinator().evidence(nonce)

    # ---- hooks (the tests' malicious engine overrides them) ------------------------------------
    def _shuffled(self, stage: int, rdd: Any) -> Any:
        return rdd

    def _closure(self, stage: int, fn: Closure) -> Closure:
        return fn

    def _stage_output(self, stage: int, rdd: Any) -> None:
        return None

    def _reports(self, reports: list[bytes]) -> list[bytes]:
        return reports

    # ---- the job loop ---------------------------------------------------------------------------
    def run(self, sealed_description: bytes, inputs: dict[str, str], out_dir: str) -> dict[str, Any]:
        coordinator = self._coordinator()
        ticket, graph = coordinator.start_job(sealed_description, inputs)
        own = coordinator.public_line
        grants = {}
        for line, evidence in self.workers:
            if line != own:
                wrapped, vouch = coordinator.grant(ticket, line, evidence)
                grants[line] = f"{base64.b64encode(wrapped).decode()}.{base64.b64encode(vouch).decode()}"
        reports = self.run_stages(ticket, graph, grants, inputs, out_dir)
        return coordinator.finish_job(ticket, reports, out_dir)

    def run_stages(
        self,
        ticket: bytes,
        graph: dict[str, Any],
        grants: dict[str, str],
        inputs: dict[str, str],
        out_dir: str,
    ) -> list[bytes]:
        """Every stage of the job graph on Spark, in order; the sealed task reports for the
        coordinator's verification. Raises the first task's error (naming stage and partition), or
        SparkEngineError when Spark itself failed."""
        from pyspark import StorageLevel

        outs: dict[int, Any] = {}
        reports: list[bytes] = []
        try:
            for st in graph["stages"]:
                sid, n = int(st["stage"]), int(st["partitions"])
                conf = TaskConf(
                    socket=self.socket_path,
                    ticket=ticket,
                    stage=sid,
                    grants=grants,
                    source_path=inputs[st["source"]] if st["source"] else None,
                    out_dir=out_dir if st["sink"] else None,
                    timeout=self.task_timeout,
                )
                if st["source"]:
                    rdd = self.sc.parallelize([], n)
                else:
                    parents = [outs[k].filter(is_batch) for k in st["parents"]]
                    rdd = parents[0] if len(parents) == 1 else self.sc.union(parents)
                    rdd = self._shuffled(sid, rdd.partitionBy(n, bucket_partition))
                fn = self._closure(sid, functools.partial(run_partition, conf))
                out = rdd.mapPartitionsWithIndex(fn, preservesPartitioning=False)
                out = out.persist(StorageLevel.MEMORY_AND_DISK)
                self.sc.setJobDescription(f"confide flow stage {sid}")
                try:
                    meta = out.filter(is_meta).collect()
                except Exception as exc:  # py4j / PySpark errors: Spark itself failed
                    raise SparkEngineError(f"Spark failed: {_cause(exc)}", where=f"stage {sid}") from None
                self._raise_errors(sid, meta)
                reports.extend(blob for kind, blob in meta if kind == REPORT_ROW)
                for k in st["parents"]:
                    outs.pop(k).unpersist()
                outs[sid] = out
                self._stage_output(sid, out)
                if self.progress:
                    self.progress(sid, n, n)
        finally:
            for rdd in outs.values():
                rdd.unpersist()
        return self._reports(reports)

    @staticmethod
    def _raise_errors(stage: int, meta: list[tuple[int, bytes]]) -> None:
        errors = []
        for kind, blob in meta:
            if kind == ERROR_ROW:
                try:
                    errors.append(json.loads(blob))
                except ValueError:
                    errors.append({"type": "AgentError", "message": "unreadable error", "where": None})
        if errors:
            errors.sort(key=lambda e: int(e.get("partition", 0)))
            e = errors[0]
            if not e.get("where"):
                e["where"] = f"stage {stage} partition {e.get('partition')}"
            raise_error(e)


_CAUSE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception)): (.*)$")


def _cause(exc: BaseException) -> str:
    """The innermost 'SomeError: message' line of a Spark failure (its Python worker's traceback
    or the JVM's), else the exception's type: what the engine operator needs, one line."""
    found = ""
    for line in str(exc).splitlines():
        m = _CAUSE.match(line.strip())
        if m and "Traceback" not in m.group(3):
            found = f"{m.group(1)}: {m.group(3)}"
            if not m.group(1).startswith(("org.apache", "py4j", "java.")):
                break
    return (found or type(exc).__name__)[:300]


def spark_session(master: str = "local[2]", *, app: str = "confide-flow", **conf: str) -> Any:
    """A SparkSession fit for confidential jobs: Spark's Python workers run this interpreter (which
    imports the stub), no web UI, no progress bar, quiet logs. `conf` adds Spark settings."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.pyspark.python": sys.executable,
        "spark.driver.memory": "512m",
        "spark.sql.shuffle.partitions": "4",
        "spark.python.worker.reuse": "true",
        **conf,
    }
    builder = SparkSession.builder.master(master).appName(app)
    for k, v in settings.items():
        builder = builder.config(k, v)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session
