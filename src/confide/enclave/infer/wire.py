"""The framed protocol between the enclave side and the untrusted accelerator process.

One frame: ``u32 header length (big-endian) | header (JSON object) | payload``, the payload being
one little-endian integer array whose dtype and shape the header names (``nbytes`` follows from
them). Requests: ``load`` (a layer's quantized weights), ``matmul`` (a batch for a loaded layer),
``close``. Replies: ``{"ok": true, "seq": ...}`` with the product, or ``{"ok": false, "error": ...}``.

Everything read here comes from outside the TCB: header size, JSON, dtype, rank, shape and payload
size are bounded and checked, the reply's sequence number must echo the request's, and the values
themselves are checked by slalom.run_linear (range, then Freivalds) before any is used.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from typing import Any, BinaryIO

import numpy as np

from confide.enclave.errors import ConfideError

MAX_HEADER = 64 << 10
MAX_PAYLOAD = 1 << 30
MAX_RANK = 4
DTYPES = {"int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8"}


class WireError(ConfideError):
    """A malformed or truncated frame, or a closed channel."""


def _read_exact(fh: BinaryIO, n: int, where: str) -> bytes:
    chunks = []
    left = n
    while left:
        data = fh.read(left)
        if not data:
            raise WireError(f"channel closed with {left} of {n} bytes missing", where=where)
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def send(fh: BinaryIO, header: dict[str, Any], array: np.ndarray | None = None) -> int:
    """Write one frame; returns the bytes written."""
    head = dict(header)
    payload = b""
    if array is not None:
        name = next((k for k, v in DTYPES.items() if np.dtype(v) == array.dtype.newbyteorder("<")), None)
        if name is None:
            raise WireError(f"dtype {array.dtype} cannot travel", where="wire.send")
        head["dtype"] = name
        head["shape"] = list(array.shape)
        payload = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    body = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_HEADER:
        raise WireError("header too large", where="wire.send")
    fh.write(struct.pack(">I", len(body)) + body)
    if payload:
        fh.write(payload)
    fh.flush()
    return 4 + len(body) + len(payload)


def recv(
    fh: BinaryIO, *, where: str, max_payload: int = MAX_PAYLOAD
) -> tuple[dict[str, Any], np.ndarray | None] | None:
    """Read one frame; None at a clean end of stream (before any byte of a frame)."""
    first = fh.read(4)
    if not first:
        return None
    prefix = first if len(first) == 4 else first + _read_exact(fh, 4 - len(first), where)
    (length,) = struct.unpack(">I", prefix)
    if length > MAX_HEADER:
        raise WireError(f"header of {length} bytes exceeds {MAX_HEADER}", where=where)
    try:
        head = json.loads(_read_exact(fh, length, where))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not JSON ({exc})", where=where) from None
    if not isinstance(head, dict):
        raise WireError("header is not a JSON object", where=where)
    if "dtype" not in head and "shape" not in head:
        return head, None
    dtype = head.get("dtype")
    shape = head.get("shape")
    if dtype not in DTYPES:
        raise WireError(f"unknown dtype {dtype!r}", where=where)
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max_payload for d in shape)
    ):
        raise WireError(f"bad shape {shape!r}", where=where)
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if nbytes > max_payload:
        raise WireError(f"payload of {nbytes} bytes exceeds {max_payload}", where=where)
    data = _read_exact(fh, nbytes, where)
    return head, np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


def _smallest_int(a: np.ndarray) -> np.ndarray:
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for t in (np.int8, np.int16, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return a.astype(t)
    return a.astype(np.int64)


class AcceleratorClient:
    """The enclave side of the channel (implements slalom.Accelerator). `rfile`/`wfile` are binary
    streams to the accelerator process (a pipe pair or a socket's makefile)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self._r = rfile
        self._w = wfile
        self._seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _call(self, header: dict[str, Any], array: np.ndarray | None, where: str) -> np.ndarray | None:
        self._seq += 1
        header = {**header, "seq": self._seq}
        try:
            self.bytes_sent += send(self._w, header, array)
        except (OSError, ValueError) as exc:
            raise WireError(f"cannot reach the accelerator ({exc})", where=where) from None
        try:
            msg = recv(self._r, where=where)
        except (OSError, ValueError) as exc:
            raise WireError(f"cannot read the accelerator ({exc})", where=where) from None
        if msg is None:
            raise WireError("the accelerator closed the channel", where=where)
        head, out = msg
        if head.get("seq") != self._seq:
            raise WireError(f"reply to request {head.get('seq')!r}, expected {self._seq}", where=where)
        if head.get("ok") is not True:
            err = str(head.get("error", "no reason given"))[:500]
            raise WireError(f"the accelerator refused: {err}", where=where)
        self.bytes_received += 4 + len(json.dumps(head)) + (0 if out is None else out.nbytes)
        return out

    def load(self, layer: str, w_q: np.ndarray) -> None:
        self._call({"op": "load", "layer": layer}, _smallest_int(w_q), f"layer {layer} (load)")

    def matmul(self, layer: str, x: np.ndarray) -> object:
        return self._call({"op": "matmul", "layer": layer}, x.astype(np.int32), f"layer {layer}")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            send(self._w, {"op": "close", "seq": self._seq + 1})
