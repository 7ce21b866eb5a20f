"""Landlock (Linux >= 5.13) through raw syscalls: read-only file system view, no TCP, scoped IPC.

No PyPI package covers the network (ABI 4) and scope (ABI 6) parts, so this talks to the kernel
directly: landlock_create_ruleset (444), landlock_add_rule (445), landlock_restrict_self (446).
"""

from __future__ import annotations

import ctypes
import os

from confide.enclave.sandbox.libc import (
    SYS_LANDLOCK_ADD_RULE,
    SYS_LANDLOCK_CREATE_RULESET,
    SYS_LANDLOCK_RESTRICT_SELF,
    syscall,
)

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

# File system rights (linux/landlock.h) and the ABI that introduced each.
ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

READ_ONLY = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR | ACCESS_FS_EXECUTE


def fs_rights_for_abi(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= ACCESS_FS_REFER
    if abi >= 3:
        rights |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        rights |= ACCESS_FS_IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The running kernel's Landlock ABI; 0 when Landlock is unsupported or disabled."""
    try:
        return syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
            what="landlock_create_ruleset",
        )
    except OSError:
        return 0


def restrict(abi: int, read_paths: tuple[str, ...], *, fs: bool, net: bool, scope: bool) -> str:
    """Restrict the calling thread (and its future threads) for good. Returns a one-line summary.

    fs: handle every fs right of the ABI and allow only READ_FILE|READ_DIR|EXECUTE beneath read_paths.
    net: handle BIND_TCP|CONNECT_TCP with no rule, so no TCP bind or connect at all.
    scope: abstract unix sockets and signals may not reach outside this Landlock domain.
    """
    if abi < 1:
        raise OSError(95, "Landlock is not supported by this kernel")
    if net and abi < 4:
        raise OSError(95, f"Landlock ABI {abi} has no network rules (needs 4)")
    if scope and abi < 6:
        raise OSError(95, f"Landlock ABI {abi} has no scopes (needs 6)")
    attr = _RulesetAttr(
        fs_rights_for_abi(abi) if fs else 0,
        (ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP) if net else 0,
        (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if scope else 0,
    )
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset_fd = syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        ctypes.byref(attr),
        ctypes.c_size_t(size),
        ctypes.c_uint32(0),
        what="landlock_create_ruleset",
    )
    allowed: list[str] = []
    try:
        if fs:
            for path in read_paths:
                try:
                    path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
                except OSError:
                    continue
                try:
                    rule = _PathBeneathAttr(READ_ONLY, path_fd)
                    syscall(
                        SYS_LANDLOCK_ADD_RULE,
                        ruleset_fd,
                        LANDLOCK_RULE_PATH_BENEATH,
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                        what=f"landlock_add_rule({path})",
                    )
                    allowed.append(path)
                finally:
                    os.close(path_fd)
        syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, ctypes.c_uint32(0), what="landlock_restrict_self")
    finally:
        os.close(ruleset_fd)
    return f"ABI {abi}; read-only beneath {', '.join(allowed) or 'nothing'}"
