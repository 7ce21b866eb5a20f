"""Framed JSON messages with attached file descriptors over a unix stream socket (SCM_RIGHTS).

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON (an object). Descriptors ride
on the first byte of the frame. Only the enclave process and its zygote speak this protocol; the
sandboxed child never holds the socket.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from typing import Any

from confide.enclave.errors import SandboxError

MAX_FDS = 250  # the kernel allows 253 descriptors per SCM_RIGHTS message
MAX_FRAME = 1 << 20
_HDR = struct.Struct("!I")


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    if len(fds) > MAX_FDS:
        raise SandboxError(
            f"too many descriptors in one message ({len(fds)} > {MAX_FDS})", where="sandbox.protocol"
        )
    data = json.dumps(obj, separators=(",", ":")).encode()
    frame = _HDR.pack(len(data)) + data
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([frame], anc)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        data, anc, flags, _ = sock.recvmsg(
            n - len(buf), socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                _close_quiet(fd)
            raise SandboxError("descriptor message truncated", where="sandbox.protocol")
        if not data:
            if buf or fds:
                for fd in fds:
                    _close_quiet(fd)
                raise SandboxError("peer closed the socket mid-message", where="sandbox.protocol")
            return None
        buf += data
    return bytes(buf)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Receive one frame; None on a clean EOF. Received descriptors are close-on-exec."""
    fds: list[int] = []
    head = _recv_exact(sock, _HDR.size, fds)
    if head is None:
        return None
    (length,) = _HDR.unpack(head)
    if length > MAX_FRAME:
        raise SandboxError(f"frame of {length} bytes is too large", where="sandbox.protocol")
    body = _recv_exact(sock, length, fds)
    if body is None:
        raise SandboxError("peer closed the socket mid-message", where="sandbox.protocol")
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise SandboxError("message is not a JSON object", where="sandbox.protocol")
    return obj, fds


def _close_quiet(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
