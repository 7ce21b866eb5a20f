"""Sealed, read-only memfds for handing decrypted inputs (and the run request) to a sandboxed child."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from typing import BinaryIO

from confide.enclave.errors import SandboxError

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_MFD_NOEXEC_SEAL = 0x0008  # Linux >= 6.3: not executable, and F_SEAL_EXEC set
_CHUNK = 1 << 20


def _memfd(name: str) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, flags | _MFD_NOEXEC_SEAL)
    except OSError:
        return os.memfd_create(name, flags)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[:_CHUNK])
        view = view[n:]


def make_input_memfd(
    data_or_file: bytes | bytearray | memoryview | BinaryIO | Iterable[bytes | bytearray | memoryview],
    *,
    name: str = "confide-input",
) -> int:
    """Copy bytes, a binary file object (streamed) or an iterable of chunks (e.g. the decrypted chunks
    of a sealed file) into a memfd, seal it against any change and rewind it. Returns the fd
    (close-on-exec); the caller owns it and closes it after the run."""
    fd = _memfd(name)
    try:
        if isinstance(data_or_file, bytes | bytearray | memoryview):
            _write_all(fd, data_or_file)
        elif hasattr(data_or_file, "read"):
            while chunk := data_or_file.read(_CHUNK):
                _write_all(fd, chunk)
        else:
            for chunk in data_or_file:
                _write_all(fd, chunk)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_input_fd(name: str, fd: int) -> None:
    """An input must be unmodifiable by the child: a memfd sealed against writes, or a read-only fd."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise SandboxError(
            f"input {name!r}: fd {fd} is not open ({exc.strerror})", where="Zygote.run"
        ) from None
    if mode == os.O_RDONLY:
        return
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_WRITE:
        raise SandboxError(
            f"input {name!r}: fd {fd} is writable and not sealed with F_SEAL_WRITE "
            "(use make_input_memfd or open it read-only)",
            where="Zygote.run",
        )
