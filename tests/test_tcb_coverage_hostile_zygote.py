"""The enclave side of the sandbox (sandbox/zygote.py) facing a zygote that misbehaves: a fake zygote
process speaks the protocol wrongly at start and during a run. Every case ends in a SandboxError
naming what failed, with the fake zygote killed (no process left behind), never a hang."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from confide.enclave.errors import SandboxError
from confide.enclave.sandbox import LAYER_NAMES, SandboxLimits, Zygote

LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=15)
LAYERS: dict[str, str] = dict.fromkeys(LAYER_NAMES, "ok: fake")
HELLO: dict[str, object] = {"event": "hello", "pid": 1, "layers": LAYERS}

PRELUDE = """\
import json, os, socket, struct, sys, time
from confide.enclave.sandbox.protocol import recv_msg, send_msg
sock = socket.socket(fileno=int(sys.argv[1]))
HELLO = json.loads(sys.argv[2])
"""


def fake(script: str, hello: dict | None = None) -> tuple[subprocess.Popen[bytes], socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PRELUDE + textwrap.dedent(script),
            str(theirs.fileno()),
            __import__("json").dumps(hello or HELLO),
        ],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    return proc, mine


def start(
    script: str, *, strict: bool = True, hello: dict | None = None
) -> tuple[subprocess.Popen[bytes], Zygote]:
    proc, sock = fake(script, hello)
    return proc, Zygote._await_hello(proc, sock, strict)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("sock.close()\ntime.sleep(30)", "the zygote exited during start"),
        ("send_msg(sock, {'event': 'started'})\ntime.sleep(30)", "the zygote exited during start"),
        (
            "send_msg(sock, {'event': 'hello', 'error': 'ImportError: no numpy'})\ntime.sleep(30)",
            "zygote start failed: ImportError: no numpy",
        ),
        ("sock.sendall(struct.pack('!I', 4) + b'[1]]')\ntime.sleep(30)", "no answer from the zygote"),
        (
            "sock.sendall(struct.pack('!I', 1 << 30))\ntime.sleep(30)",
            "no answer from the zygote: sandbox.protocol: frame of",
        ),
    ],
)
def test_a_zygote_that_starts_wrongly_is_refused_and_killed(script: str, message: str) -> None:
    proc, sock = fake(script)
    with pytest.raises(SandboxError) as info:
        Zygote._await_hello(proc, sock, True)
    assert message in str(info.value) and "Zygote.start" in str(info.value)
    assert proc.wait(30) is not None  # killed, not left running


def test_a_zygote_reporting_a_missing_layer_is_refused_when_strict_and_weak_otherwise() -> None:
    hello = {**HELLO, "layers": {**LAYERS, "seccomp": "MISSING: no filter"}}
    script = "send_msg(sock, HELLO)\nrecv_msg(sock)\n"
    proc, sock = fake(script, hello)
    with pytest.raises(
        SandboxError, match="sandbox layer\\(s\\) missing: seccomp .*seccomp: MISSING: no filter"
    ):
        Zygote._await_hello(proc, sock, True)
    assert proc.wait(30) == 0  # closed: its socket reached EOF
    proc, z = start(script, strict=False, hello=hello)
    try:
        assert z.weak and z.layers["seccomp"] == "MISSING: no filter" and z.alive()
    finally:
        z.close()
    assert not z.alive()
    z.close()  # a second close is a no-op


RUN = "def run(ctx):\n    return None\n"


def _run(z: Zygote) -> object:
    return z.run(RUN, params={}, inputs={}, outputs={}, limits=LIMITS)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("msg, fds = recv_msg(sock)\nos._exit(0)", "the zygote exited during a run"),
        (
            "msg, fds = recv_msg(sock)\nsock.sendall(struct.pack('!I', 2) + b'[]')\ntime.sleep(30)",
            "lost the zygote",
        ),
        ("msg, fds = recv_msg(sock)\nsock.sendall(b'\\0\\0')\nos._exit(0)", "lost the zygote"),
    ],
)
def test_a_zygote_that_breaks_during_a_run_is_abandoned(script: str, message: str) -> None:
    proc, z = start("send_msg(sock, HELLO)\n" + script)
    with pytest.raises(SandboxError) as info:
        _run(z)
    assert message in str(info.value) and "Zygote.run" in str(info.value)
    assert proc.wait(30) is not None and not z.alive()
    with pytest.raises(SandboxError, match="the zygote is not running"):
        _run(z)


def test_a_fork_failure_the_zygote_reports_is_an_internal_error_not_ok() -> None:
    script = """\
        send_msg(sock, HELLO)
        while True:
            got = recv_msg(sock)
            if got is None:
                break
            msg, fds = got
            for fd in fds:
                os.close(fd)
            send_msg(sock, {"event": "note"}, [os.open("/dev/null", os.O_RDONLY)])  # fds on a note: closed
            send_msg(sock, {"event": "exit", "error": "fork failed: [Errno 11] Resource temporarily unavailable"})
    """
    proc, z = start(script)
    try:
        result = _run(z)
        assert not result.ok and result.category != "ok"  # type: ignore[attr-defined]
        assert "fork failed" in result.detail  # type: ignore[attr-defined]
        assert z.alive()
    finally:
        z.close()
    assert proc.wait(30) == 0


def test_a_zygote_that_never_reports_the_exit_is_killed_at_the_hard_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from confide.enclave.sandbox import zygote as zmod

    monkeypatch.setattr(zmod, "REPORT_GRACE_S", 0.0)
    proc, z = start("send_msg(sock, HELLO)\nmsg, fds = recv_msg(sock)\ntime.sleep(60)")
    with pytest.raises(SandboxError, match="did not report the child's exit; zygote killed"):
        z.run(RUN, params={}, inputs={}, outputs={}, limits=SandboxLimits(wall_seconds=0.5))
    assert proc.wait(30) is not None and not z.alive()


def test_unserialisable_params_and_too_many_fds_are_refused_before_sending() -> None:
    _proc, z = start("send_msg(sock, HELLO)\nrecv_msg(sock)\n")
    try:
        with pytest.raises(SandboxError, match="params must be JSON values"):
            z.run(RUN, params={"x": {1, 2}}, inputs={}, outputs={}, limits=LIMITS)
        with pytest.raises(SandboxError, match="too many inputs and outputs"):
            z.run(RUN, params={}, inputs={}, outputs={f"o{i}": None for i in range(300)}, limits=LIMITS)  # type: ignore[misc]
    finally:
        z.close()
