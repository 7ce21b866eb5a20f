"""The zygote process: a fresh interpreter started by Zygote.start that pre-imports the libraries
functions may use, verifies the sandbox once with a probe child, then forks one sandboxed child per
run request.

It holds no secrets: it never reads inputs, parameters or source (they reach the child through
descriptors the zygote only passes on), so a child forked from it inherits nothing confidential.
It stays single-threaded (checked at start), so forking is safe.

Messages (protocol.py), enclave → zygote: {"op": "run", ...} + fds, {"op": "kill"}.
Zygote → enclave: {"event": "hello", ...} once, then per run {"event": "started"}, {"event": "exit"}.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import selectors
import signal
import site
import socket
import sys
import time
from typing import Any

from confide.enclave.errors import SandboxError
from confide.enclave.sandbox import child, landlock, namespaces, privileges
from confide.enclave.sandbox.api import LAYER_NAMES
from confide.enclave.sandbox.environment import THREAD_ENV
from confide.enclave.sandbox.libc import PR_SET_DUMPABLE, prctl
from confide.enclave.sandbox.memfd import make_input_memfd
from confide.enclave.sandbox.plan import ChildFds, SandboxPlan
from confide.enclave.sandbox.protocol import recv_msg, send_msg

SYSTEM_LIB_DIRS = ("/usr/lib", "/lib", "/lib64", "/usr/lib64")
PROBE_TIMEOUT_S = 30.0


def read_paths() -> tuple[str, ...]:
    """Directories the child may read (and nothing else): the interpreter, its packages, system libs."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *site.getsitepackages(),
        *SYSTEM_LIB_DIRS,
    ]
    out: list[str] = []
    seen: set[str] = set()
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            out.append(path)
    return tuple(out)


def _module_files() -> list[str]:
    files = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.isabs(path):
            files.append(path)
    return files


