"""The platform's engine for dataflow tasks (`confide serve --flow-engine spark`). Untrusted.

With the default (`local`) a flow task runs whole inside the enclave worker's `task` call. With
`spark` the enclave worker only opens and verifies the job: its `task` call checks the manifest,
approvals and inputs, builds the job description inside the enclave and returns the sealed ticket,
the public job graph and the job-key grants for the node agents named here; this module runs the
stages on Spark (``confide.flow.spark_engine.SparkEngine.run_stages``), whose Python workers push
the sealed batches to a node agent; the enclave worker's `flow_finish` then verifies the reports and
seals the outputs. Spark and this process handle only what the client-side Spark path shows them.

The node agent (``confide.flow.node_agent``) is started by the server like its enclave workers: a
``FlowEnclave`` process with the server's TEE backend, platform and enclave configuration (so the
same measurement: the enclave worker grants it the job key only after checking its evidence), its
bytecode the checked-hash cache (enclave/bytecode.py), its key pair generated inside it and never
written. It stops with the server (its stdin closes). One agent serves one host; on a cluster each
other host runs its own (``python -m confide.flow.node_agent``, whose first two lines of output,
``ready LINE`` and ``evidence B64``, go in a file the server reads: ``confide serve --flow-agent
FILE``), and its Spark worker sets ``CONFIDE_FLOW_SOCKET`` to that agent's socket. `agents()` names
them all to the enclave, which grants the job key to each only once its evidence is checked.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from confide.enclave.bytecode import interpreter_args
from confide.enclave.errors import ConfideError
from confide.enclave.keys import PublicIdentity

log = logging.getLogger("confide.host")

AGENT_START_TIMEOUT_S = 180.0
ENGINES = ("local", "spark")


class FlowEngineUnavailable(ConfideError):
    """The engine (Spark, or its node agent) did not start: flow tasks cannot run on it now."""


class NodeAgentProcess:
    """`python -m confide.flow.node_agent` for this server: (public line, evidence) once ready."""

    def __init__(
        self,
        socket_path: Path,
        *,
        platform_dir: Path,
        backend: str,
        config: Path | None,
        spill_dir: Path,
        zygotes: int = 2,
    ) -> None:
        self.socket_path = str(socket_path)
        spill_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = [
            sys.executable,
            *interpreter_args(),
            "-m",
            "confide.flow.node_agent",
            "--socket",
            self.socket_path,
            "--backend",
            backend,
            "--platform",
            str(platform_dir),
            "--zygotes",
            str(zygotes),
            "--spill-dir",
            str(spill_dir),
            "--exit-with-stdin",
        ]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self.public_line, self.evidence = self._read_ready()

    def _read_ready(self) -> tuple[str, str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        got: dict[str, str] = {}
        buf = b""
        while "ready" not in got or "evidence" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.close()
                raise FlowEngineUnavailable(
                    f"the node agent did not start (exit code {self.proc.returncode}; its errors are in "
                    "the server's log)",
                    where="flow engine",
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    continue  # exited: poll() says so on the next turn
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    word, _, rest = raw.decode("utf-8", "replace").partition(" ")
                    if word in ("ready", "evidence"):
                        got[word] = rest.strip()
        return got["ready"], got["evidence"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the agent's signal to stop
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


MakeEngine = Callable[[Any, str], Any]  # (SparkSession, agent socket) -> a SparkEngine
MAX_ANNOUNCEMENT = 1 << 20


def read_agent_announcement(path: Path) -> tuple[str, str]:
    """Another host's node agent as its start-up output announced it (``ready LINE`` and ``evidence
    B64``, in a file): (public line, evidence base64). Only its form is checked here; the enclave
    checks the evidence before it grants that agent a job key."""
    where = f"--flow-agent {path}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_ANNOUNCEMENT + 1)
    except OSError as exc:
        raise ConfideError(
            f"cannot read the node agent's announcement ({exc.strerror})", where=where
        ) from None
    if len(raw) > MAX_ANNOUNCEMENT:
        raise ConfideError("the node agent's announcement is over 1 MiB", where=where)
    got: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        word, _, rest = line.partition(" ")
        if word in ("ready", "evidence") and rest.strip():
            got.setdefault(word, rest.strip())
    missing = [w for w in ("ready", "evidence") if w not in got]
    if missing:
        raise ConfideError(
            f"no {' and no '.join(repr(w + ' ...') for w in missing)} line: give the first two lines "
            "`python -m confide.flow.node_agent` printed",
            where=where,
        )
    try:
        PublicIdentity.from_line(got["ready"], where=where)
        base64.b64decode(got["evidence"], validate=True)
    except ConfideError:
        raise
    except ValueError:
        raise ConfideError("the evidence line is not base64", where=where) from None
    return got["ready"], got["evidence"]


class SparkFlowEngine:
    """One SparkSession (`master`) and one node agent for this server's flow tasks, started in the
    background when the server starts; `run_stages` runs one task's stages. `make_engine` builds the
    SparkEngine for a task (tests pass a malicious one; the server uses SparkEngine)."""

    def __init__(
        self,
        *,
        master: str,
        work_dir: Path,
        platform_dir: Path,
        backend: str = "sim",
        enclave_config: Path | None = None,
        make_engine: MakeEngine | None = None,
        remote_agents: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.master = master
        self.remote_agents = [list(a) for a in remote_agents]  # other hosts' (public line, evidence)
        self.work_dir = work_dir
        self.platform_dir = platform_dir
        self.backend = backend
        self.enclave_config = enclave_config
        self.make_engine = make_engine
        self.spark: Any = None
        self.agent: NodeAgentProcess | None = None
        self._sock_dir: str | None = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SparkFlowEngine:
        self._thread = threading.Thread(target=self._start, name="confide-flow-engine", daemon=True)
        self._thread.start()
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        try:
            from confide.flow.spark_engine import spark_session

            self._sock_dir = tempfile.mkdtemp(prefix="cf-agent-")  # a unix socket path is < 108 bytes
            # spill files a killed agent left (sealed under keys that died with it)
            shutil.rmtree(self.work_dir / "spill", ignore_errors=True)
            self.agent = NodeAgentProcess(
                Path(self._sock_dir) / "agent.sock",
                platform_dir=self.platform_dir,
                backend=self.backend,
                config=self.enclave_config,
                spill_dir=self.work_dir / "spill",
            )
            self.spark = spark_session(self.master, app="confide-serve-flow")
            log.info(
                "flow engine: Spark %s and a node agent (key %s, generated in it) ready in %.1f s",
                self.master,
                PublicIdentity.from_line(self.agent.public_line, where="node agent").fingerprint,
                time.monotonic() - t0,
            )
        except ConfideError as exc:
            self._error = str(exc)
        except Exception as exc:  # Spark or Java missing, a JVM that did not start: say so per task
            self._error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        finally:
            if self._error:
                log.error("flow engine: Spark %s did not start: %s", self.master, self._error)
            self._ready.set()

    def _wait(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise FlowEngineUnavailable(f"Spark {self.master} is still starting", where="flow engine")
        if self._error or self.agent is None or self.spark is None:
            raise FlowEngineUnavailable(
                f"Spark {self.master} did not start: {self._error}", where="flow engine"
            )

    def agents(self, timeout: float = AGENT_START_TIMEOUT_S) -> list[list[str]]:
        """The node agents as the enclave's `flow_agents`: [[public line, evidence (base64)]]."""
        self._wait(timeout)
        assert self.agent is not None
        return [[self.agent.public_line, self.agent.evidence], *self.remote_agents]

    def run_stages(
        self, task_id: str, start: dict[str, Any], inputs: dict[str, str], out_dir: Path
    ) -> list[bytes]:
        """The stages of the job the enclave started (`start`: its reply's `flow`); the sealed reports."""
        from confide.flow.spark_engine import SparkEngine

        self._wait(0)
        assert self.agent is not None

        def progress(stage: int, done: int, total: int) -> None:
            log.info("task %s: stage %d done on Spark (%d task(s))", task_id, stage, total)

        sock = self.agent.socket_path
        engine = (
            self.make_engine(self.spark, sock)
            if self.make_engine
            else SparkEngine(self.spark, None, sock, progress=progress)
        )
        return list(
            engine.run_stages(
                base64.b64decode(start["ticket"]),
                start["graph"],
                dict(start["grants"]),
                inputs,
                str(out_dir),
            )
        )

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join(AGENT_START_TIMEOUT_S)
        if self.spark is not None:
            with contextlib.suppress(Exception):
                self.spark.stop()
            self.spark = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None


