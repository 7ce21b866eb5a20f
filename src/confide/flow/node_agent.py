"""The node agent: ONE long-lived enclave worker per node, served on a local unix socket.

Starting an enclave worker per Spark task would cost far more than the task, so each node runs one
agent; the Spark-side stubs (``confide.flow.spark_stub``) of every task on that node connect to its
socket and push whole partitions of sealed batches (and get sealed batches back) over
``confide.flow.channel``. The agent holds a ``FlowEnclave`` (the TCB: it alone has the job key,
opens batches and runs the user's functions in its sandbox) and a small pool of sandbox zygotes so
that the tasks of a node run concurrently. The socket server itself handles only bytes.

``AgentClient`` is the same worker seen through the socket, as an ``Endpoint`` (the Spark engine's
driver uses it to start and verify jobs). ``python -m confide.flow.node_agent --socket PATH
[--identity KEYFILE] [--backend sim --platform DIR --config TOML]`` runs an agent until killed (or,
with ``--exit-with-stdin``, until its stdin closes: its parent went away); when it serves it prints
``ready <public line>`` and ``evidence <base64>`` (what a Spark driver passes as `workers`). Without
``--identity`` its key pair is generated inside the agent and never written: what the platform's
server starts (confide.host.flow_engine), so the host never holds the key its job grants are sealed to.

A worker that does not hold the job gets the job key from the grant the engine forwards with the
task: HPKE-sealed to its identity by a coordinator that first checked this worker's evidence, and
taken only with the coordinator's evidence for that very grant (FlowEnclave.grant/accept).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confide.enclave import errors as enclave_errors
from confide.enclave.backend import TeeBackend
from confide.enclave.flow import FlowEnclave, parse_header
from confide.enclave.flow import errors as flow_errors
from confide.enclave.keys import Identity
from confide.enclave.sandbox import SandboxLimits, Zygote
from confide.enclave.sandbox.zygote import PARQUET_READER

from .channel import ChannelError, Conn

REPORT_BUCKET = 0xFFFFFFFF
MAX_JOBS = 16  # jobs an agent holds the keys of; beyond, the oldest it took is forgotten
_BUCKET = struct.Struct(">I")

_ERRORS: dict[str, type[enclave_errors.ConfideError]] = {
    c.__name__: c
    for c in (
        flow_errors.FlowIntegrityError,
        flow_errors.FlowTaskError,
        flow_errors.FlowFormatError,
        enclave_errors.IntegrityError,
        enclave_errors.FormatError,
        enclave_errors.KeyMismatchError,
        enclave_errors.EnclaveError,
        enclave_errors.SandboxError,
        enclave_errors.ConfideError,
    )
}


class AgentError(enclave_errors.ConfideError):
    """The node agent failed for a reason it does not disclose (not a Confide error)."""


def error_json(exc: BaseException) -> dict[str, Any]:
    """What the agent tells the engine about a failure: Confide errors carry a message meant for a
    person (they name what failed and where, never data); anything else only its type."""
    if isinstance(exc, enclave_errors.ConfideError):
        name = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _ERRORS), "ConfideError")
        return {"ok": False, "type": name, "message": exc.message, "where": exc.where}
    return {
        "ok": False,
        "type": "AgentError",
        "message": f"the enclave worker failed ({type(exc).__name__})",
        "where": None,
    }


def raise_error(obj: dict[str, Any]) -> None:
    cls = _ERRORS.get(str(obj.get("type")), AgentError)
    raise cls(str(obj.get("message", "")), where=obj.get("where") or None)


class ZygotePool:
    """Several zygotes behind one ``run``: a node's tasks run concurrently, one per zygote."""

    def __init__(self, zygotes: Sequence[Zygote]) -> None:
        if not zygotes:
            raise ValueError("a pool needs at least one zygote")
        self.zygotes = list(zygotes)
        self._free = list(self.zygotes)
        self._cv = threading.Condition()

    def run(self, *args: Any, **kw: Any) -> Any:
        with self._cv:
            while not self._free:
                self._cv.wait()
            z = self._free.pop()
        try:
            return z.run(*args, **kw)
        finally:
            with self._cv:
                self._free.append(z)
                self._cv.notify()

    def close(self) -> None:
        for z in self.zygotes:
            z.close()


class AgentStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.enclave_seconds = 0.0

    def add(self, bytes_in: int, bytes_out: int, seconds: float) -> None:
        with self.lock:
            self.tasks += 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out
            self.enclave_seconds += seconds


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        conn = Conn(self.request)
        try:
            while True:
                try:
                    req = conn.recv_json()
                except ChannelError:
                    return  # the stub closed the connection
                self.server.agent.serve_one(req, conn)
                conn.flush()
        except (ChannelError, OSError):
            return
        finally:
            conn.close()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    agent: NodeAgent


