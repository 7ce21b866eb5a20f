"""The enclave's link to the host's accelerator (issue 9): byte streams for the sandbox child.

The accelerator (``confide.infer.accelerator``) is untrusted: a process the host runs outside the
enclave and the sandbox. The host starts it and hands the enclave one end of a unix socket at start
(``--accelerator-fd``). For each task that outsources its linear layers the enclave makes two fresh
pipes, sends the accelerator's ends (read end of the requests, write end of the replies) over that
socket with SCM_RIGHTS, closes its own copies of them, and gives the other two ends to the sandbox
child through the zygote (``ctx.accelerator``). So:

- the child gets nothing but an already open byte stream (pipes carry no descriptors, and the child
  still cannot create a socket or open a path), one per run, never shared with another task;
- the enclave process never reads a byte from the accelerator: the child parses every frame
  (``enclave/infer/wire.py``) and checks every product (Freivalds, ``enclave/infer/slalom.py``);
- when the accelerator dies or closes its ends, the child reads end of stream and fails closed.

The control socket is write-only for the enclave (shut down for reading once set up). This module
is stdlib-only: it runs in the enclave process.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from .errors import ConfideError, EnclaveError
from .sandbox.protocol import send_msg

SEND_TIMEOUT_S = 10.0
# the infer built-in's modes that need an accelerator (its params.mode, approved by every owner)
OUTSOURCED_MODES = ("outsourced-verified", "outsourced-blinded+verified")


def needs_accelerator(kind: str, name: str, params: dict[str, Any]) -> bool:
    """True for an ``infer`` task whose approved mode outsources linear layers."""
    return kind == "builtin" and name == "infer" and params.get("mode") in OUTSOURCED_MODES


class AcceleratorLink:
    """The control socket to the host's accelerator; `open_stream` per outsourced run."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise EnclaveError("the accelerator descriptor is not a unix stream socket", where="accelerator")
        sock.settimeout(SEND_TIMEOUT_S)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
        self._sock = sock
        self.streams = 0

    @classmethod
    def from_fd(cls, fd: int) -> AcceleratorLink:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise EnclaveError(f"accelerator descriptor {fd}: {exc}", where="accelerator") from None
        return cls(sock)

    def open_stream(self) -> tuple[int, int]:
        """A fresh stream: returns the child's (read fd, write fd); the caller closes them after the
        run. The accelerator's ends have been sent to the host and closed here."""
        req_r, req_w = os.pipe2(os.O_CLOEXEC)  # child writes requests, accelerator reads
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)  # accelerator writes replies, child reads
        try:
            send_msg(self._sock, {"op": "stream", "n": self.streams + 1}, [req_r, rep_w])
        except (OSError, ConfideError) as exc:
            for fd in (req_w, rep_r):
                os.close(fd)
            raise EnclaveError(
                f"the host's accelerator is not reachable ({type(exc).__name__}: {exc}); the task's "
                "outsourced mode cannot run",
                where="accelerator",
            ) from None
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.streams += 1
        return rep_r, req_w

    def close(self) -> None:
        self._sock.close()
