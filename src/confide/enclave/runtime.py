"""The enclave runtime: the process the host starts, and the enclave calls it serves.

Start-up order matters. The sandbox zygote is forked first, while this process is single-threaded
and holds no secret; then the measurement is taken, the backend set up, and the enclave's keys
unsealed (or created and sealed) and bound into its evidence, and the service key unsealed if this
worker was given it. Then calls are served one at a time: the service calls are in service.py, the
multi-party `task` in task_runner.py, and the steps `run` and `task` share in pipeline.py.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import channel
from .accelerator_link import OUTSOURCED_MODES, AcceleratorLink
from .backend import TeeBackend, create_backend
from .channel import ChannelClosed
from .config import EnclaveConfig
from .encoding import b64d, b64e, hexd
from .errors import ConfideError, EnclaveError, FormatError
from .function_desc import builtin_source
from .keys import Identity
from .memory import MemoryBudget
from .pipeline import OutputFile, open_input, run_sandboxed, write_error_output
from .report_data import report_data_for
from .request import make_receipt, open_request
from .sandbox import Zygote
from .sandbox.zygote import DEFAULT_PREIMPORT, INFER_PREIMPORT, PendingZygote
from .service import ServiceState
from .state import seal_identity, state_path, unseal_identity
from .task_runner import TaskRunner

PR_SET_DUMPABLE = 4
ATTESTATION_NONCE_LEN = 32
MAX_ATTESTED_NONCES = 4096


# ---- sealed state: the enclave's keys survive a restart of the same build and no other ----------------


def load_or_create_keys(backend: TeeBackend, state_dir: Path) -> Identity:
    path = state_path(backend, state_dir, "enclave")
    if path.exists():
        return unseal_identity(backend, path, b"enclave-identity", "enclave state")
    identity = Identity.generate("confide-enclave")
    seal_identity(backend, path, b"enclave-identity", identity)
    return identity


# ---- the runtime --------------------------------------------------------------------------------------


class EnclaveRuntime:
    def __init__(
        self,
        *,
        backend: TeeBackend,
        keys: Identity,
        zygote: Zygote,
        config: EnclaveConfig,
        service: ServiceState,
        accelerator: AcceleratorLink | None = None,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.zygote = zygote
        self.config = config
        self.simulated = backend.simulated
        self.budget = MemoryBudget(config.memory_budget_bytes)
        self.service = service
        self.tasks = TaskRunner(
            backend=backend,
            service=service,
            zygote=zygote,
            budget=self.budget,
            config=config,
            accelerator=accelerator,
        )
        self.seen_requests: set[str] = set()
        # nonces this boot has attested to, oldest first; a run request must spend one (see run())
        self.attested_nonces: dict[str, None] = {}
        self.running = True

    def info(self) -> dict[str, Any]:
        ident = self.backend.identity
        return {
            "backend": ident.backend,
            "simulated": self.simulated,
            "measurement": ident.measurement,
            "signer": ident.signer,
            "debug": ident.debug,
            "enclave": self.keys.public.to_line(),
            "fingerprint": self.keys.fingerprint,
            "sandbox_layers": self.zygote.layers,
            "config": self.config.to_dict(),
            "accelerator": self.tasks.accelerator is not None,
        }

    def handle(self, call: channel.Call) -> dict[str, Any]:
        if call.name == "ping":
            return {"pong": True}
        if call.name == "info":
            return self.info()
        if call.name == "evidence":
            nonce = hexd(call.args["nonce"], field="nonce", where="enclave call 'evidence'")
            rd = report_data_for(self.keys.public, nonce or None)
            if len(nonce) == ATTESTATION_NONCE_LEN:
                self.attested_nonces[nonce.hex()] = None
                while len(self.attested_nonces) > MAX_ATTESTED_NONCES:
                    del self.attested_nonces[next(iter(self.attested_nonces))]
            ev = self.backend.evidence(rd, extra={"enclave": self.keys.public.to_line()})
            return {"evidence": b64e(ev)}
        if call.name == "run":
            return self.run(call.args)
        if call.name == "task":
            return self.tasks.run(call.args)
        if call.name == "flow_finish":
            return self.tasks.finish_flow(call.args)
        if call.name == "service_info":
            return self.service.info()
        if call.name == "service_init":
            return self.service.init()
        if call.name == "service_evidence":
            return self.service.evidence(call.args["nonce"])
        if call.name == "provision_offer":
            return self.service.offer()
        if call.name == "provision_grant":
            return self.service.grant(call.args["offer"], call.args["evidence"])
        if call.name == "provision_accept":
            return self.service.accept(call.args["grant"], call.args["evidence"])
        if call.name == "shutdown":
            self.running = False
            return {"bye": True}
        raise FormatError(f"unhandled call {call.name!r}", where="enclave")  # table and handler out of step

    # -- run a function on sealed inputs ------------------------------------------------------------
    def run(self, args: dict[str, Any]) -> dict[str, Any]:
        sealed = b64d(args["request"], field="request", where="enclave call 'run'")
        req = open_request(sealed, self.keys)
        if req.request_id in self.seen_requests:
            raise EnclaveError(
                f"request {req.request_id} was already used (replay rejected)", where="run request"
            )
        if req.attestation_nonce not in self.attested_nonces:
            raise EnclaveError(
                "request does not follow an attestation by this enclave since it started "
                "(stale request, or replayed after a restart)",
                where="run request",
            )
        source = req.source if req.source is not None else args.get("source")
        if source is None:
            raise EnclaveError(
                "no function: neither the request nor the call carries its source", where="run request"
            )
        if "source" in args and req.source is not None and args["source"] != req.source:
            raise EnclaveError("the host passed a function other than the sealed one", where="run request")
        if hashlib.sha256(source.encode()).hexdigest() != req.function_sha256:
            raise EnclaveError(
                "the function the host passed is not the function the client approved (digest mismatch)",
                where="run request",
            )
        for table, approved in (("inputs", req.inputs), ("outputs", req.outputs)):
            if set(args[table]) != set(approved):
                raise EnclaveError(
                    f"host's {table} {sorted(args[table])} differ from the approved {sorted(approved)}",
                    where="run request",
                )
        outsourced = _outsources(req.function_sha256, req.params)
        if outsourced and self.tasks.accelerator is None:
            raise EnclaveError(
                f"mode {req.params.get('mode')} needs an accelerator and this enclave has none (start it "
                "with `confide run --accelerator numpy|cuda|auto`); nothing ran",
                where="run request",
            )
        self.seen_requests.add(req.request_id)
        del self.attested_nonces[req.attestation_nonce]  # each attestation authorises one run

        reserved = 0
        fds: dict[str, int] = {}
        outputs: dict[str, OutputFile] = {}
        stream: tuple[int, int] | None = None
        try:
            for name, grant in sorted(req.inputs.items()):
                fds[name], n = open_input(
                    args["inputs"][name],
                    name,
                    data_key=grant.data_key,
                    budget=self.budget,
                    header_sha256=grant.header_sha256,
                )
                reserved += n
            for name, spec in req.outputs.items():
                outputs[name] = OutputFile(
                    Path(args["outputs"][name]),
                    spec.recipients,
                    {"output": name, "request_id": req.request_id},
                )
            started = time.monotonic()
            if outsourced:
                assert self.tasks.accelerator is not None
                stream = self.tasks.accelerator.open_stream()
            result = run_sandboxed(
                self.zygote,
                self.budget,
                self.config,
                source=source,
                params=req.params,
                inputs=fds,
                outputs=outputs,
                max_output_bytes=min(s.max_bytes for s in req.outputs.values()),
                stream=stream,
            )
            elapsed = time.monotonic() - started
            if not result.ok:
                report = args.get("error_report")
                if report:
                    write_error_output(
                        Path(report), req.error_recipients, {"error_report": req.request_id}, result
                    )
                return {
                    "ok": False,
                    "category": result.category,
                    "duration_s": round(elapsed, 6),
                    "error_report": bool(report),
                }
            digests = {name: out.publish() for name, out in sorted(outputs.items())}
            outputs.clear()
            receipt = make_receipt(
                self.keys,
                request=req,
                outputs=digests,
                measurement=self.backend.identity.measurement,
                backend=self.backend.identity.backend,
                simulated=self.simulated,
            )
            return {
                "ok": True,
                "category": "ok",
                "duration_s": round(elapsed, 6),
                "output_sizes": result.output_sizes,
                "receipt": b64e(receipt),
            }
        finally:
            for out in outputs.values():
                out.discard()
            for fd in (*fds.values(), *(stream or ())):
                os.close(fd)
            self.budget.release(reserved)

    # -- the call loop ------------------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        """Serve calls until shutdown or until the host goes away (closed or reset channel)."""
        try:
            self._serve(sock)
        except (ChannelClosed, ConnectionError):
            print("confide enclave: the host closed the channel; stopping", file=sys.stderr)

    def _serve(self, sock: socket.socket) -> None:
        while self.running:
            try:
                frame = channel.read_frame(sock, self.config.max_frame_bytes)
            except channel.ChannelClosed:
                return
            except channel.FrameTooLarge as exc:
                channel.send_message(sock, _error(None, exc))
                continue
            call_id: int | None = None
            try:
                call = channel.parse_call(frame)
                call_id = call.id
                reply = {"id": call.id, "ok": True, "result": self.handle(call)}
            except ConfideError as exc:
                reply = _error(call_id, exc)
            except Exception as exc:  # never let one call take the enclave down; say what happened
                reply = _error(call_id, EnclaveError(f"internal error: {type(exc).__name__}: {exc}"))
                traceback.print_exc(file=sys.stderr)
            channel.send_message(sock, reply)


_INFER_SHA256: list[str] = []  # the infer built-in's source digest, computed on first use


def _outsources(function_sha256: str, params: dict[str, Any]) -> bool:
    """True for a single-owner run of this build's own infer built-in in an outsourced mode: only
    then does the sandbox child get a stream to the host's accelerator (never a party's function)."""
    if params.get("mode") not in OUTSOURCED_MODES:
        return False
    if not _INFER_SHA256:
        _INFER_SHA256.append(hashlib.sha256(builtin_source("infer").encode()).hexdigest())
    return function_sha256 == _INFER_SHA256[0]


def _error(call_id: int | None, exc: ConfideError) -> dict[str, Any]:
    return {"id": call_id, "ok": False, "error": {"kind": type(exc).__name__, "message": str(exc)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="confide.enclave", description="Confide enclave runtime (started by the host)"
    )
    parser.add_argument("--fd", type=int, required=True, help="channel socket inherited from the host")
    parser.add_argument("--backend", default="sim", help="TEE backend (evidence provider)")
    parser.add_argument("--platform", type=Path, required=True, help="simulated platform directory")
    parser.add_argument("--state", type=Path, required=True, help="where sealed enclave state is kept")
    parser.add_argument("--config", type=Path, default=None, help="enclave configuration (TOML)")
    parser.add_argument(
        "--accelerator-fd",
        type=int,
        default=None,
        help="unix socket to the host's (untrusted) accelerator process (accelerator_link.py)",
    )
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    pending: PendingZygote | None = None
    try:
        config = EnclaveConfig.load(args.config)
        # 1. the zygote first, before this process holds any secret; it imports and probes its layers
        #    in its own process while this one measures itself
        preimport = DEFAULT_PREIMPORT + (INFER_PREIMPORT if args.accelerator_fd is not None else ())
        pending = Zygote.spawn(strict=config.sandbox == "strict", preimport=preimport)
        # 2. the backend (the CPU) gives the enclave its identity, evidence and sealing keys
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        backend = create_backend(args.backend, platform_dir=args.platform, config=config)
        # 3. keys: unsealed if this build sealed them before, else created and sealed
        keys = load_or_create_keys(backend, args.state)
        service = ServiceState(backend, args.state)  # the service key, if this worker was given it
        zygote = pending.wait()
        pending = None
        accelerator = None if args.accelerator_fd is None else AcceleratorLink.from_fd(args.accelerator_fd)
        runtime = EnclaveRuntime(
            backend=backend, keys=keys, zygote=zygote, config=config, service=service, accelerator=accelerator
        )
    except ConfideError as exc:
        if pending is not None:
            pending.abandon()
        channel.send_message(sock, {"ready": False, "error": str(exc)})
        print(f"confide enclave: {exc}", file=sys.stderr)
        return 1
    channel.send_message(sock, {"ready": True, "info": runtime.info()})
    try:
        runtime.serve(sock)
    finally:
        zygote.close()
    return 0
