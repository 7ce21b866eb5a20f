"""The framed channel between host and enclave, and the fixed table of enclave calls (ECALLs).

Frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON. The enclave treats every
frame as hostile: it caps the length before reading, parses strictly (no duplicate keys, no NaN),
and checks the call's arguments against the call's schema before anything else looks at them.
A bad frame gets an error reply; it never takes the enclave down.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from .encoding import canonical_json, check_fields, get_typed, parse_json_object
from .errors import ConfideError, FormatError

HEADER = struct.Struct(">I")
MAX_NAME_LEN = 64
MAX_PATH_LEN = 4096
MAX_SOURCE_LEN = 1 << 20
MAX_NONCE_LEN = 64


class ChannelClosed(ConfideError):
    """The peer closed the channel."""


class FrameTooLarge(FormatError):
    """A frame longer than the receiver accepts (its payload has been skipped)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("channel closed" if got == 0 else "channel closed inside a frame")
        got += k
    return bytes(buf)


def _discard(sock: socket.socket, n: int) -> None:
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise ChannelClosed("channel closed inside an oversized frame")
        n -= len(chunk)


def read_frame(sock: socket.socket, max_bytes: int) -> bytes:
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if length > max_bytes:
        _discard(sock, length)  # keep the stream in step; never buffer the oversized payload
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {max_bytes}-byte limit", where="channel")
    return _recv_exact(sock, length)


def write_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload)) + payload)


def send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    write_frame(sock, canonical_json(obj))


# ---- call table ---------------------------------------------------------------------------------

Kind = type | tuple[type, ...]


@dataclass(frozen=True)
class CallSpec:
    required: dict[str, Kind]
    optional: dict[str, Kind]
    doc: str


CALLS: dict[str, CallSpec] = {
    "ping": CallSpec({}, {}, "liveness; measures the round trip"),
    "info": CallSpec({}, {}, "measurement, backend, enclave public keys, sandbox layers"),
    "evidence": CallSpec(
        {"nonce": str}, {}, "evidence binding the enclave keys and a verifier's nonce (hex)"
    ),
    "run": CallSpec(
        {"request": str, "inputs": dict, "outputs": dict},
        {"source": str, "error_report": str},  # no "source": the code travels sealed in the request
        "run a function on sealed inputs; outputs sealed to the recipients the client approved",
    ),
    "service_info": CallSpec(
        {}, {}, "whether this worker holds the service key; its line and boot evidence hash"
    ),
    "service_init": CallSpec({}, {}, "create the service identity (first worker only)"),
    "service_evidence": CallSpec(
        {"nonce": str}, {}, "evidence binding the service key and a verifier's nonce (hex, may be empty)"
    ),
    "provision_offer": CallSpec({}, {}, "new worker: a fresh ephemeral key and evidence binding it"),
    "provision_grant": CallSpec(
        {"offer": str, "evidence": str}, {}, "provisioned worker: the service key sealed to an attested peer"
    ),
    "provision_accept": CallSpec(
        {"grant": str, "evidence": str}, {}, "new worker: check the granter's evidence, keep the service key"
    ),
    "task": CallSpec(
        {"manifest": str, "approvals": list, "dataset_keys": dict, "inputs": dict, "outputs": dict},
        {"function_source": dict, "audit_head": dict, "flow_agents": list},
        "run a multi-party task: consent checked in the enclave, outputs sealed to the manifest's recipients",
    ),
    "flow_finish": CallSpec(
        {"task_id": str, "reports": str, "out_dir": str},
        {"engine_error": str},
        "a flow task's stages ran on the host's engine: verify its task reports, seal its outputs, sign",
    ),
    "shutdown": CallSpec({}, {}, "stop the enclave"),
}
MAX_TASK_ENTRIES = 64
MAX_MANIFEST_LEN = 256 << 10
MAX_EVIDENCE_LEN = 256 << 10
MAX_ENGINE_ERROR_LEN = 4096


@dataclass(frozen=True)
class Call:
    id: int
    name: str
    args: dict[str, Any]


def parse_call(frame: bytes) -> Call:
    """Strictly parse and schema-check one request frame."""
    obj = parse_json_object(frame, where="enclave call")
    check_fields(obj, required=("id", "call", "args"), where="enclave call")
    call_id = get_typed(obj, "id", int, where="enclave call")
    name = get_typed(obj, "call", str, where="enclave call")
    spec = CALLS.get(name)
    if spec is None:
        raise FormatError(
            f"unknown enclave call {name[:MAX_NAME_LEN]!r} (known: {', '.join(CALLS)})", where="enclave call"
        )
    where = f"enclave call {name!r}"
    args = get_typed(obj, "args", dict, where=where)
    check_fields(args, required=spec.required, optional=spec.optional, where=where)
    for key, kind in {**spec.required, **spec.optional}.items():
        if key in args:
            get_typed(args, key, kind, where=where)
    if name in ("evidence", "service_evidence") and len(args["nonce"]) > 2 * MAX_NONCE_LEN:
        raise FormatError(f"nonce longer than {MAX_NONCE_LEN} bytes", where=where)
    if name == "run":
        if len(args.get("source", "")) > MAX_SOURCE_LEN:
            raise FormatError(f"function source longer than {MAX_SOURCE_LEN} bytes", where=where)
        for table in ("inputs", "outputs"):
            _check_path_table(args[table], f"{where}: {table}")
        if "error_report" in args:
            _check_path(args["error_report"], f"{where}: error_report")
    if name in ("provision_grant", "provision_accept"):
        for key, value in args.items():
            if len(value) > MAX_EVIDENCE_LEN:
                raise FormatError(f"{key} longer than {MAX_EVIDENCE_LEN} characters", where=where)
    if name == "task":
        if len(args["manifest"]) > MAX_MANIFEST_LEN:
            raise FormatError(f"manifest longer than {MAX_MANIFEST_LEN} characters", where=where)
        for key in ("approvals", "dataset_keys"):
            if len(args[key]) > MAX_TASK_ENTRIES:
                raise FormatError(f"more than {MAX_TASK_ENTRIES} {key}", where=where)
        for table in ("inputs", "outputs"):
            _check_path_table(args[table], f"{where}: {table}")
    if name == "flow_finish":
        if len(args["task_id"]) > MAX_NAME_LEN or len(args.get("engine_error", "")) > MAX_ENGINE_ERROR_LEN:
            raise FormatError(
                f"task_id longer than {MAX_NAME_LEN} or engine_error longer than {MAX_ENGINE_ERROR_LEN} characters",
                where=where,
            )
        for key in ("reports", "out_dir"):
            _check_path(args[key], f"{where}: {key}")
    return Call(call_id, name, args)


def _check_path(path: str, where: str) -> None:
    if not path or len(path) > MAX_PATH_LEN or "\0" in path:
        raise FormatError("path must be 1..4096 characters without NUL", where=where)


def _check_path_table(table: dict[str, Any], where: str) -> None:
    if len(table) > 64:
        raise FormatError("more than 64 entries", where=where)
    for name, path in table.items():
        if not name.isidentifier() or len(name) > MAX_NAME_LEN:
            raise FormatError(
                f"name {name[:MAX_NAME_LEN]!r} must be an identifier of at most 64 characters", where=where
            )
        if not isinstance(path, str):
            raise FormatError(f"path of {name!r} must be a string", where=where)
        _check_path(path, f"{where}.{name}")
