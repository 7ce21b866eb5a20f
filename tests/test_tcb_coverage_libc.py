"""confide.enclave.sandbox.libc: a failing system call becomes an OSError with its errno and the call
named (what the layers report as MISSING), never a silent success. Only calls that fail are made."""

from __future__ import annotations

import errno

import pytest

from confide.enclave.sandbox import libc


@pytest.mark.parametrize(
    ("call", "name", "codes"),
    [
        (
            lambda: libc.mount("none", "/nonexistent/confide-test", "tmpfs", 0, None),
            "mount(/nonexistent/confide-test)",
            {errno.ENOENT, errno.EPERM},
        ),
        (
            lambda: libc.umount2("/nonexistent/confide-test", 0),
            "umount2(/nonexistent/confide-test)",
            {errno.ENOENT, errno.EPERM, errno.EINVAL},
        ),
        (lambda: libc.setns(-1, 0), "setns(0x0)", {errno.EBADF}),
        (lambda: libc.unshare(0x1), "unshare(0x1)", {errno.EINVAL}),
        (lambda: libc.prctl(0x7FFF), "prctl(32767)", {errno.EINVAL}),
    ],
)
def test_failed_calls_raise_with_errno_and_name(call, name: str, codes: set[int]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno in codes and name in str(info.value)
