"""The accelerator's pipe pair with deadlines, as the sandbox child reads and writes it.

The accelerator is untrusted and may stop at any point: never read the request (the pipe's buffer
fills and a blocking write would wait for ever), or send half a reply and hold the stream open. So
each request frame must be written, and its reply read, within ``seconds`` (the infer built-in's
``params.reply_timeout_s``): the writer's deadline starts with a frame's first byte, the reader's
when the frame is flushed. Either deadline passing raises TimeoutError, which the wire client words
as "cannot reach / cannot read the accelerator" naming the layer, so the run fails closed instead of
hanging until the sandbox's wall-clock kill.

Both ends are file descriptors the enclave gave the child (accelerator_link.py); the writer puts its
descriptor in non-blocking mode (fcntl F_SETFL, allowed by the sandbox's seccomp filter).
"""

from __future__ import annotations

import os
import select
import time
from typing import Any

CHUNK = 1 << 20


class DeadlineReader:
    """The reply pipe: each reply must arrive complete within `seconds` of its request (`arm`)."""

    def __init__(self, fh: Any, seconds: float) -> None:
        self._fd = fh.fileno()
        self._fh = fh  # keeps the file object (and its descriptor) alive
        self._seconds = seconds
        self._deadline = 0.0
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def arm(self) -> None:
        self._deadline = time.monotonic() + self._seconds

    def read(self, n: int) -> bytes:
        left = self._deadline - time.monotonic()
        if left <= 0 or not self._poll.poll(max(1, int(left * 1000))):
            raise TimeoutError(f"no complete reply within {self._seconds:g} s (params.reply_timeout_s)")
        return os.read(self._fd, min(n, CHUNK))


class DeadlineWriter:
    """The request pipe: each frame (the writes up to a flush) must be taken by the accelerator
    within `seconds` of its first byte; the flush arms the reader's deadline for the reply."""

    def __init__(self, fh: Any, reader: DeadlineReader, seconds: float) -> None:
        self._fd = fh.fileno()
        self._fh = fh
        self._reader = reader
        self._seconds = seconds
        self._deadline: float | None = None
        os.set_blocking(self._fd, False)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLOUT)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._deadline is None:
            self._deadline = time.monotonic() + self._seconds
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            left = self._deadline - time.monotonic()
            if left <= 0 or not self._poll.poll(max(1, int(left * 1000))):
                raise TimeoutError(
                    f"the accelerator took {done} of {len(view)} bytes of a request within {self._seconds:g} s "
                    "(params.reply_timeout_s)"
                )
            try:
                done += os.write(self._fd, view[done : done + CHUNK])
            except BlockingIOError:
                continue  # woken, but another writer's worth was not free yet: poll again
        return done

    def flush(self) -> None:
        self._deadline = None
        self._reader.arm()
