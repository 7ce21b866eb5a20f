"""Checks, run inside the probe child, that each layer really took effect.

Each check tests behaviour, not our own bookkeeping: it reads the kernel's view (/proc/self/status
through a descriptor opened before Landlock, prctl, getrlimit, namespace inodes) or tries the thing
the layer forbids and looks at the errno. Checks that could be satisfied by a later layer run
before that layer is applied (Landlock is tested before seccomp, whose EPERM would mask it).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import socket
import threading

from confide.enclave.sandbox import namespaces, rlimits
from confide.enclave.sandbox.libc import (
    PR_GET_DUMPABLE,
    PR_GET_NO_NEW_PRIVS,
    PR_GET_SECUREBITS,
    PR_SET_PDEATHSIG,
    close_range,
    mount,
    prctl,
    syscall,
)
from confide.enclave.sandbox.plan import SandboxPlan
from confide.enclave.sandbox.privileges import NOBODY, SECUREBITS, capability_sets

_SCAN_FDS = 4096


def _blocked(call: object, *, expect: tuple[int, ...]) -> tuple[bool, str]:
    """Run call(); (True, errno name) when it raised OSError with an expected errno."""
    try:
        call()  # type: ignore[operator]
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return (exc.errno in expect), name
    return False, "succeeded"


def _setrlimit_core_zero() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except ValueError as exc:  # CPython turns EPERM from setrlimit into ValueError
        raise PermissionError(errno.EPERM, str(exc)) from None


class Probe:
    def __init__(self, plan: SandboxPlan) -> None:
        self.plan = plan
        self.status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        # the minimal root has no /proc: namespace identities are read through this descriptor
        self.ns_fd = os.open("/proc/self/ns", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.read_target = "/etc/passwd"  # a file outside the Landlock trees (replaced by a scratch file)
        self.scope_server: socket.socket | None = None
        self.scope_name = ""
        self.target_pid = 0
        self.target_pipe = -1
        self.landlock: dict[str, str] = {}
        self.scratch_writable = False

    def extra_fds(self) -> set[int]:
        fds = {self.status_fd, self.ns_fd}
        if self.scope_server is not None:
            fds.add(self.scope_server.fileno())
        if self.target_pipe >= 0:
            fds.add(self.target_pipe)
        return fds

    def status(self) -> dict[str, str]:
        text = os.pread(self.status_fd, 16384, 0).decode()
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def status_text(self) -> str:
        return os.pread(self.status_fd, 16384, 0).decode()

    # -- fresh-process ------------------------------------------------------------------------
    def check_fresh(self) -> str | None:
        st = self.status()  # the host's procfs: host pids, even in the child's own pid namespace
        if st.get("Pid") == str(self.plan.zygote_pid) or st.get("PPid") != str(self.plan.zygote_pid):
            return "not a direct child of the zygote"
        if st.get("Threads") != "1":
            return f"child has {st.get('Threads')} threads"
        return None

    # -- a writable scratch file system, so Landlock's write denials are not masked by EROFS -----
    def prepare_fs_target(self) -> None:
        """Mount a tmpfs on /tmp, only inside the probe's own mount namespace (never the host's)."""
        if namespaces.ns_inodes(("mnt",), dir_fd=self.ns_fd)["mnt"] in (-1, self.plan.zygote_ns.get("mnt")):
            return
        mount("tmpfs", "/tmp", "tmpfs", 0x2 | 0x4, "size=64k,mode=0777")  # MS_NOSUID | MS_NODEV
        self.scratch_writable = True
        self.read_target = f"/tmp/confide-landlock-read-{os.getpid()}"
        os.close(os.open(self.read_target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        os.chmod(
            self.read_target, 0o644
        )  # world-readable (empty: RLIMIT_FSIZE is 0): only Landlock refuses it

    # -- targets outside the Landlock domain, created before it -------------------------------
    def prepare_scope_targets(self) -> None:
        """An abstract unix socket and a process, both outside the domain about to be created."""
        self.scope_name = f"\0confide-scope-probe-{os.getpid()}"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.scope_name)
        server.listen(1)
        self.scope_server = server
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the target: waits for EOF, then exits
            try:
                prctl(PR_SET_PDEATHSIG, 9)
                os.dup2(r, 3)
                close_range(4)
                os.read(3, 1)
            finally:
                os._exit(0)
        os.close(r)
        self.target_pid = pid
        self.target_pipe = w

    def release_scope_targets(self) -> None:
        if self.scope_server is not None:
            self.scope_server.close()
            self.scope_server = None
        if self.target_pipe >= 0:
            os.close(self.target_pipe)
            self.target_pipe = -1
            os.waitpid(self.target_pid, 0)

    # -- Landlock (before seccomp) ------------------------------------------------------------
    def check_landlock(self) -> None:
        scratch = f"/tmp/confide-landlock-probe-{os.getpid()}"
        fs_problems = []
        for what, call, expect in (
            (
                "read a file outside the allowed trees",
                lambda: open(self.read_target, "rb").close(),
                (errno.EACCES,),
            ),
            ("list /tmp", lambda: os.listdir("/tmp"), (errno.EACCES,)),
            ("mkdir in a writable /tmp", lambda: os.mkdir(scratch), (errno.EACCES,)),
            ("create a file in a writable /tmp", lambda: open(scratch + ".f", "xb").close(), (errno.EACCES,)),
            # the stdlib's mount is read-only too, so EROFS may come first
            (
                "open the stdlib for writing",
                lambda: os.close(os.open(os.__file__, os.O_WRONLY)),
                (errno.EACCES, errno.EROFS),
            ),
        ):
            ok, got = _blocked(call, expect=expect)
            if not ok:
                fs_problems.append(f"{what}: {got}")
        if os.path.isdir(scratch):  # only when Landlock is missing
            os.rmdir(scratch)
        if os.path.exists(scratch + ".f"):
            os.unlink(scratch + ".f")
        try:
            with open(os.__file__, "rb") as f:
                f.read(1)
        except OSError as exc:
            fs_problems.append(f"the standard library became unreadable: {exc}")
        self.landlock["landlock-fs"] = (
            "; ".join(fs_problems)
            if fs_problems
            else "verified: reading a world-readable file outside the trees, listing /tmp, mkdir and file creation in a writable tmpfs "
            "→ EACCES; stdlib still readable"
        )

        net_problems = []

        def bind() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))

        def connect() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.connect(("127.0.0.1", 9))

        for what, call in (("TCP bind", bind), ("TCP connect", connect)):
            ok, got = _blocked(call, expect=(errno.EACCES,))
            if not ok:
                net_problems.append(f"{what}: {got}")
        self.landlock["landlock-net"] = (
            "; ".join(net_problems) if net_problems else "verified: TCP bind and connect → EACCES"
        )

        scope_problems = []

        def abstract_connect() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.scope_name)

        ok, got = _blocked(abstract_connect, expect=(errno.EPERM,))
        if not ok:
            scope_problems.append(f"abstract unix connect outside the domain: {got}")
        ok, got = _blocked(lambda: os.kill(self.target_pid, 0), expect=(errno.EPERM,))
        if not ok:
            scope_problems.append(f"signal to a same-uid process outside the domain: {got}")
        self.landlock["landlock-scope"] = (
            "; ".join(scope_problems)
            if scope_problems
            else "verified: abstract unix connect and signal outside the domain → EPERM"
        )

    def landlock_problem(self, layer: str) -> str | None:
        text = self.landlock.get(layer, "not checked")
        return None if text.startswith("verified") else text

    # -- after every layer --------------------------------------------------------------------
    def check_rlimits(self, limits: dict[int, tuple[int, int]]) -> str | None:
        bad = rlimits.mismatches(limits)
        return "; ".join(bad) if bad else None

    def check_not_dumpable(self) -> str | None:
        problems = []
        if prctl(PR_GET_DUMPABLE) != 0:
            problems.append("PR_GET_DUMPABLE != 0")
        if prctl(PR_GET_NO_NEW_PRIVS) != 1:
            problems.append("no_new_privs not set")
        return "; ".join(problems) or None

    def check_namespaces(self) -> str | None:
        now = namespaces.ns_inodes(dir_fd=self.ns_fd)
        same = [name for name, ino in now.items() if ino == -1 or ino == self.plan.zygote_ns.get(name)]
        if same:
            return f"still in the zygote's namespace(s): {', '.join(same)}"
        if os.uname().nodename != namespaces.HOSTNAME.decode():
            return "hostname unchanged"
        if not namespaces.mounts_read_only():
            return "/ is not mounted read-only and noatime in the child's mount namespace"
        return None

    def check_pid_namespace(self) -> str | None:
        if os.getpid() != 1:
            return f"getpid() is {os.getpid()}, not 1: not the first process of its own pid namespace"
        if namespaces.ns_inodes(("pid",), dir_fd=self.ns_fd)["pid"] in (-1, self.plan.zygote_ns.get("pid")):
            return "still in the zygote's pid namespace"
        started = _startable_threads(namespaces.PID_MAX + 50)
        if started >= namespaces.PID_MAX - 1:
            return f"{started} threads started: thread creation is not bounded below {namespaces.PID_MAX - 1}"
        return None

    def check_minimal_root(self) -> str | None:
        found = namespaces.host_paths_hidden(self.plan.read_paths)
        if found:
            return f"host paths visible: {found}"
        try:
            with open(os.__file__, "rb") as f:
                f.read(1)
        except OSError as exc:
            return f"the standard library is not in the minimal root: {exc}"
        return None

    def check_uid(self) -> str | None:
        text = self.status_text()
        caps = capability_sets(text)
        nonzero = [f"{k}={v:x}" for k, v in caps.items() if v]
        if len(caps) != 5:
            return "capability sets missing from /proc/self/status"
        if nonzero:
            return f"capabilities left: {', '.join(nonzero)}"
        bits = prctl(PR_GET_SECUREBITS)
        if bits & SECUREBITS != SECUREBITS:
            return f"securebits {bits:#x} lack {SECUREBITS:#x}"
        if self.plan.to_nobody and (set(os.getresuid()) != {NOBODY} or set(os.getresgid()) != {NOBODY}):
            return f"uids {os.getresuid()} gids {os.getresgid()} are not {NOBODY}"
        return None

    def check_seccomp(self) -> str | None:
        st = self.status()
        if st.get("Seccomp") != "2":
            return f"Seccomp mode is {st.get('Seccomp')!r}, not 2 (filter)"
        problems = []
        probes = (
            ("socket(AF_UNIX)", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
            ("socket(AF_INET)", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
            ("socketpair", lambda: socket.socketpair()),
            # nonexistent paths: without the filter these fail with ENOENT instead of doing anything
            ("execve", lambda: os.execv("/nonexistent/confide-probe", ["x"])),
            ("open O_WRONLY", lambda: os.open("/nonexistent/confide-probe", os.O_WRONLY)),
            ("signal the zygote", lambda: os.kill(self.plan.zygote_pid, 0)),
            ("setrlimit", _setrlimit_core_zero),
            (
                "prlimit64(zygote) read",
                lambda: resource.prlimit(self.plan.zygote_pid, resource.RLIMIT_NOFILE),
            ),
            *_page_cache_probes(),
        )
        for what, call in probes:
            ok, got = _blocked(call, expect=(errno.EPERM,))
            if not ok:
                problems.append(f"{what}: {got}")
        try:
            pid = os.fork()
        except OSError as exc:
            if exc.errno != errno.EPERM:
                problems.append(f"fork: {errno.errorcode.get(exc.errno or 0)}")
        else:
            if pid == 0:  # pragma: no cover - only without the filter
                os._exit(0)
            os.waitpid(pid, 0)
            problems.append("fork: succeeded")
        return "; ".join(problems) or None

    def check_fds(self, expected: set[int], read_only: tuple[int, ...]) -> str | None:
        self.release_scope_targets()
        os.close(self.status_fd)
        self.status_fd = -1
        os.close(self.ns_fd)
        self.ns_fd = -1
        open_fds = set()
        for fd in range(_SCAN_FDS):
            try:
                os.fstat(fd)
            except OSError:
                continue
            open_fds.add(fd)
        problems = []
        if open_fds != expected:
            problems.append(f"open fds {sorted(open_fds)} != expected {sorted(expected)}")
        if os.fstat(0).st_rdev != self.plan.devnull_rdev:
            problems.append("stdin is not /dev/null")
        for fd in read_only:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                problems.append(f"input fd {fd} is not read-only")
        return "; ".join(problems) or None


def _startable_threads(limit: int) -> int:
    """How many threads (64 KiB stacks) the process can start at once, trying at most `limit`."""
    stop = threading.Event()
    started: list[threading.Thread] = []
    old = threading.stack_size(64 * 1024)
    try:
        for _ in range(limit):
            thread = threading.Thread(target=stop.wait)
            try:
                thread.start()
            except RuntimeError:
                break
            started.append(thread)
    finally:
        stop.set()
        for thread in started:
            thread.join()
        threading.stack_size(old)
    return len(started)


_SYS_READAHEAD = 187
_SYS_MINCORE = 27
_SYS_MADVISE = 28
_SYS_CACHESTAT = 451
_MADV_WILLNEED = 3


def _page_cache_probes() -> list[tuple[str, object]]:
    """Calls that evict, prefetch or reveal pages of a file every run shares (the stdlib's os.py)."""

    def on_stdlib(call: object) -> object:
        def run() -> None:
            fd = os.open(os.__file__, os.O_RDONLY | os.O_CLOEXEC)
            try:
                call(fd)  # type: ignore[operator]
            finally:
                os.close(fd)

        return run

    def on_mapping(nr: int, *extra: object) -> object:
        def run(fd: int) -> None:
            with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                anchor = ctypes.c_char.from_buffer(m)
                try:
                    addr = ctypes.c_void_p(ctypes.addressof(anchor))
                    syscall(nr, addr, ctypes.c_size_t(mmap.PAGESIZE), *extra, what=f"syscall {nr}")
                finally:
                    del anchor

        return on_stdlib(run)

    vec = (ctypes.c_ubyte * 1)()
    crange = (ctypes.c_uint64 * 2)(0, 0)
    cstat = (ctypes.c_uint64 * 5)()
    return [
        ("fadvise64(DONTNEED)", on_stdlib(lambda fd: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))),
        (
            "readahead",
            on_stdlib(lambda fd: syscall(_SYS_READAHEAD, fd, ctypes.c_long(0), ctypes.c_size_t(4096))),
        ),
        ("mincore", on_mapping(_SYS_MINCORE, ctypes.byref(vec))),
        ("madvise(WILLNEED)", on_mapping(_SYS_MADVISE, ctypes.c_int(_MADV_WILLNEED))),
        (
            "cachestat",
            on_stdlib(lambda fd: syscall(_SYS_CACHESTAT, fd, ctypes.byref(crange), ctypes.byref(cstat), 0)),
        ),
        ("preadv2(RWF_NOWAIT)", on_stdlib(lambda fd: os.preadv(fd, [bytearray(64)], 0, os.RWF_NOWAIT))),
    ]
