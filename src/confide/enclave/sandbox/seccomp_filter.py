"""seccomp-bpf filter of the sandboxed child (libseccomp through pyseccomp).

Default action ALLOW with explicit denials of every way out or up: networking, process creation,
exec, cross-process signals and memory access, writes to the file system, privilege and namespace
changes, kernel attack surface (bpf, io_uring, perf, keyrings, userfaultfd, modules), and the
page-cache probes that would let a run leave or read bits in the cache of files every run shares
(fadvise64, readahead, mincore, cachestat, madvise WILLNEED/COLD/PAGEOUT, preadv2/pwritev2 with
flags such as RWF_NOWAIT). Denied calls
return an errno so the function gets a clean Python exception; a syscall of a foreign ABI (i386
int 0x80, x32) kills the whole process with SIGSYS.

Arguments the kernel reads as 32-bit ints are compared with a 32-bit mask, so garbage in the upper
half of a register cannot slip past a comparison.
"""

from __future__ import annotations

import contextlib
import errno

import pyseccomp

from confide.enclave.sandbox.libc import CLONE_THREAD

_EPERM = pyseccomp.ERRNO(errno.EPERM)
_ENOSYS = pyseccomp.ERRNO(errno.ENOSYS)
_LOW32 = 0xFFFFFFFF

# Newer syscalls libseccomp 2.5.4 cannot name, by x86_64 number.
_FALLBACK_NUMBERS = {
    "memfd_secret": 447,
    "fchmodat2": 452,
    "lsm_set_self_attr": 460,
    "setxattrat": 463,
    "removexattrat": 466,
    "open_tree_attr": 467,
    "file_setattr": 469,
    "cachestat": 451,
}

DENY_EPERM: tuple[str, ...] = (
    # network: no socket of any family, no socket calls (there is no socket fd in the child anyway)
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    # process creation and exec (clone is handled below: threads stay allowed)
    "fork",
    "vfork",
    "execve",
    "execveat",
    # other processes: tracing, memory, pidfds
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    "process_madvise",
    # limits and privileges
    "setrlimit",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "setfsuid",
    "setfsgid",
    "capset",
    "personality",
    "seccomp",
    # namespaces and mounts
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "open_tree_attr",
    # kernel attack surface
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "iopl",
    "ioperm",
    "modify_ldt",
    "uselib",
    "vhangup",
    "name_to_handle_at",
    "open_by_handle_at",
    "fanotify_init",
    "lsm_set_self_attr",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "mbind",
    "migrate_pages",
    "move_pages",
    # file system writes (Landlock already forbids them; this is the second wall)
    "creat",
    "mknod",
    "mknodat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "truncate",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "setxattrat",
    "removexattrat",
    "file_setattr",
    # the page cache of shared files: evict/prefetch (sender) and residency queries (receiver)
    "fadvise64",
    "readahead",
    "mincore",
    "cachestat",
    # anonymous shared memory and SysV/POSIX IPC: no side store, no extra memory outside RLIMIT_AS
    "memfd_create",
    "memfd_secret",
    "shmget",
    "shmat",
    "msgget",
    "semget",
    "mq_open",
)

DENY_ENOSYS: tuple[str, ...] = (
    "clone3",  # flags live in a struct seccomp cannot read; glibc falls back to clone(2)
    "openat2",  # same for the open flags; callers fall back to openat(2)
)

_WRITE_FLAGS = (0o1, 0o2, 0o100, 0o1000)  # O_WRONLY, O_RDWR, O_CREAT, O_TRUNC
_PRCTL_DENY = (
    4,  # PR_SET_DUMPABLE
    22,  # PR_SET_SECCOMP
    28,  # PR_SET_SECUREBITS
    35,  # PR_SET_MM
    0x59616D61,  # PR_SET_PTRACER
)
_IOCTL_DENY = (
    0x5412,  # TIOCSTI
    0x541C,  # TIOCLINUX
    0x8901,  # FIOSETOWN: SIGIO/SIGURG to another process
    0x8902,  # SIOCSPGRP: same
    0x5452,  # FIOASYNC
)
_FCNTL_DENY = (8, 15)  # F_SETOWN, F_SETOWN_EX: SIGIO to another process
# madvise advice that moves file pages in or out of the page cache; malloc's DONTNEED/FREE/HUGEPAGE stay
_MADVISE_DENY = (
    3,  # MADV_WILLNEED: readahead of a file mapping
    20,  # MADV_COLD
    21,  # MADV_PAGEOUT: reclaims the pages
)
# Scheduling of other processes (a covert channel to whatever runs next, or a sibling sandbox):
# the pid/who argument must be 0, i.e. the caller itself.
_SELF_ONLY_ARG0 = ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")


