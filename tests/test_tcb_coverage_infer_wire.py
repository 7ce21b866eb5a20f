"""confide.enclave.infer.wire: frames from the untrusted accelerator process, cut, oversized, not JSON,
of unknown dtype or bad shape, or replies that do not echo the request, are refused with a WireError."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
import pytest

from confide.enclave.infer.wire import MAX_HEADER, AcceleratorClient, WireError, recv, send


def frame(head: Any, payload: bytes = b"") -> bytes:
    body = json.dumps(head).encode()
    return struct.pack(">I", len(body)) + body + payload


def test_round_trip_and_a_clean_end() -> None:
    buf = io.BytesIO()
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    n = send(buf, {"op": "x"}, a)
    assert n == len(buf.getvalue()) == 4 + len(b'{"dtype":"int16","op":"x","shape":[2,3]}') + a.nbytes
    send(buf, {"op": "close"})
    buf.seek(0)
    head, got = recv(buf, where="w")  # type: ignore[misc]
    assert head["dtype"] == "int16" and np.array_equal(got, a)  # type: ignore[arg-type]
    assert recv(buf, where="w") == ({"op": "close"}, None)
    assert recv(buf, where="w") is None


def test_send_refuses_what_cannot_travel() -> None:
    with pytest.raises(WireError, match="dtype float64 cannot travel"):
        send(io.BytesIO(), {}, np.zeros(2))
    with pytest.raises(WireError, match="header too large"):
        send(io.BytesIO(), {"x": "y" * MAX_HEADER})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0\0", "channel closed with 2 of 2 bytes missing"),
        (struct.pack(">I", MAX_HEADER + 1), f"header of {MAX_HEADER + 1} bytes exceeds"),
        (struct.pack(">I", 10) + b"{}", "channel closed with 8 of 10 bytes missing"),
        (struct.pack(">I", 3) + b"{x]", "header is not JSON"),
        (struct.pack(">I", 2) + b"\xff\xfe", "header is not JSON"),
        (frame([1]), "header is not a JSON object"),
        (frame({"dtype": "float64", "shape": [1]}), "unknown dtype 'float64'"),
        (frame({"dtype": "int8", "shape": "3"}), "bad shape"),
        (frame({"dtype": "int8", "shape": [1, 1, 1, 1, 1]}), "bad shape"),
        (frame({"dtype": "int8", "shape": [True]}), "bad shape"),
        (frame({"dtype": "int8", "shape": [-1]}), "bad shape"),
        (frame({"dtype": "int64", "shape": [1 << 20, 1 << 10]}), "exceeds"),
        (frame({"dtype": "int8", "shape": [4]}, b"\1\2"), "channel closed with 2 of 4 bytes missing"),
    ],
)
def test_hostile_frames_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(WireError) as info:
        recv(io.BytesIO(data), where="layer fc1")
    assert message in str(info.value) and "layer fc1" in str(info.value)


class _Pipe(io.BytesIO):
    def __init__(self, replies: bytes = b"", fail: bool = False) -> None:
        super().__init__(replies)
        self.fail = fail

    def write(self, data: Any) -> int:
        if self.fail:
            raise BrokenPipeError("gone")
        return len(data)


def _client(replies: bytes, *, fail: bool = False) -> AcceleratorClient:
    return AcceleratorClient(_Pipe(replies), _Pipe(fail=fail))  # type: ignore[arg-type]


def test_the_client_accepts_only_an_echoed_ok_reply() -> None:
    z = np.arange(3, dtype=np.int64).reshape(1, 3)
    good = io.BytesIO()
    send(good, {"ok": True, "seq": 1}, z)
    c = _client(good.getvalue())
    assert np.array_equal(c.matmul("fc1", np.ones((1, 2))), z)  # type: ignore[arg-type]
    assert c.bytes_received > 0
    c.close()


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        (b"", "the accelerator closed the channel"),
        (frame({"ok": True, "seq": 7}), "reply to request 7, expected 1"),
        (frame({"ok": False, "seq": 1, "error": "no such layer"}), "the accelerator refused: no such layer"),
        (frame({"seq": 1}), "the accelerator refused: no reason given"),
        (b"\0\0\0", "channel closed"),
    ],
)
def test_the_client_refuses_bad_replies(replies: bytes, message: str) -> None:
    with pytest.raises(WireError) as info:
        _client(replies).load("fc1", np.array([[300, -2]], dtype=np.int64))
    assert message in str(info.value) and "layer fc1 (load)" in str(info.value)


def test_an_unreachable_accelerator_is_named() -> None:
    with pytest.raises(WireError, match="cannot reach the accelerator"):
        _client(b"", fail=True).matmul("fc1", np.ones((1, 2)))
    _client(b"", fail=True).close()  # closing a dead channel is quiet
