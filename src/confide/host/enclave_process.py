"""The untrusted host's side of an enclave: start the enclave process and make enclave calls.

Nothing here is trusted. The host relays sealed requests and stores ciphertext; whatever it says
about the enclave is checked by the client against verified evidence.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from confide.enclave import channel
from confide.enclave.bytecode import interpreter_args
from confide.enclave.encoding import canonical_json, parse_json_object
from confide.enclave.errors import ConfideError, EnclaveError

MAX_REPLY_BYTES = 64 << 20
START_TIMEOUT_S = 120.0


class EnclaveProcess:
    """An enclave runtime running as its own process, reached over a socketpair."""

    def __init__(
        self,
        *,
        platform_dir: Path,
        state_dir: Path,
        config: Path | None = None,
        backend: str = "sim",
        stderr: int | None = None,
        accelerator: str | socket.socket | None = None,
    ) -> None:
        """`accelerator`: None (the enclave gets none: outsourced inference is refused), a backend
        name (numpy, cuda, auto: an accelerator process is started for this enclave and stopped with
        it), or a unix socket whose peer serves streams like confide.infer.accelerator.serve_streams
        (tests)."""
        self.accelerator: Any = None
        accel_sock: socket.socket | None = None
        if isinstance(accelerator, str):
            from confide.infer.accelerator import AcceleratorProcess

            self.accelerator = AcceleratorProcess(accelerator)
            accel_sock = self.accelerator.enclave_sock
        elif accelerator is not None:
            accel_sock = accelerator
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [
            sys.executable,
            *interpreter_args(),  # only checked-hash bytecode of the measured sources (enclave/bytecode.py)
            "-m",
            "confide.enclave",
            "--fd",
            str(child.fileno()),
            "--platform",
            str(platform_dir),
            "--state",
            str(state_dir),
            "--backend",
            backend,
        ]
        if config is not None:
            cmd += ["--config", str(config)]
        passed = [child.fileno()]
        if accel_sock is not None:
            cmd += ["--accelerator-fd", str(accel_sock.fileno())]
            passed.append(accel_sock.fileno())
        started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, pass_fds=tuple(passed), stdin=subprocess.DEVNULL, stderr=stderr, close_fds=True
        )
        child.close()
        if accel_sock is not None:
            accel_sock.close()  # the enclave holds it now; the accelerator sees EOF when the enclave exits
        self.sock = parent
        self.sock.settimeout(START_TIMEOUT_S)
        self._ids = itertools.count(1)
        try:
            hello = parse_json_object(channel.read_frame(self.sock, MAX_REPLY_BYTES), where="enclave start")
        except (channel.ChannelClosed, TimeoutError, OSError):
            self.close()
            raise EnclaveError(
                f"enclave process exited during start-up (exit code {self.proc.poll()})"
            ) from None
        if not hello.get("ready"):
            self.close()
            raise EnclaveError(f"enclave failed to start: {hello.get('error', 'no reason given')}")
        self.start_seconds = time.monotonic() - started
        self.info: dict[str, Any] = hello["info"]
        self.sock.settimeout(None)

    def call(self, name: str, **args: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        channel.send_message(self.sock, {"id": call_id, "call": name, "args": args})
        reply = self.read_reply()
        if reply.get("id") != call_id and reply.get("id") is not None:
            raise EnclaveError(f"reply to call {reply.get('id')} while waiting for {call_id}")
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise EnclaveError(str(err.get("message", "enclave call failed")), where=f"enclave call {name!r}")
        return reply["result"]

    def read_reply(self) -> dict[str, Any]:
        try:
            return parse_json_object(channel.read_frame(self.sock, MAX_REPLY_BYTES), where="enclave reply")
        except channel.ChannelClosed:
            raise EnclaveError(f"enclave closed the channel (exit code {self.proc.poll()})") from None

    def send_raw(self, payload: bytes) -> None:
        """For tests and fuzzing: put arbitrary bytes on the channel."""
        self.sock.sendall(payload)

    def evidence(self, nonce: bytes) -> bytes:
        return base64.b64decode(self.call("evidence", nonce=nonce.hex())["evidence"])

    # ---- the enclave service (PROTOCOL.md section 6): typed wrappers, nothing checked here ----------
    def service_info(self) -> dict[str, Any]:
        return self.call("service_info")

    def service_init(self) -> dict[str, Any]:
        return self.call("service_init")

    def service_evidence(self, nonce: bytes = b"") -> bytes:
        """Evidence binding the service key (and `nonce`); with no nonce, the worker's boot evidence."""
        return base64.b64decode(self.call("service_evidence", nonce=nonce.hex())["evidence"])

    def provision_from(self, granter: EnclaveProcess) -> dict[str, Any]:
        """Relay a mutual-attestation provisioning: this (new) worker gets the service key from `granter`."""
        offer = self.call("provision_offer")
        grant = granter.call("provision_grant", offer=offer["offer"], evidence=offer["evidence"])
        return self.call("provision_accept", grant=grant["grant"], evidence=grant["evidence"])

    def task(
        self,
        *,
        manifest: str,
        approvals: Sequence[Mapping[str, Any]],
        dataset_keys: Mapping[str, Mapping[str, Any]],
        inputs: Mapping[str, str | Path],
        outputs: Mapping[str, str | Path],
        function_source: Mapping[str, str] | None = None,
        audit_head: Mapping[str, Any] | None = None,
        flow_agents: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, Any]:
        """Run a task; `outputs` may include "_error" (where a failed function's sealed error text goes);
        `audit_head` ({seq, sha256}) is signed into the receipt. `flow_agents` ([public line, evidence
        b64] of node agents): a flow task is only started, its stages left to the host's engine (the
        reply's `flow`: ticket, graph, grants), and finished by `flow_finish`."""
        args: dict[str, Any] = {
            "manifest": manifest,
            "approvals": list(approvals),
            "dataset_keys": dict(dataset_keys),
            "inputs": {n: str(p) for n, p in inputs.items()},
            "outputs": {n: str(p) for n, p in outputs.items()},
        }
        if function_source is not None:
            args["function_source"] = dict(function_source)
        if audit_head is not None:
            args["audit_head"] = dict(audit_head)
        if flow_agents is not None:
            args["flow_agents"] = [list(a) for a in flow_agents]
        return self.call("task", **args)

    def flow_finish(
        self, task_id: str, reports: str | Path, out_dir: str | Path, *, engine_error: str | None = None
    ) -> dict[str, Any]:
        """Finish a flow task started with `flow_agents`: `reports` a file of the engine's sealed task
        reports (confide.enclave.flow.in_enclave.write_reports), `out_dir` where its sinks wrote;
        `engine_error` instead: the engine failed (the receipt says so). Returns what `task` returns."""
        args: dict[str, Any] = {"task_id": task_id, "reports": str(reports), "out_dir": str(out_dir)}
        if engine_error is not None:
            args["engine_error"] = engine_error
        return self.call("flow_finish", **args)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                channel.send_message(self.sock, {"id": 0, "call": "shutdown", "args": {}})
                self.read_reply()
            except (ConfideError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        if self.accelerator is not None:
            self.accelerator.close()
            self.accelerator = None

    def __enter__(self) -> EnclaveProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def frame(obj: dict[str, Any]) -> bytes:
    payload = canonical_json(obj)
    return channel.HEADER.pack(len(payload)) + payload


def default_home() -> Path:
    return Path(os.environ.get("CONFIDE_HOME", Path.home() / ".confide"))