def _number(name: str) -> int | None:
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    if nr >= 0:
        return nr
    return _FALLBACK_NUMBERS.get(name)


def build(own_pid: int) -> pyseccomp.SyscallFilter:
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    f.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    f.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    f.set_attr(pyseccomp.Attr.CTL_NNP, 1)
    with contextlib.suppress(OSError):  # binary tree of syscall numbers (libseccomp >= 2.5)
        f.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)

    def add(action: int, name: str, *args: pyseccomp.Arg) -> None:
        nr = _number(name)
        if nr is not None:
            f.add_rule(action, nr, *args)

    for name in DENY_EPERM:
        add(_EPERM, name)
    for name in DENY_ENOSYS:
        add(_ENOSYS, name)
    # clone(2) only for threads
    add(_EPERM, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_THREAD, 0))
    # signals only to itself (kill(0,..) and kill(-1,..) are denied too)
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        add(_EPERM, name, pyseccomp.Arg(0, pyseccomp.NE, own_pid))
    # no open for writing, creating or truncating
    for flag in _WRITE_FLAGS:
        add(_EPERM, "open", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, flag, flag))
        add(_EPERM, "openat", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, flag, flag))
    # rlimits may be read, never set, and only its own (pid 0): not another process's limits
    add(_EPERM, "prlimit64", pyseccomp.Arg(2, pyseccomp.NE, 0))
    add(
        _EPERM, "prlimit64", pyseccomp.Arg(0, pyseccomp.NE, 0)
    )  # pid: garbage in the upper half is denied too
    for advice in _MADVISE_DENY:
        add(_EPERM, "madvise", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, _LOW32, advice))
    # preadv2/pwritev2 only without flags (RWF_NOWAIT tells whether pages are cached)
    for name in ("preadv2", "pwritev2"):
        add(_EPERM, name, pyseccomp.Arg(5, pyseccomp.NE, 0))
    for option in _PRCTL_DENY:
        add(_EPERM, "prctl", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, _LOW32, option))
    for request in _IOCTL_DENY:
        add(_EPERM, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOW32, request))
    for cmd in _FCNTL_DENY:
        add(_EPERM, "fcntl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOW32, cmd))
    for name in _SELF_ONLY_ARG0:
        add(_EPERM, name, pyseccomp.Arg(0, pyseccomp.NE, 0))
    add(_EPERM, "setpriority", pyseccomp.Arg(0, pyseccomp.NE, 0))  # which: only PRIO_PROCESS
    add(_EPERM, "setpriority", pyseccomp.Arg(1, pyseccomp.NE, 0))  # who: only itself
    add(_EPERM, "ioprio_set", pyseccomp.Arg(0, pyseccomp.NE, 1))  # which: only IOPRIO_WHO_PROCESS
    add(_EPERM, "ioprio_set", pyseccomp.Arg(1, pyseccomp.NE, 0))  # who: only itself
    return f


def load(own_pid: int) -> str:
    """Build and load the filter on every thread of the calling process (TSYNC)."""
    build(own_pid).load()
    return (
        f"filter loaded (default allow; {len(DENY_EPERM) + len(DENY_ENOSYS)} syscalls denied outright; "
        "clone without CLONE_THREAD, signals, SIGIO owners, rlimit reads and scheduling aimed at other "
        "processes, write-opens, rlimit and prctl changes, page-cache probes (fadvise64, readahead, "
        "mincore, cachestat, madvise WILLNEED/COLD/PAGEOUT, preadv2/pwritev2 with flags) denied; "
        "foreign ABIs kill the process)"
    )