class NodeAgent:
    """Serves one enclave worker (`enclave`: a FlowEnclave) on the unix socket `socket_path`."""

    def __init__(self, enclave: FlowEnclave, socket_path: str | Path) -> None:
        self.enclave = enclave
        self.socket_path = str(socket_path)
        self.stats = AgentStats()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._accept_lock = threading.Lock()
        self._taken: list[str] = []  # the jobs this agent took by grant, oldest first

    def start(self) -> NodeAgent:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = _Server(self.socket_path, _Handler)
        os.chmod(self.socket_path, 0o600)
        server.agent = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="flow-node-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- one request -------------------------------------------------------------------------------

    def serve_one(self, req: dict[str, Any], conn: Conn) -> None:
        op = req.get("op")
        frames = list(conn.recv_list())
        try:
            if op == "run_task":
                self._run_task(req, frames, conn)
                return
            if op == "echo":  # the channel's own throughput, no enclave work
                conn.send_json({"ok": True})
                conn.send_list(frames)
                return
            answer, out = self._control(op, req, frames)
        except Exception as exc:  # every failure goes back to the engine, described safely
            conn.send_json(error_json(exc))
            conn.send(b"")
            return
        conn.send_json({"ok": True, **answer})
        conn.send_list(out)

    def _control(
        self, op: Any, req: dict[str, Any], frames: list[bytes]
    ) -> tuple[dict[str, Any], list[bytes]]:
        e = self.enclave
        if op == "public_line":
            return {"public_line": e.public_line}, []
        if op == "start_job":
            ticket, graph = e.start_job(frames[0], dict(req["inputs"]))
            return {"graph": graph}, [ticket]
        if op == "finish_job":
            return {"summary": e.finish_job(frames[0], frames[1:], str(req["out_dir"]))}, []
        if op == "evidence":
            return {}, [e.evidence(frames[0] if frames else None)]
        if op == "grant":
            return {}, list(e.grant(frames[0], str(req["worker_line"]), frames[1]))
        if op == "accept":
            e.accept(frames[0], frames[1], frames[2])
            return {}, []
        raise enclave_errors.FormatError(f"unknown operation {op!r}", where="node agent")

    def _ensure_job(self, ticket: bytes, grants: dict[str, str]) -> None:
        """Take the job key from the grant addressed to this worker, the first time it sees the job."""
        job = parse_header(ticket, where="ticket")[0].job
        with self._accept_lock:
            wrapped = grants.get(self.enclave.public_line)
            if job in self.enclave._jobs and (wrapped is None or self._key_opens(ticket)):
                return
            if wrapped is None:
                raise flow_errors.FlowIntegrityError(
                    "this worker does not hold the job and no job key grant is addressed to it",
                    where="node agent",
                )
            key, _, evidence = wrapped.partition(".")
            self.enclave.accept(ticket, base64.b64decode(key), base64.b64decode(evidence))
            if job in self._taken:
                self._taken.remove(job)
            self._taken.append(job)
            while len(self._taken) > MAX_JOBS:
                self.enclave._jobs.pop(self._taken.pop(0), None)

    def _key_opens(self, ticket: bytes) -> bool:
        """True when the job key this worker holds opens `ticket` (the same run of the job); False
        for another run of a job of that id (a platform task run again), whose grant brings a new key."""
        try:
            self.enclave._job(ticket)
        except enclave_errors.ConfideError:
            return False
        return True

    def _run_task(self, req: dict[str, Any], frames: list[bytes], conn: Conn) -> None:
        t0 = time.perf_counter()
        try:
            if not frames:
                raise enclave_errors.FormatError("a task request needs its ticket", where="node agent")
            ticket, batches = frames[0], frames[1:]
            self._ensure_job(ticket, dict(req.get("grants") or {}))
            outputs, report = self.enclave.run_task(
                ticket,
                int(req["stage"]),
                int(req["partition"]),
                batches,
                source_path=req.get("source_path"),
                out_dir=req.get("out_dir"),
            )
        except Exception as exc:
            conn.send_json(error_json(exc))
            conn.send(b"")
            return
        seconds = time.perf_counter() - t0
        conn.send_json({"ok": True, "outputs": len(outputs)})
        sent = 0
        for bucket, blob in outputs:
            conn.send(_BUCKET.pack(bucket) + blob)
            sent += len(blob)
        conn.send(_BUCKET.pack(REPORT_BUCKET) + report)
        conn.send(b"")
        self.stats.add(sum(len(b) for b in batches), sent, seconds)