def _module_files_beneath(paths: tuple[str, ...]) -> list[str]:
    roots = [os.path.realpath(p).rstrip("/") + "/" for p in paths]
    return [f for f in _module_files() if any(os.path.realpath(f).startswith(r) for r in roots)]


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class ZygoteServer:
    def __init__(self, sock: socket.socket, cfg: dict[str, Any]) -> None:
        self.sock = sock
        self.cfg = cfg
        self.plan: SandboxPlan | None = None
        self.layers: dict[str, str] = {}

    # -- start --------------------------------------------------------------------------------
    def startup(self) -> dict[str, Any]:
        # No PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits, and the enclave
        # may start the zygote from a worker thread. The zygote exits on EOF of its socket instead.
        if os.getppid() != self.cfg["parent_pid"]:
            raise SandboxError("the enclave process exited during zygote start", where="zygote")
        for key, value in THREAD_ENV.items():
            os.environ[key] = value
        for name in self.cfg["preimport"]:
            importlib.import_module(name)
        threads = _thread_count()
        if threads != 1:
            raise SandboxError(
                f"zygote has {threads} threads after pre-importing {self.cfg['preimport']}; "
                "it must stay single-threaded to fork safely",
                where="zygote",
            )
        prctl(PR_SET_DUMPABLE, 0)
        signal.signal(
            signal.SIGIO, signal.SIG_IGN
        )  # second wall against F_SETOWN tricks (see seccomp_filter)
        paths = read_paths()
        disabled = frozenset(self.cfg["disable_layers"])
        minimal_root = "minimal-root" not in disabled
        # Judged as the child will see the files: inside its minimal root (where only the bound trees
        # exist; a loaded module outside them is not readable by the child under any uid).
        unreadable = privileges.first_unreadable_by_nobody(
            [*paths, *_module_files_beneath(paths)] if minimal_root else [*paths, *_module_files()],
            minimal_root=paths if minimal_root else None,
        )
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        force_nobody = bool(self.cfg.get("force_nobody"))
        plan = SandboxPlan(
            zygote_pid=os.getpid(),
            zygote_ns=namespaces.ns_inodes((*namespaces.CHECKED, "pid")),
            devnull_fd=devnull,
            devnull_rdev=os.fstat(devnull).st_rdev,
            landlock_abi=landlock.abi_version(),
            read_paths=paths,
            to_nobody=unreadable is None or force_nobody,
            uid_reason=""
            if unreadable is None or force_nobody
            else f"{unreadable} unreadable by uid 65534"
            + (" even in the minimal root" if minimal_root else ""),
            last_cap=privileges.cap_last_cap(),
            disabled=disabled,
        )
        self.layers, io_problem = self._probe(plan)
        if io_problem:
            raise SandboxError(io_problem, where="zygote probe")
        missing = frozenset(name for name, text in self.layers.items() if not text.startswith("ok"))
        tolerated = frozenset() if self.cfg["strict"] else missing
        self.plan = dataclasses.replace(plan, tolerated=tolerated)
        gc.collect()
        gc.freeze()  # children share these pages copy-on-write and never scan them
        return {
            "event": "hello",
            "pid": os.getpid(),
            "layers": self.layers,
            "threads": _thread_count(),
            "landlock_abi": plan.landlock_abi,
            "read_paths": list(paths),
            "uid_reason": plan.uid_reason,
        }

    def _probe(self, plan: SandboxPlan) -> tuple[dict[str, str], str | None]:
        """Fork one child that applies every layer and checks each by behaviour."""
        payload = json.dumps(
            {
                "limits": {"memory_bytes": 512 * 2**20, "cpu_seconds": 30, "max_open_files": 64},
                "inputs": ["probe"],
                "outputs": ["probe"],
            }
        ).encode()
        token = b"confide-probe-" + os.urandom(8).hex().encode()
        payload_fd = make_input_memfd(payload)
        input_fd = make_input_memfd(token)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds = ChildFds(payload=payload_fd, status=status_w, log=log_w, inputs=(input_fd,), outputs=(out_w,))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = namespaces.fork_child(new_pid_ns="pid-namespace" not in plan.disabled)
        if pid == 0:  # pragma: no cover - the probe child
            child.child_main(plan, fds, probe_mode=True)
        for fd in (payload_fd, input_fd, status_w, log_w, out_w):
            os.close(fd)
        collected = _collect(
            {status_r: b"", log_r: b"", out_r: b""}, deadline=time.monotonic() + PROBE_TIMEOUT_S
        )
        if collected is None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if collected is None:
            raise SandboxError("the probe child did not finish", where="zygote probe")
        status_text, log_text, out = collected[status_r], collected[log_r], collected[out_r]
        try:
            record = json.loads(status_text.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SandboxError(
                f"the probe child failed (wait status {status}): {status_text[-2000:]!r} {log_text[-2000:]!r}",
                where="zygote probe",
            ) from None
        if record.get("outcome") != "probe":
            raise SandboxError(
                f"the probe child failed: {record.get('detail', record)}", where="zygote probe"
            )
        layers = {name: str(record["layers"].get(name, "MISSING: not reported")) for name in LAYER_NAMES}
        io_problem = record.get("io_problem")
        if io_problem is None and out != token:
            io_problem = "the probe's output did not carry its input"
        return layers, io_problem

    # -- serve --------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            msg = recv_msg(self.sock)
            if msg is None:
                return  # the enclave closed the socket
            obj, fds = msg
            op = obj.get("op")
            if op == "run":
                self._run(obj, fds)
            else:  # "kill" arriving after its child already exited, or unknown
                for fd in fds:
                    os.close(fd)

    def _run(self, obj: dict[str, Any], fds: list[int]) -> None:
        assert self.plan is not None
        n_in, n_out = int(obj["n_inputs"]), int(obj["n_outputs"])
        n_stream = 2 if obj.get("stream") else 0
        if len(fds) != 3 + n_in + n_out + n_stream:
            for fd in fds:
                os.close(fd)
            send_msg(
                self.sock,
                {"event": "exit", "error": f"expected {3 + n_in + n_out + n_stream} fds, got {len(fds)}"},
            )
            return
        child_fds = ChildFds(
            payload=fds[0],
            status=fds[1],
            log=fds[2],
            inputs=tuple(fds[3 : 3 + n_in]),
            outputs=tuple(fds[3 + n_in : 3 + n_in + n_out]),
            stream=tuple(fds[3 + n_in + n_out :]),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        started = time.monotonic()
        try:
            pid = namespaces.fork_child(new_pid_ns="pid-namespace" not in self.plan.disabled)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send_msg(self.sock, {"event": "exit", "error": f"fork failed: {exc}"})
            return
        if pid == 0:  # pragma: no cover - the sandboxed child
            child.child_main(self.plan, child_fds)
        for fd in fds:
            os.close(fd)
        send_msg(self.sock, {"event": "started", "pid": pid})
        wall_timeout, killed = self._wait(pid, deadline=started + float(obj["wall_seconds"]))
        _, status, usage = os.wait4(pid, 0)
        send_msg(
            self.sock,
            {
                "event": "exit",
                "status": status,
                "duration": time.monotonic() - started,
                "cpu": usage.ru_utime + usage.ru_stime,
                "maxrss_kib": usage.ru_maxrss,
                "wall_timeout": wall_timeout,
                "killed_on_request": killed,
            },
        )

    def _wait(self, pid: int, *, deadline: float) -> tuple[bool, bool]:
        """Wait until the child exits; SIGKILL it at the deadline or when the enclave asks."""
        pidfd = os.pidfd_open(pid)
        sel = selectors.DefaultSelector()
        sel.register(pidfd, selectors.EVENT_READ, "child")
        sel.register(self.sock, selectors.EVENT_READ, "enclave")
        wall_timeout = killed = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not (wall_timeout or killed):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    wall_timeout = True
                events = sel.select(None if (wall_timeout or killed) else max(remaining, 0))
                for key, _ in events:
                    if key.data == "child":
                        return wall_timeout, killed
                    msg = recv_msg(self.sock)
                    if msg is None:  # the enclave is gone: stop the child, then exit
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        os._exit(0)
                    obj, fds = msg
                    for fd in fds:
                        os.close(fd)
                    if obj.get("op") == "kill" and not (wall_timeout or killed):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        killed = True
        finally:
            sel.close()
            os.close(pidfd)


def _collect(pipes: dict[int, bytes], *, deadline: float, cap: int = 1 << 20) -> dict[int, bytes] | None:
    """Read pipes to EOF (keeping at most cap bytes each); None when the deadline passes first."""
    sel = selectors.DefaultSelector()
    for fd in pipes:
        sel.register(fd, selectors.EVENT_READ)
    out = dict(pipes)
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    os.close(key.fd)
                elif len(out[key.fd]) < cap:
                    out[key.fd] += data
        return out
    finally:
        for key in list(sel.get_map().values()):
            os.close(key.fd)
        sel.close()


def main(cfg: dict[str, Any]) -> None:
    """Entry point of the zygote process (see zygote.py for how it is started)."""
    sock = socket.socket(fileno=cfg["fd"])
    server = ZygoteServer(sock, cfg)
    try:
        hello = server.startup()
    except BaseException as exc:
        send_msg(sock, {"event": "hello", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    send_msg(sock, hello)
    try:
        server.serve()
    finally:
        os._exit(0)
