"""Zygote: the enclave-side handle on the sandbox.

Zygote.start spawns the zygote as a FRESH interpreter (fork + exec, only the control socket is
inherited, a minimal environment) rather than a bare fork of the caller: the zygote then cannot
inherit the caller's memory, keys, descriptors or threads, whatever state the caller is in.

Zygote.run sends one request per function run. Source and params travel in a sealed memfd that only
the child reads; inputs go as the caller's fds (reopened read-only in the child); each output gets
a pipe whose read end stays here and is streamed into the caller's sink, capped. A run may also get
`stream`, the child's two ends of a byte stream to an accelerator process (a pipe to read, a pipe
to write) that the enclave opened and handed the host the other ends of; they are passed as they
are (never reopened) and become ``ctx.accelerator``.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from confide.enclave.bytecode import inherited_args
from confide.enclave.errors import SandboxError
from confide.enclave.sandbox.api import LAYER_NAMES, OutputSink, RunResult, SandboxLimits
from confide.enclave.sandbox.environment import zygote_environment
from confide.enclave.sandbox.memfd import check_input_fd, make_input_memfd
from confide.enclave.sandbox.outcome import LOG_CAP, STATUS_CAP, Observed, classify
from confide.enclave.sandbox.protocol import MAX_FDS, recv_msg, send_msg

START_TIMEOUT_S = 120.0
REPORT_GRACE_S = 30.0  # the zygote must report this long after the wall deadline at the latest
DRAIN_S = 2.0  # pipes must reach EOF this long after the child exited
_READ_CHUNK = 1 << 20

_BOOT = (
    "import json, sys\n"
    "cfg = json.loads(sys.argv[1])\n"
    "sys.path[:] = cfg['sys_path']\n"
    "from confide.enclave.sandbox.server import main\n"
    "main(cfg)\n"
)


def _kill_process(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    try:
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# What the built-ins and parties' functions find already imported. The PME reader (and with it
# pyarrow) is here because a child may not be able to import Confide's own modules: it reads only
# the interpreter's trees (server.read_paths), which an editable install's source is not under.
# The dp modules likewise (dp_noise imports OpenDP only when a run draws noise: not in the zygote).
PARQUET_READER = "confide.enclave.parquet_keys"  # also what the dataflow workers pre-import
DEFAULT_PREIMPORT = (
    "numpy",
    "pandas",
    "xgboost",
    PARQUET_READER,
    "confide.enclave.dp_params",
    "confide.enclave.builtins.dp_noise",
    "confide.enclave.builtins.duck",  # sql's and join-aggregate's DuckDB configuration
    # infer's split mode and its external-weights layout (numpy at import; onnx only when it runs)
    "confide.enclave.infer.split",
)
# What the infer built-in's outsourced modes need in the child (onnx, the graph checker: no thread at
# import). Pre-imported only by an enclave whose host offers an accelerator (runtime.main): onnx
# adds about 2 s to every zygote start, and without an accelerator these modes are refused anyway.
INFER_PREIMPORT = (
    "onnx",
    "confide.enclave.infer.executor",
    "confide.enclave.infer.wire",
    "confide.enclave.infer.deadline_stream",
)


class Zygote:
    """A running zygote. Not meant for concurrent use: runs are serialised by a lock."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, hello: dict[str, Any]) -> None:
        self._proc = proc
        self._sock = sock
        self._hello = hello
        self._layers: dict[str, str] = {name: str(hello["layers"][name]) for name in LAYER_NAMES}
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_process, proc, sock)

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        *,
        strict: bool = True,
        preimport: tuple[str, ...] = DEFAULT_PREIMPORT,
        _disable_layers: tuple[str, ...] = (),
        _force_nobody: bool = False,
    ) -> Zygote:
        """Start the zygote, pre-import `preimport` in it, and verify every layer in a probe child.

        strict=True refuses (SandboxError naming them) when any layer is missing; strict=False starts a
        weak sandbox for development whose `layers` say what is missing.

        The zygote is a fresh interpreter (fork + exec), so the caller may be multi-threaded and its
        memory, descriptors and environment never reach the zygote or the children.

        Test hooks: `_disable_layers` switches layers off to simulate a host without them;
        `_force_nobody` makes children setresuid(65534) even when that uid cannot read the interpreter."""
        return cls.spawn(
            strict=strict, preimport=preimport, _disable_layers=_disable_layers, _force_nobody=_force_nobody
        ).wait()

    @classmethod
    def spawn(
        cls,
        *,
        strict: bool = True,
        preimport: tuple[str, ...] = DEFAULT_PREIMPORT,
        _disable_layers: tuple[str, ...] = (),
        _force_nobody: bool = False,
    ) -> PendingZygote:
        """Start the zygote process and return at once; `.wait()` gives the Zygote once its imports and
        layer probe are done, so the caller can do other start-up work meanwhile. Same checks as start()."""
        unknown = set(_disable_layers) - (set(LAYER_NAMES) - {"fresh-process"})
        if unknown:
            raise SandboxError(f"cannot disable unknown layer(s) {sorted(unknown)}", where="Zygote.start")
        parent_sock, zygote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = {
            "fd": zygote_sock.fileno(),
            "parent_pid": os.getpid(),
            "sys_path": [os.path.abspath(p) for p in sys.path if p],
            "preimport": list(preimport),
            "strict": strict,
            "disable_layers": list(_disable_layers),
            "force_nobody": _force_nobody,
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", *inherited_args(), "-c", _BOOT, json.dumps(cfg)],
                pass_fds=(zygote_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=zygote_environment(),
                cwd="/",
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            parent_sock.close()
            raise SandboxError(f"cannot start the zygote interpreter: {exc}", where="Zygote.start") from exc
        finally:
            zygote_sock.close()
        return PendingZygote(cls, proc, parent_sock, strict)

    @classmethod
    def _await_hello(cls, proc: subprocess.Popen[bytes], parent_sock: socket.socket, strict: bool) -> Zygote:
        try:
            parent_sock.settimeout(START_TIMEOUT_S)
            msg = recv_msg(parent_sock)
            parent_sock.settimeout(None)
        except (OSError, ValueError, SandboxError) as exc:
            _kill_process(proc, parent_sock)
            raise SandboxError(f"no answer from the zygote: {exc}", where="Zygote.start") from exc
        if msg is None or msg[0].get("event") != "hello":
            _kill_process(proc, parent_sock)
            raise SandboxError("the zygote exited during start", where="Zygote.start")
        hello = msg[0]
        if "error" in hello:
            _kill_process(proc, parent_sock)
            raise SandboxError(f"zygote start failed: {hello['error']}", where="Zygote.start")
        zygote = cls(proc, parent_sock, hello)
        missing = {k: v for k, v in zygote.layers.items() if not v.startswith("ok")}
        if missing and strict:
            zygote.close()
            names = ", ".join(missing)
            reasons = "; ".join(f"{k}: {v}" for k, v in missing.items())
            raise SandboxError(
                f"sandbox layer(s) missing: {names} — refusing to run untrusted code "
                f"(strict=True). {reasons}",
                where="Zygote.start",
            )
        return zygote

    def close(self) -> None:
        """Stop the zygote (it exits when its socket closes; killed if it does not within 5 s)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            self._sock.close()
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection ------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, str]:
        """Layer name -> "ok: ..." or "MISSING: reason", as verified by the probe child at start."""
        return dict(self._layers)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def weak(self) -> bool:
        return any(not v.startswith("ok") for v in self._layers.values())

    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    # -- runs ---------------------------------------------------------------------------------
    def run(
        self,
        source: str,
        *,
        params: dict[str, Any],
        inputs: dict[str, int],
        outputs: dict[str, OutputSink],
        limits: SandboxLimits,
        stream: tuple[int, int] | None = None,
    ) -> RunResult:
        """Run `source` (defining run(ctx)) in a fresh sandboxed child; see the module docstring.
        `stream` (read fd, write fd) stays the caller's: it is passed on, not closed."""
        with self._lock:
            if not self.alive():
                raise SandboxError("the zygote is not running", where="Zygote.run")
            for name, fd in inputs.items():
                check_input_fd(name, fd)
            if len(inputs) + len(outputs) + 5 > MAX_FDS:
                raise SandboxError(f"too many inputs and outputs (max {MAX_FDS - 5})", where="Zygote.run")
            try:
                payload = json.dumps(
                    {
                        "source": source,
                        "params": params,
                        "inputs": list(inputs),
                        "outputs": list(outputs),
                        "limits": {
                            "memory_bytes": limits.memory_bytes,
                            "cpu_seconds": limits.cpu_seconds,
                            "max_open_files": limits.max_open_files,
                        },
                    }
                ).encode()
            except (TypeError, ValueError) as exc:
                raise SandboxError(f"params must be JSON values: {exc}", where="Zygote.run") from exc
            return self._run_locked(payload, inputs, outputs, limits, stream)

    def _run_locked(
        self,
        payload: bytes,
        inputs: dict[str, int],
        outputs: dict[str, OutputSink],
        limits: SandboxLimits,
        stream: tuple[int, int] | None = None,
    ) -> RunResult:
        payload_fd = make_input_memfd(payload, name="confide-request")
        out_pipes = {name: os.pipe2(os.O_CLOEXEC) for name in outputs}
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        write_ends = [status_w, log_w, *(w for _, w in out_pipes.values())]
        read_ends = [status_r, log_r, *(r for r, _ in out_pipes.values())]
        try:
            try:
                send_msg(
                    self._sock,
                    {
                        "op": "run",
                        "n_inputs": len(inputs),
                        "n_outputs": len(outputs),
                        "wall_seconds": limits.wall_seconds,
                        "stream": stream is not None,
                    },
                    [
                        payload_fd,
                        status_w,
                        log_w,
                        *inputs.values(),
                        *(w for _, w in out_pipes.values()),
                        *(stream or ()),
                    ],
                )
            except OSError as exc:
                self._abandon()
                raise SandboxError(f"the zygote is gone: {exc}", where="Zygote.run") from exc
            finally:
                os.close(payload_fd)
                for fd in write_ends:
                    os.close(fd)
            obs = self._pump(
                status_r, log_r, {name: r for name, (r, _) in out_pipes.items()}, outputs, limits
            )
        finally:
            for fd in read_ends:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return classify(obs, cpu_seconds=limits.cpu_seconds, max_output_bytes=limits.max_output_bytes)

    def _pump(
        self,
        status_r: int,
        log_r: int,
        out_r: dict[str, int],
        sinks: dict[str, OutputSink],
        limits: SandboxLimits,
    ) -> Observed:
        """Stream outputs into sinks and collect status/log until the child exited and pipes closed."""
        obs = Observed(output_sizes=dict.fromkeys(sinks, 0))
        sel = selectors.DefaultSelector()
        for fd in (status_r, log_r, *out_r.values()):
            os.set_blocking(fd, False)
        sel.register(status_r, selectors.EVENT_READ, ("status", ""))
        sel.register(log_r, selectors.EVENT_READ, ("log", ""))
        for name, fd in out_r.items():
            sel.register(fd, selectors.EVENT_READ, ("out", name))
        sel.register(self._sock, selectors.EVENT_READ, ("zygote", ""))
        open_pipes = 2 + len(out_r)
        exited_at: float | None = None
        hard_deadline = time.monotonic() + limits.wall_seconds + REPORT_GRACE_S
        sink_error: BaseException | None = None
        status = bytearray()
        log = bytearray()
        try:
            while open_pipes > 0 or exited_at is None:
                now = time.monotonic()
                if exited_at is not None and now - exited_at > DRAIN_S:
                    break  # something still holds a write end; the child itself is gone
                if exited_at is None and now > hard_deadline:
                    self._abandon()
                    raise SandboxError(
                        "the zygote did not report the child's exit; zygote killed", where="Zygote.run"
                    )
                timeout = (exited_at + DRAIN_S - now) if exited_at is not None else (hard_deadline - now)
                for key, _ in sel.select(max(timeout, 0.0)):
                    kind, name = key.data
                    if kind == "zygote":
                        if self._on_zygote_message(obs):
                            exited_at = time.monotonic()
                            sel.unregister(self._sock)
                        continue
                    try:
                        data = os.read(key.fd, _READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(key.fd)
                        open_pipes -= 1
                    elif kind == "out":
                        if obs.output_limit is not None or sink_error is not None:
                            continue  # the child is being killed; drop the rest
                        room = limits.max_output_bytes - obs.output_sizes[name]
                        chunk = data if len(data) <= room else data[:room]
                        try:
                            if chunk:
                                sinks[name].write(chunk)
                                obs.output_sizes[name] += len(chunk)
                        except BaseException as exc:
                            sink_error = exc
                            self._request_kill()
                            continue
                        if len(data) > room:
                            obs.output_limit = name
                            self._request_kill()
                    elif kind == "status":
                        if len(status) < STATUS_CAP:
                            status += data
                    else:
                        room = max(LOG_CAP - len(log), 0)
                        log += data[:room]
                        obs.log_dropped += max(len(data) - room, 0)
        finally:
            sel.close()
        obs.status_bytes = bytes(status)
        obs.log_bytes = bytes(log)
        if sink_error is not None:
            raise sink_error
        return obs

    def _on_zygote_message(self, obs: Observed) -> bool:
        """Handle one zygote message; True when it reported the child's exit."""
        try:
            msg = recv_msg(self._sock)
        except (OSError, SandboxError, ValueError) as exc:
            self._abandon()
            raise SandboxError(f"lost the zygote: {exc}", where="Zygote.run") from exc
        if msg is None:
            self._abandon()
            raise SandboxError("the zygote exited during a run", where="Zygote.run")
        obj, fds = msg
        for fd in fds:
            os.close(fd)
        if obj.get("event") != "exit":
            return False
        if "error" in obj:
            obs.zygote_error = str(obj["error"])
        else:
            obs.wait_status = int(obj["status"])
            obs.duration_s = float(obj["duration"])
            obs.cpu_s = float(obj["cpu"])
            obs.wall_timeout = bool(obj["wall_timeout"])
        return True

    def _request_kill(self) -> None:
        with contextlib.suppress(OSError):
            send_msg(self._sock, {"op": "kill"})

    def _abandon(self) -> None:
        """The zygote is unusable: kill it so no child outlives it (children die with it)."""
        self._closed = True
        self._finalizer.detach()
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._sock.close()


class PendingZygote:
    """A zygote that is starting (see Zygote.spawn)."""

    def __init__(
        self, cls: type[Zygote], proc: subprocess.Popen[bytes], sock: socket.socket, strict: bool
    ) -> None:
        self._cls, self._proc, self._sock, self._strict = cls, proc, sock, strict

    def wait(self) -> Zygote:
        return self._cls._await_hello(self._proc, self._sock, self._strict)

    def abandon(self) -> None:
        """Stop a zygote whose start is no longer wanted."""
        _kill_process(self._proc, self._sock)
