"""The local channel between a Spark-side stub and its node's enclave worker (the node agent).

Frames on a unix stream socket: ``u32 length | bytes``. A request is a JSON frame (the operation
and its public arguments), then the operation's byte frames (the ticket, the batches...), closed by
an empty frame; the answer is a JSON frame (``{"ok": true, ...}`` or the error), then byte frames,
closed by an empty frame. Batches are never empty, so an empty frame only ever closes a list.

Everything on this channel is either public (stage, partition, paths, counts) or sealed (tickets,
batches, reports, job descriptions); the stub and the socket are outside the TCB. This module uses
only the standard library, so the stub that Spark's Python workers import stays small.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Any

_LEN = struct.Struct(">I")
MAX_FRAME = 80 << 20  # a batch is at most 64 MiB (confide.enclave.flow.batch.MAX_BATCH)
MAX_JSON = 1 << 20
BUFSIZE = 1 << 20


class ChannelError(Exception):
    """The channel broke or the peer spoke out of protocol."""


class Conn:
    """One framed connection (buffered both ways)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rf = sock.makefile("rb", buffering=BUFSIZE)
        self.wf = sock.makefile("wb", buffering=BUFSIZE)

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = None) -> Conn:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as exc:
            s.close()
            raise ChannelError(f"cannot reach the node's enclave worker at {path} ({exc.strerror})") from None
        return cls(s)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.wf.write(_LEN.pack(len(data)))
        if data:
            self.wf.write(data)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(json.dumps(obj, separators=(",", ":")).encode())

    def send_list(self, frames: Iterable[bytes]) -> int:
        n = 0
        for f in frames:
            if not f:
                raise ChannelError("an empty frame cannot be sent as a list item")
            self.send(f)
            n += 1
        self.send(b"")
        return n

    def flush(self) -> None:
        self.wf.flush()

    def recv(self, *, limit: int = MAX_FRAME) -> bytes:
        head = self.rf.read(_LEN.size)
        if len(head) != _LEN.size:
            raise ChannelError("the channel closed mid-message")
        (n,) = _LEN.unpack(head)
        if n > limit:
            raise ChannelError(f"frame of {n} bytes exceeds the limit of {limit}")
        data = self.rf.read(n)
        if len(data) != n:
            raise ChannelError("the channel closed inside a frame")
        return data

    def recv_json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.recv(limit=MAX_JSON))
        except ValueError:
            raise ChannelError("a control frame is not JSON") from None
        if not isinstance(obj, dict):
            raise ChannelError("a control frame is not a JSON object")
        return obj

    def recv_list(self) -> Iterator[bytes]:
        while True:
            f = self.recv()
            if not f:
                return
            yield f

    def close(self) -> None:
        for f in (self.rf, self.wf, self.sock):
            with contextlib.suppress(OSError):
                f.close()
