"""The namespaces layer: a private network (no interfaces but a downed loopback), IPC, UTS and mount
namespace for the child, so even a socket that slipped through would reach nothing."""

from __future__ import annotations

import ctypes
import os

from confide.enclave.sandbox.libc import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    SYS_MOUNT_SETATTR,
    syscall,
    unshare,
)

FLAGS = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNS
CHECKED = ("net", "ipc", "uts", "mnt")
HOSTNAME = b"confide-sandbox"

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x00000001
_MOUNT_ATTR_NOSUID = 0x00000002
_MOUNT_ATTR_NODEV = 0x00000004
_MOUNT_ATTR_NOEXEC = 0x00000008
_MOUNT_ATTR__ATIME = 0x00000070
_MOUNT_ATTR_NOATIME = 0x00000010
_MS_PRIVATE = 1 << 18


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def ns_inodes() -> dict[str, int]:
    """Namespace identities of the calling process (inode numbers of /proc/self/ns/*)."""
    out: dict[str, int] = {}
    for name in CHECKED:
        try:
            out[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            out[name] = -1
    return out


def enter_private() -> str:
    unshare(FLAGS)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sethostname(HOSTNAME, len(HOSTNAME)) != 0:  # only changes the private UTS namespace
        err = ctypes.get_errno()
        raise OSError(err, f"sethostname: {os.strerror(err)}")
    # Every mount of the private mount namespace: private, read-only, noatime (reads leave no trace a
    # later run could see), nosuid, nodev. Attributes are per mount, so the host's mounts are untouched.
    attr = _MountAttr(
        attr_set=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOATIME | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV,
        attr_clr=_MOUNT_ATTR__ATIME,
        propagation=_MS_PRIVATE,
        userns_fd=0,
    )
    syscall(
        SYS_MOUNT_SETATTR,
        ctypes.c_int(_AT_FDCWD),
        b"/",
        ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        what="mount_setattr",
    )
    return "unshared net, ipc, uts, mnt; every mount private, read-only, noatime, nosuid, nodev"


def mounts_read_only() -> bool:
    flags = os.statvfs("/").f_flag
    return bool(flags & os.ST_RDONLY and flags & os.ST_NOATIME)
