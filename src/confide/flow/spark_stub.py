"""What Spark's Python workers run: a stub that pushes a partition's sealed batches to the node's
enclave worker and yields the sealed batches it gets back. Outside the TCB.

Spark pickles only ``functools.partial(run_partition, TaskConf(...))``: this module's function by
reference and a ``TaskConf`` of public values and opaque sealed bytes (the socket path, the sealed
ticket, the job key grants HPKE-sealed to each worker, the stage, paths). No user code, no key and
no plaintext: the user's functions come from the sealed job description, opened in the enclave.

The stub connects to its own node's agent: ``$CONFIDE_FLOW_SOCKET`` when the executor's environment
sets it (a node whose agent listens elsewhere: set it in that Spark worker's environment, which its
executors inherit), else the job's ``TaskConf.socket``. Which agent serves a task decides nothing:
only an agent holding the job key (its own, or by a grant to its identity) can run it, and the
coordinator's verification accepts each task's sealed report once.

Rows are ``(bucket, sealed batch)``; a task's sealed report comes back as ``(REPORT_ROW, report)``
and a failure as ``(ERROR_ROW, JSON)`` (the error as the enclave worker described it), so the
driver collects them with the stage's reports instead of digging them out of Spark's stack traces.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .channel import Conn

SOCKET_ENV = "CONFIDE_FLOW_SOCKET"  # this node's agent socket, where it is not the job's default
REPORT_ROW = -1
ERROR_ROW = -2
_BUCKET = struct.Struct(">I")
_REPORT_BUCKET = 0xFFFFFFFF


@dataclass(frozen=True)
class TaskConf:
    socket: str
    ticket: bytes
    stage: int
    grants: dict[str, str] = field(default_factory=dict)
    source_path: str | None = None
    out_dir: str | None = None
    timeout: float | None = 600.0


def stream_order(blob: bytes) -> tuple[int, int, int]:
    """(stage, source partition, seq) from a batch's public header: the order the enclave expects
    within each stream (Spark's shuffle keeps it in practice, but does not promise it)."""
    from confide.enclave.flow.batch import parse_header

    h = parse_header(blob, where="spark stub")[0]
    return (h.stage, h.part, h.seq)


def run_partition(
    conf: TaskConf, index: int, rows: Iterable[tuple[int, bytes]]
) -> Iterator[tuple[int, bytes]]:
    blobs = sorted((blob for _, blob in rows), key=stream_order)
    req = {
        "op": "run_task",
        "stage": conf.stage,
        "partition": index,
        "source_path": conf.source_path,
        "out_dir": conf.out_dir,
        "grants": conf.grants,
    }
    conn = Conn.connect(os.environ.get(SOCKET_ENV) or conf.socket, timeout=conf.timeout)
    try:
        conn.send_json(req)
        conn.send(conf.ticket)
        conn.send_list(blobs)
        conn.flush()
        del blobs
        answer = conn.recv_json()
        if not answer.get("ok"):
            yield (ERROR_ROW, json.dumps({**answer, "partition": index}).encode())
            return
        for f in conn.recv_list():
            (bucket,) = _BUCKET.unpack_from(f)
            yield (REPORT_ROW if bucket == _REPORT_BUCKET else bucket, f[_BUCKET.size :])
    finally:
        conn.close()


def is_batch(row: tuple[int, bytes]) -> bool:
    return row[0] >= 0


def is_meta(row: tuple[int, bytes]) -> bool:
    return row[0] < 0


def bucket_partition(bucket: int) -> int:
    return bucket
