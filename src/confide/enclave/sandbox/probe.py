"""Checks, run inside the probe child, that each layer really took effect.

Each check tests behaviour, not our own bookkeeping: it reads the kernel's view (/proc/self/status
through a descriptor opened before Landlock, prctl, getrlimit, namespace inodes) or tries the thing
the layer forbids and looks at the errno. Checks that could be satisfied by a later layer run
before that layer is applied (Landlock is tested before seccomp, whose EPERM would mask it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket

from confide.enclave.sandbox import namespaces, rlimits
from confide.enclave.sandbox.libc import (
    PR_GET_DUMPABLE,
    PR_GET_NO_NEW_PRIVS,
    PR_GET_SECUREBITS,
    PR_SET_PDEATHSIG,
    close_range,
    mount,
    prctl,
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
        self.scope_server: socket.socket | None = None
        self.scope_name = ""
        self.target_pid = 0
        self.target_pipe = -1
        self.landlock: dict[str, str] = {}
        self.scratch_writable = False

    def extra_fds(self) -> set[int]:
        fds = {self.status_fd}
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
        st = self.status()
        if os.getpid() == self.plan.zygote_pid or os.getppid() != self.plan.zygote_pid:
            return "not a direct child of the zygote"
        if st.get("Threads") != "1":
            return f"child has {st.get('Threads')} threads"
        return None

    # -- a writable scratch file system, so Landlock's write denials are not masked by EROFS -----
    def prepare_fs_target(self) -> None:
        """Mount a tmpfs on /tmp, only inside the probe's own mount namespace (never the host's)."""
        if namespaces.ns_inodes()["mnt"] in (-1, self.plan.zygote_ns.get("mnt")):
            return
        mount("tmpfs", "/tmp", "tmpfs", 0x2 | 0x4, "size=64k,mode=0777")  # MS_NOSUID | MS_NODEV
        self.scratch_writable = True

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
            ("read /etc/passwd", lambda: open("/etc/passwd", "rb").close(), (errno.EACCES,)),
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
            else "verified: reading /etc/passwd, listing /tmp, mkdir and file creation in a writable tmpfs "
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
        now = namespaces.ns_inodes()
        same = [name for name, ino in now.items() if ino == -1 or ino == self.plan.zygote_ns.get(name)]
        if same:
            return f"still in the zygote's namespace(s): {', '.join(same)}"
        if os.uname().nodename != namespaces.HOSTNAME.decode():
            return "hostname unchanged"
        if not namespaces.mounts_read_only():
            return "/ is not mounted read-only and noatime in the child's mount namespace"
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
