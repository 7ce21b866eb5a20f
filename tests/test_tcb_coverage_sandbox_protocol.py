"""The enclave <-> zygote protocol (sandbox/protocol.py) and the zygote server (sandbox/server.py) under
malformed frames and messages: a refusal naming the fault, no descriptor leaked, the zygote serving on."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from confide.enclave.errors import SandboxError
from confide.enclave.sandbox import SandboxLimits, Zygote
from confide.enclave.sandbox.protocol import MAX_FDS, MAX_FRAME, recv_msg, send_msg

LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=15)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_round_trip_with_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        send_msg(a, {"op": "run", "n": 1}, [r])
        msg = recv_msg(b)
        assert msg is not None
        obj, fds = msg
        assert obj == {"op": "run", "n": 1} and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe, received as a new descriptor
        assert os.get_inheritable(fds[0]) is False
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_clean_eof_is_none(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert recv_msg(b) is None


def test_too_many_descriptors_are_refused_before_sending(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(
        SandboxError, match=f"too many descriptors in one message \\({MAX_FDS + 1} > {MAX_FDS}\\)"
    ):
        send_msg(a, {"op": "run"}, [0] * (MAX_FDS + 1))
    a.close()
    assert recv_msg(b) is None  # nothing was sent


def test_peer_closing_in_the_header_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"\0\0")
    a.close()
    with pytest.raises(SandboxError, match="peer closed the socket mid-message"):
        recv_msg(b)


def test_peer_closing_in_the_body_is_refused_and_its_descriptors_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()
    body = json.dumps({"op": "run"}).encode()
    frame = struct.pack("!I", len(body) + 10) + body
    a.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
    a.close()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SandboxError, match="peer closed the socket mid-message"):
        recv_msg(b)
    assert set(os.listdir("/proc/self/fd")) <= before  # the received copy of r was closed
    os.close(r)
    os.close(w)


def test_header_only_then_eof_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack("!I", 5))
    a.close()
    with pytest.raises(SandboxError, match="peer closed the socket mid-message"):
        recv_msg(b)


def test_oversized_frame_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack("!I", MAX_FRAME + 1))
    with pytest.raises(SandboxError, match=f"frame of {MAX_FRAME + 1} bytes is too large"):
        recv_msg(b)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"run"', b"17", b"null"])
def test_a_frame_that_is_not_an_object_is_refused(
    pair: tuple[socket.socket, socket.socket], body: bytes
) -> None:
    a, b = pair
    a.sendall(struct.pack("!I", len(body)) + body)
    with pytest.raises(SandboxError, match="message is not a JSON object"):
        recv_msg(b)


def test_a_frame_that_is_not_json_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack("!I", 3) + b"{x]")
    with pytest.raises(ValueError):
        recv_msg(b)


def test_large_frame_survives_partial_sends(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    obj = {"blob": "y" * (MAX_FRAME - 64)}
    import threading

    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(recv_msg(b)))
    t.start()
    send_msg(a, obj)
    t.join()
    assert got and got[0] is not None and got[0][0] == obj  # type: ignore[index]


# -- the zygote server, spoken to directly --------------------------------------------------------
@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start(preimport=())
    yield z
    z.close()


def _ok(z: Zygote) -> None:
    result = z.run("def run(ctx):\n    return None\n", params={}, inputs={}, outputs={}, limits=LIMITS)
    assert result.category == "ok", result


def test_a_run_with_the_wrong_descriptor_count_is_refused_and_the_zygote_serves_on(zygote: Zygote) -> None:
    r, w = os.pipe()
    try:
        send_msg(
            zygote._sock,
            {"op": "run", "n_inputs": 1, "n_outputs": 1, "wall_seconds": 5},
            [r, w],
        )
        msg = recv_msg(zygote._sock)
    finally:
        os.close(r)
        os.close(w)
    assert msg is not None
    assert msg[0] == {"event": "exit", "error": "expected 5 fds, got 2"}
    _ok(zygote)


def test_unknown_ops_are_ignored_their_descriptors_closed_and_the_zygote_serves_on(zygote: Zygote) -> None:
    r, w = os.pipe()
    try:
        send_msg(zygote._sock, {"op": "exec", "cmd": "/bin/sh"}, [w])
        send_msg(zygote._sock, {"op": "kill"})  # a kill arriving after its child exited
        send_msg(zygote._sock, {})
        os.close(w)
        w = -1
        # the zygote closed its copy of the write end: the pipe reads EOF, nothing was run on it
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    _ok(zygote)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return []


def test_the_child_does_not_outlive_an_enclave_that_goes_away() -> None:
    """The enclave side's socket closes mid-run: the zygote kills the running child, then exits."""
    import threading
    import time

    z = Zygote.start(preimport=())
    zpid = z.pid
    errors: list[BaseException] = []

    def target() -> None:
        try:
            z.run(
                "import time\ndef run(ctx):\n    time.sleep(600)\n",
                params={},
                inputs={},
                outputs={},
                limits=LIMITS,
            )
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not _children(zpid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = _children(zpid)
        z._sock.shutdown(socket.SHUT_WR)  # the zygote reads EOF: its enclave is gone
        t.join(60)
        assert not t.is_alive()
        assert errors and isinstance(errors[0], SandboxError)
        assert "zygote" in str(errors[0])
        assert z._proc.wait(60) == 0  # the zygote exits by itself, after reaping its child
        assert not os.path.exists(f"/proc/{child}")
    finally:
        z.close()


def test_a_zygote_that_would_fork_with_threads_refuses_to_start() -> None:
    """Pre-importing a library that starts a thread (ONNX Runtime does) must stop the zygote: forking
    a multi-threaded process could hand the child a lock held by a thread that does not exist there."""
    with pytest.raises(SandboxError) as info:
        Zygote.start(preimport=("onnxruntime",))
    assert "threads after pre-importing ['onnxruntime']" in str(info.value)
    assert "it must stay single-threaded to fork safely" in str(info.value)


def test_a_zygote_whose_preimport_fails_reports_it() -> None:
    with pytest.raises(SandboxError, match="zygote start failed: ModuleNotFoundError"):
        Zygote.start(preimport=("confide_no_such_module",))
