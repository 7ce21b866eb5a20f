"""The uid layer: become uid/gid 65534 when it can still read the interpreter, otherwise stay uid 0
with every capability gone for good (all sets, bounding set, ambient set, securebits locked).

Readability is judged inside the minimal root the child will get (namespaces.enter_minimal_root):
its directories above the bound trees are 0755, so an interpreter under a 0700 home (/root/.pyenv)
is reachable by uid 65534 there as long as its own tree is world-readable."""

from __future__ import annotations

import errno
import os

from confide.enclave.sandbox import namespaces
from confide.enclave.sandbox.libc import (
    CLONE_NEWNS,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_SECUREBITS,
    SECBIT_KEEP_CAPS_LOCKED,
    SECBIT_NO_CAP_AMBIENT_RAISE,
    SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
    SECBIT_NO_SETUID_FIXUP,
    SECBIT_NO_SETUID_FIXUP_LOCKED,
    SECBIT_NOROOT,
    SECBIT_NOROOT_LOCKED,
    capset_empty,
    prctl,
    unshare,
)

NOBODY = 65534
SECUREBITS = (
    SECBIT_NOROOT
    | SECBIT_NOROOT_LOCKED
    | SECBIT_NO_SETUID_FIXUP
    | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_KEEP_CAPS_LOCKED
    | SECBIT_NO_CAP_AMBIENT_RAISE
    | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 63


def first_unreadable_by_nobody(
    paths: list[str], *, minimal_root: tuple[str, ...] | None = None
) -> str | None:
    """Fork, become 65534, and return the first path it cannot read (None when all are readable).

    minimal_root: judge inside a minimal root of these trees (in the checker's own mount namespace),
    as the child will see them. Called once by the zygote at start; an unreadable interpreter means
    the child must stay uid 0."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked checker
        code = 0
        try:
            os.close(r)
            if minimal_root is not None:  # in a mount namespace of the checker's own
                before = namespaces.ns_inodes(("mnt",))["mnt"]
                unshare(CLONE_NEWNS)
                namespaces.enter_minimal_root(minimal_root, zygote_mnt_ns=before)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            for path in paths:
                want = os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
                if not os.access(path, want, effective_ids=False):
                    os.write(w, path.encode()[:4000])
                    break
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "<the uid 65534 check itself failed>"
    return b"".join(chunks).decode() or None


def drop(*, to_nobody: bool, last_cap: int) -> None:
    """Drop privileges irreversibly (needs CAP_SETPCAP, CAP_SETUID, CAP_SETGID on entry)."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last_cap + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL and cap > 0:  # past the kernel's last capability
                break
            raise
    prctl(PR_SET_SECUREBITS, SECUREBITS)
    if to_nobody:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    capset_empty()


def capability_sets(status_text: str) -> dict[str, int]:
    caps: dict[str, int] = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in CAP_FIELDS:
            caps[key] = int(value.strip(), 16)
    return caps
