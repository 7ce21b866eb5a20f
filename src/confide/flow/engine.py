"""Dataflow engines: untrusted schedulers that move only opaque ``(bucket, batch)`` records.

An engine gets a sealed job description and the input paths, asks an enclave worker to start the
job (a ticket and the public job graph come back), runs every task of every stage in order on
enclave workers, hands each task exactly the batches its parents sent to its bucket, and at the
end hands all task reports to the enclave for the completeness verification. It never holds a key,
a plaintext record or the user's code. The interface an engine needs from an enclave worker is
``Endpoint``; the Spark engine (later) implements the same loop with Spark moving the batches.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

Progress = Callable[[int, int, int], None]  # stage, tasks done, tasks in the stage


class Endpoint(Protocol):
    """An enclave worker as an engine sees it: every argument and result is bytes or public JSON."""

    @property
    def public_line(self) -> str: ...

    def start_job(
        self, sealed_description: bytes, inputs: dict[str, str]
    ) -> tuple[bytes, dict[str, Any]]: ...

    def run_task(
        self,
        ticket: bytes,
        stage: int,
        partition: int,
        batches: Sequence[bytes],
        *,
        source_path: str | None = None,
        out_dir: str | None = None,
    ) -> tuple[list[tuple[int, bytes]], bytes]: ...

    def finish_job(self, ticket: bytes, reports: Sequence[bytes], out_dir: str) -> dict[str, Any]: ...

    def evidence(self, nonce: bytes | None = None) -> bytes: ...

    def grant(self, ticket: bytes, worker_line: str, worker_evidence: bytes) -> tuple[bytes, bytes]: ...

    def accept(self, ticket: bytes, wrapped: bytes, granter_evidence: bytes) -> None: ...


def terminal_progress(stage: int, done: int, total: int) -> None:
    sys.stderr.write(f"\rstage {stage}: {done}/{total} tasks")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class LocalEngine:
    """Runs a job on this machine. `workers` are enclave workers (the first one also opens and
    verifies the job); the tasks of a stage run on them concurrently, one at a time per worker.
    Subclasses may override the ``_deliver``/``_tasks``/``_reports``/``_source`` hooks (the tests'
    malicious engine does)."""

    def __init__(self, workers: Sequence[Endpoint], *, progress: Progress | None = None) -> None:
        if not workers:
            raise ValueError("an engine needs at least one enclave worker")
        self.workers = list(workers)
        self.progress = progress
        self.batches_moved = 0
        self.bytes_moved = 0

    @property
    def enclave_public(self) -> str:
        return self.workers[0].public_line

    def evidence(self, nonce: bytes) -> bytes:
        """The coordinator's evidence for a client's fresh `nonce` (Flow.run checks it)."""
        return self.workers[0].evidence(nonce)

    # ---- hooks ---------------------------------------------------------------------------------
    def _deliver(self, stage: int, partition: int, batches: list[bytes]) -> list[bytes]:
        return batches

    def _tasks(self, stage: int, partitions: int) -> list[int]:
        return list(range(partitions))

    def _reports(self, reports: list[bytes]) -> list[bytes]:
        return reports

    def _source(self, stage: int, partition: int, path: str) -> str:
        return path

    def _outputs(
        self, stage: int, partition: int, outputs: list[tuple[int, bytes]]
    ) -> list[tuple[int, bytes]]:
        return outputs

    # ---- the job loop ---------------------------------------------------------------------------
    def run(self, sealed_description: bytes, inputs: dict[str, str], out_dir: str) -> dict[str, Any]:
        coordinator = self.workers[0]
        ticket, graph = coordinator.start_job(sealed_description, inputs)
        for w in self.workers[1:]:  # each gets the job key after the coordinator checked its evidence
            w.accept(ticket, *coordinator.grant(ticket, w.public_line, w.evidence()))
        # per stage: bucket -> batches, in the order the producing tasks returned them
        store: dict[int, dict[int, list[bytes]]] = {}
        reports: list[bytes] = []
        lock = threading.Lock()
        free = list(range(len(self.workers)))
        free_cv = threading.Condition(lock)
        for st in graph["stages"]:
            sid, n = st["stage"], st["partitions"]
            store[sid] = defaultdict(list)
            tasks = self._tasks(sid, n)
            done = 0

            def one(
                p: int, st: dict[str, Any] = st, sid: int = sid
            ) -> tuple[int, list[tuple[int, bytes]], bytes]:
                blobs = [b for k in st["parents"] for b in store[k].get(p, [])]
                blobs = self._deliver(sid, p, blobs)
                src = self._source(sid, p, inputs[st["source"]]) if st["source"] else None
                with free_cv:
                    while not free:
                        free_cv.wait()
                    wi = free.pop()
                try:
                    outs, report = self.workers[wi].run_task(
                        ticket, sid, p, blobs, source_path=src, out_dir=None if not st["sink"] else out_dir
                    )
                finally:
                    with free_cv:
                        free.append(wi)
                        free_cv.notify()
                return p, self._outputs(sid, p, outs), report

            if len(self.workers) == 1:
                results = [one(p) for p in tasks]
            else:
                with ThreadPoolExecutor(len(self.workers)) as pool:
                    results = list(pool.map(one, tasks))
            for _p, outs, report in results:
                for bucket, blob in outs:
                    store[sid][bucket].append(blob)
                    self.batches_moved += 1
                    self.bytes_moved += len(blob)
                reports.append(report)
                done += 1  # noqa: SIM113
                if self.progress:
                    self.progress(sid, done, len(tasks))
            for k in st["parents"]:
                store.pop(k, None)
        return coordinator.finish_job(ticket, self._reports(reports), out_dir)