def check_available(engine: str) -> None:
    """`--flow-engine spark` needs PySpark (`pip install confide[spark]`) and a Java runtime."""
    if engine not in ENGINES:
        raise ConfideError(
            f"unknown flow engine {engine!r} (one of {', '.join(ENGINES)})", where="--flow-engine"
        )
    if engine == "spark":
        import importlib.util

        if importlib.util.find_spec("pyspark") is None:
            raise ConfideError(
                "PySpark is not installed (pip install confide[spark]; it needs Java 17)",
                where="--flow-engine spark",
            )
        if shutil.which("java") is None and not _java_home():
            raise ConfideError(
                "no Java runtime found (java on PATH or JAVA_HOME)", where="--flow-engine spark"
            )


def _java_home() -> bool:
    import os

    home = os.environ.get("JAVA_HOME")
    return home is not None and Path(home, "bin", "java").exists()


def run_on_engine(
    engine: SparkFlowEngine,
    call: Callable[..., dict[str, Any]],
    task_id: str,
    start: dict[str, Any],
    inputs: dict[str, str],
    work: Path,
) -> dict[str, Any]:
    """The host's part of a flow task the enclave worker started (`start`: its `task` reply's `flow`):
    the stages on Spark, the sealed reports written for `flow_finish`, then `call("flow_finish")`,
    whose reply is the task's (receipt, outputs). A failure on the engine (a node agent's refusal,
    naming stage and partition; Spark's own) goes to `flow_finish` as `engine_error`: the enclave
    drops the job and signs the failure."""
    from confide.enclave.flow.in_enclave import write_reports

    out_dir = work / "flow-out"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    finish: dict[str, Any] = {
        "task_id": task_id,
        "reports": str(work / "flow-reports.bin"),
        "out_dir": str(out_dir),
    }
    graph = start.get("graph")
    stages = len(graph.get("stages", ())) if isinstance(graph, dict) else 0
    log.info("task %s: dataflow job opened in the enclave; its %d stage(s) run on Spark", task_id, stages)
    t0 = time.monotonic()
    try:
        write_reports(finish["reports"], engine.run_stages(task_id, start, inputs, out_dir))
        log.info("task %s: every stage ran on Spark (%.1f s); verifying", task_id, time.monotonic() - t0)
    except ConfideError as exc:  # a node agent's refusal (names stage and partition), Spark's failure
        finish["engine_error"] = (f"{exc.message} ({exc.where})" if exc.where else exc.message)[:4000]
        log.warning("task %s: failed on Spark: %s", task_id, finish["engine_error"])
    except Exception as exc:  # the engine's own bug, a malformed start: the task fails, and says so
        finish["engine_error"] = f"the engine failed ({type(exc).__name__})"
        log.exception("task %s: the flow engine failed", task_id)
    return call("flow_finish", **finish)
