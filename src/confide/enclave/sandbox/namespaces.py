"""The namespace layers of the child.

namespaces: a private network (no interfaces but a downed loopback), IPC, UTS and mount namespace,
so even a socket that slipped through would reach nothing.

pid-namespace: the zygote forks every child into a pid namespace of its own (fork_child), so the
child is pid 1 there and no host pid names anything; the child then lowers that namespace's
pid_max to its minimum (Linux >= 6.14 keeps pid_max per pid namespace), which bounds the threads
of a run whatever its uid.

minimal-root: a tmpfs root holding read-only bind mounts of the trees the child may read (the
interpreter, its packages, the system libraries) and nothing else: no /proc, /etc, /dev, /sys, no
host state; the old root is detached after pivot_root. Every mount left is read-only, noatime,
nosuid, nodev.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

from confide.enclave.sandbox.libc import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    SYS_MOUNT_SETATTR,
    SYS_PIVOT_ROOT,
    mount,
    setns,
    syscall,
    umount2,
    unshare,
)

FLAGS = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNS
CHECKED = ("net", "ipc", "uts", "mnt")
HOSTNAME = b"confide-sandbox"

# pid_max of the child's pid namespace. The kernel's minimum is RESERVED_PIDS + 1 = 301, so a run
# has at most 300 tasks (its main thread + 299 others) whatever its uid.
PID_MAX = 301
PER_NS_PID_MAX_KERNEL = (6, 14)  # before 6.14 pid_max is global: never write it there
# Where the new root's tmpfs is mounted before pivot_root (only inside the child's mount namespace).
STAGING_CANDIDATES = ("/tmp", "/mnt", "/media", "/srv", "/opt")
SCRATCH = "/tmp"  # the probe's writable tmpfs in the new root (probe only)

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x00000001
_MOUNT_ATTR_NOSUID = 0x00000002
_MOUNT_ATTR_NODEV = 0x00000004
_MOUNT_ATTR__ATIME = 0x00000070
_MOUNT_ATTR_NOATIME = 0x00000010


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def ns_inodes(names: tuple[str, ...] = CHECKED, *, dir_fd: int | None = None) -> dict[str, int]:
    """Namespace identities of the calling process (inode numbers of /proc/self/ns/*).

    dir_fd: a descriptor of /proc/self/ns opened earlier (the minimal root has no /proc)."""
    out: dict[str, int] = {}
    for name in names:
        try:
            if dir_fd is None:
                out[name] = os.stat(f"/proc/self/ns/{name}").st_ino
            else:
                out[name] = os.stat(name, dir_fd=dir_fd).st_ino
        except OSError:
            out[name] = -1
    return out


def _seal_mounts() -> None:
    """Every mount of the (private) mount namespace: private, read-only, noatime (reads leave no
    trace a later run could see), nosuid, nodev. Attributes are per mount: the host's are untouched."""
    attr = _MountAttr(
        attr_set=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOATIME | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV,
        attr_clr=_MOUNT_ATTR__ATIME,
        propagation=MS_PRIVATE,
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


def enter_private() -> str:
    unshare(FLAGS)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sethostname(HOSTNAME, len(HOSTNAME)) != 0:  # only changes the private UTS namespace
        err = ctypes.get_errno()
        raise OSError(err, f"sethostname: {os.strerror(err)}")
    _seal_mounts()
    return "unshared net, ipc, uts, mnt; every mount private, read-only, noatime, nosuid, nodev"


def mounts_read_only() -> bool:
    flags = os.statvfs("/").f_flag
    return bool(flags & os.ST_RDONLY and flags & os.ST_NOATIME)


# -- pid namespace ----------------------------------------------------------------------------------


def fork_child(*, new_pid_ns: bool) -> int:
    """os.fork(), the child being the first process (pid 1) of a new pid namespace when new_pid_ns.

    unshare(CLONE_NEWPID) only changes where the caller's next child goes, so the zygote switches
    back to its own pid namespace right after the fork. When the unshare fails the child is forked
    in the zygote's namespace and its pid-namespace layer reports that (fail closed there)."""
    if not new_pid_ns:
        return os.fork()
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            unshare(CLONE_NEWPID)
        except OSError:
            return os.fork()
        try:
            return os.fork()
        finally:
            if os.getpid() != 1:  # the parent (the child is pid 1 of the new namespace)
                setns(own, CLONE_NEWPID)
    finally:
        with contextlib.suppress(OSError):
            os.close(own)


def kernel_version() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def bound_pid_namespace(zygote_pid_ns: int) -> str:
    """In the child: check it is pid 1 of a pid namespace of its own, then set that namespace's pid_max."""
    if os.getpid() != 1:
        raise OSError(0, f"the child is pid {os.getpid()}, not the first process of a new pid namespace")
    if ns_inodes(("pid",))["pid"] in (-1, zygote_pid_ns):
        raise OSError(0, "the child is still in the zygote's pid namespace")
    if kernel_version() < PER_NS_PID_MAX_KERNEL:
        raise OSError(
            0,
            f"Linux {'.'.join(map(str, kernel_version()))} keeps one global pid_max "
            f"(per-pid-namespace pid_max needs {'.'.join(map(str, PER_NS_PID_MAX_KERNEL))}): threads unbounded",
        )
    with open("/proc/sys/kernel/pid_max", "w") as f:
        f.write(str(PID_MAX))
    with open("/proc/sys/kernel/pid_max") as f:
        got = int(f.read().strip())
    if got != PID_MAX:
        raise OSError(0, f"pid_max of the child's pid namespace reads {got}, not {PID_MAX}")
    return f"pid 1 of its own pid namespace; pid_max {PID_MAX}: at most {PID_MAX - 1} tasks, threads included"


# -- minimal root -----------------------------------------------------------------------------------


def root_trees(paths: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The real directories to bind (outermost only) and the symlinks (name -> real) to recreate."""
    reals: list[str] = []
    links: dict[str, str] = {}
    for path in paths:
        if not os.path.isdir(path):
            continue
        name, real = os.path.abspath(path), os.path.realpath(path)
        reals.append(real)
        if name != real:
            links[name] = real
    outer = [
        r for r in sorted(set(reals)) if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in reals)
    ]
    return outer, links


def _staging() -> str:
    for path in STAGING_CANDIDATES:
        if os.path.isdir(path) and not os.path.islink(path):
            return path
    raise OSError(0, f"no directory to stage the new root on (tried {', '.join(STAGING_CANDIDATES)})")


def _makedirs(root: str, path: str) -> str:
    """mkdir -p of path beneath root, every new directory 0755 whatever the umask."""
    current = root
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.path.lexists(current):
            os.mkdir(current)
            os.chmod(current, 0o755)
    return current


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir("/")


def enter_minimal_root(paths: tuple[str, ...], *, zygote_mnt_ns: int, scratch: bool = False) -> str:
    """Replace the root of the calling process's mount namespace by a tmpfs with read-only binds of
    `paths` (at their own absolute paths). Refuses to act in the zygote's mount namespace."""
    if zygote_mnt_ns == -1:
        raise OSError(0, "the zygote's mount namespace is unknown: refusing to pivot_root")
    if ns_inodes(("mnt",))["mnt"] == zygote_mnt_ns:
        unshare(CLONE_NEWNS)
    if ns_inodes(("mnt",))["mnt"] in (-1, zygote_mnt_ns):
        raise OSError(0, "not in a private mount namespace: refusing to pivot_root")
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    reals, links = root_trees(paths)
    # Held open before the staging tmpfs goes up, which may hide a tree (one under /tmp, say).
    sources = {real: os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for real in reals}
    try:
        stage = _staging()
        mount(
            "confide-root",
            stage,
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=64k,nr_inodes=1024,mode=0755",
        )
        for real, fd in sources.items():
            mount(f"/proc/self/fd/{fd}", _makedirs(stage, real), None, MS_BIND | MS_REC, None)
    finally:
        for fd in sources.values():
            os.close(fd)
    for name, real in links.items():
        parent, base = os.path.split(name)
        target = os.path.join(_makedirs(stage, parent) if parent != "/" else stage, base)
        if not os.path.lexists(target):
            os.symlink(real, target)
    if scratch:
        _makedirs(stage, SCRATCH)
    with _cwd(stage):
        syscall(SYS_PIVOT_ROOT, b".", b".", what="pivot_root")
        umount2(".", MNT_DETACH)  # the old root, stacked on the new one by pivot_root(".", ".")
    _seal_mounts()
    return (
        f"tmpfs root with read-only binds of {', '.join(reals)} only (no /proc, /etc, /dev, /sys); "
        "old root detached"
    )


def host_paths_hidden(paths: tuple[str, ...]) -> str | None:
    """Probe: None when no host-only path can even be stat'ed (ENOENT), else what was found.

    Directories above a bound tree (e.g. /root above /root/.pyenv/...) exist, holding only that tree."""
    reals, _ = root_trees(paths)
    found = []
    for path in ("/etc", "/proc", "/dev", "/sys", "/root", "/home", "/var", "/run", "/boot"):
        if any(real.startswith(path + "/") for real in reals):
            continue
        try:
            os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(f"{path}: errno {exc.errno}")
        else:
            found.append(f"{path} exists")
    return "; ".join(found) or None