class AgentClient:
    """A node agent as an ``Endpoint`` (one request at a time per client)."""

    def __init__(self, socket_path: str | Path) -> None:
        self.socket_path = str(socket_path)
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self._public: str | None = None

    def _call(self, req: dict[str, Any], frames: Sequence[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        with self._lock:
            if self._conn is None:
                self._conn = Conn.connect(self.socket_path)
            c = self._conn
            try:
                c.send_json(req)
                c.send_list(frames)
                c.flush()
                answer = c.recv_json()
                out = list(c.recv_list())
            except (ChannelError, OSError):
                c.close()
                self._conn = None
                raise
        if not answer.get("ok"):
            raise_error(answer)
        return answer, out

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def public_line(self) -> str:
        if self._public is None:
            self._public = str(self._call({"op": "public_line"}, [])[0]["public_line"])
        return self._public

    def start_job(self, sealed_description: bytes, inputs: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
        answer, out = self._call({"op": "start_job", "inputs": inputs}, [sealed_description])
        return out[0], answer["graph"]

    def run_task(
        self,
        ticket: bytes,
        stage: int,
        partition: int,
        batches: Sequence[bytes],
        *,
        source_path: str | None = None,
        out_dir: str | None = None,
    ) -> tuple[list[tuple[int, bytes]], bytes]:
        req = {
            "op": "run_task",
            "stage": stage,
            "partition": partition,
            "source_path": source_path,
            "out_dir": out_dir,
        }
        _, out = self._call(req, [ticket, *batches])
        outputs, report = split_outputs(out)
        return outputs, report

    def finish_job(self, ticket: bytes, reports: Sequence[bytes], out_dir: str) -> dict[str, Any]:
        return dict(self._call({"op": "finish_job", "out_dir": out_dir}, [ticket, *reports])[0]["summary"])

    def evidence(self, nonce: bytes | None = None) -> bytes:
        return self._call({"op": "evidence"}, [nonce] if nonce else [])[1][0]

    def grant(self, ticket: bytes, worker_line: str, worker_evidence: bytes) -> tuple[bytes, bytes]:
        out = self._call({"op": "grant", "worker_line": worker_line}, [ticket, worker_evidence])[1]
        return out[0], out[1]

    def accept(self, ticket: bytes, wrapped: bytes, granter_evidence: bytes) -> None:
        self._call({"op": "accept"}, [ticket, wrapped, granter_evidence])


def split_outputs(frames: Sequence[bytes]) -> tuple[list[tuple[int, bytes]], bytes]:
    outputs: list[tuple[int, bytes]] = []
    report = b""
    for f in frames:
        (bucket,) = _BUCKET.unpack_from(f)
        if bucket == REPORT_BUCKET:
            report = f[_BUCKET.size :]
        else:
            outputs.append((bucket, f[_BUCKET.size :]))
    return outputs, report


def start_agent(
    identity: Identity,
    socket_path: str | Path,
    *,
    zygotes: int = 2,
    limits: SandboxLimits | None = None,
    backend: TeeBackend | None = None,
    strict: bool = True,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
) -> tuple[NodeAgent, ZygotePool]:
    pool = ZygotePool(
        [Zygote.start(strict=strict, preimport=(PARQUET_READER,)) for _ in range(max(1, zygotes))]
    )
    enclave = FlowEnclave(
        identity,
        pool,  # type: ignore[arg-type]
        limits=limits,
        backend=backend,
        memory_budget=memory_budget,
        spill_dir=spill_dir,
    )
    return NodeAgent(enclave, socket_path).start(), pool


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m confide.flow.node_agent", description=__doc__)
    ap.add_argument("--socket", required=True, help="unix socket path the node's stubs connect to")
    ap.add_argument(
        "--identity",
        default=None,
        help="the worker's identity key file (default: a fresh key, never written)",
    )
    ap.add_argument("--zygotes", type=int, default=2, help="concurrent tasks (sandbox zygotes)")
    ap.add_argument("--backend", default="sim", help="TEE backend that vouches for this worker")
    ap.add_argument("--platform", default=None, help="the simulated platform directory (sim backend)")
    ap.add_argument("--config", default=None, help="enclave configuration (TOML): the enclave workers' own")
    ap.add_argument(
        "--spill-dir", default=None, help="spill a task over half the configured memory budget here, sealed"
    )
    ap.add_argument("--exit-with-stdin", action="store_true", help="stop when stdin closes (the parent left)")
    args = ap.parse_args(argv)
    try:
        from confide.enclave.backend import create_backend
        from confide.enclave.config import EnclaveConfig
        from confide.enclave.pipeline import MIN_WORKING_MEMORY

        config = EnclaveConfig.load(Path(args.config) if args.config else None)
        identity = (
            Identity.load(Path(args.identity)) if args.identity else Identity.generate("confide-flow-agent")
        )
        platform = Path(
            args.platform or Path(os.environ.get("CONFIDE_HOME") or "~/.confide").expanduser() / "platform"
        )
        backend = create_backend(args.backend, platform_dir=platform, config=config)
        limits = SandboxLimits(
            memory_bytes=max(MIN_WORKING_MEMORY, config.memory_budget_bytes),
            cpu_seconds=config.cpu_seconds,
            wall_seconds=float(config.wall_seconds),
        )
        agent, pool = start_agent(
            identity,
            args.socket,
            zygotes=args.zygotes,
            backend=backend,
            limits=limits,
            strict=config.sandbox == "strict",
            memory_budget=config.memory_budget_bytes // 2 if args.spill_dir else None,
            spill_dir=args.spill_dir,
        )
    except (OSError, enclave_errors.ConfideError) as exc:
        print(f"error: {exc} (node agent)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_with_stdin:

        def watch() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            stop.set()

        threading.Thread(target=watch, name="flow-agent-stdin", daemon=True).start()
    print(f"ready {agent.enclave.public_line}", flush=True)
    print(f"evidence {base64.b64encode(agent.enclave.evidence()).decode()}", flush=True)
    stop.wait()
    agent.stop()
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
