"""Applies the sandbox layers in the child, in order, before any untrusted code is compiled:

fresh-process → fds-closed → rlimits (+ no_new_privs) → not-dumpable → pid-namespace → namespaces →
minimal-root → uid → landlock-fs / landlock-net / landlock-scope (one ruleset) → seccomp.

The pid namespace itself is made by the zygote's fork (namespaces.fork_child); the layer here checks
it and bounds it.

In a run, a layer that fails aborts the run unless it was already reported missing by a weak
(strict=False) zygote. In the probe, every outcome is recorded and then checked by behaviour.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

from confide.enclave.sandbox import landlock, namespaces, privileges, rlimits, seccomp_filter
from confide.enclave.sandbox.api import LAYER_NAMES
from confide.enclave.sandbox.libc import (
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    close_range,
    prctl,
)
from confide.enclave.sandbox.plan import SandboxPlan
from confide.enclave.sandbox.probe import Probe

DISABLED = "disabled by the _disable_layers test hook"
LANDLOCK_LAYERS = ("landlock-fs", "landlock-net", "landlock-scope")
LANDLOCK_MIN_ABI = {"landlock-fs": 1, "landlock-net": 4, "landlock-scope": 6}


VERIFIED = {
    "fresh-process": "verified: parent is the zygote, 1 thread",
    "fds-closed": "verified: fstat of fds 0-4095 finds only these, inputs O_RDONLY",
    "rlimits": "verified: getrlimit matches",
    "not-dumpable": "verified: PR_GET_DUMPABLE 0, PR_GET_NO_NEW_PRIVS 1",
    "namespaces": "verified: /proc/self/ns/{net,ipc,uts,mnt} differ from the zygote's, hostname changed, "
    "/ read-only+noatime",
    "pid-namespace": "verified: getpid() 1, /proc/self/ns/pid differs from the zygote's, starting threads "
    "stops below the bound",
    "minimal-root": "verified: stat of /etc, /proc, /dev, /sys, /var, /run, /boot (and /root, /home unless "
    "above a bound tree) → ENOENT; stdlib readable",
    "uid": "verified: Cap{Inh,Prm,Eff,Bnd,Amb} all 0 and securebits locked",
    "seccomp": "verified: Seccomp 2; socket, socketpair, execve, write-open, kill(zygote), setrlimit, "
    "fork, prlimit64(zygote) read, fadvise64, readahead, mincore, cachestat, madvise(WILLNEED), "
    "preadv2(RWF_NOWAIT) → EPERM",
}


class LayerFailed(Exception):
    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"sandbox layer {layer} could not be applied: {reason}")
        self.layer = layer


class LayerRun:
    """Applies layers one by one and remembers what each one did."""

    def __init__(self, plan: SandboxPlan, probe: Probe | None) -> None:
        self.plan = plan
        self.probe = probe
        self.applied: dict[str, str] = {}

    def enabled(self, name: str) -> bool:
        return name not in self.plan.disabled

    def apply(self, name: str, fn: Callable[[], str]) -> None:
        if not self.enabled(name):
            self.applied[name] = f"MISSING: {DISABLED}"
            return
        try:
            self.applied[name] = "ok: " + fn()
        except Exception as exc:
            self.fail(name, f"{type(exc).__name__}: {exc}")

    def fail(self, name: str, reason: str) -> None:
        self.applied[name] = f"MISSING: {reason}"
        if self.probe is None and name not in self.plan.tolerated:
            raise LayerFailed(name, reason)


def host_ppid() -> int:
    """The parent's pid as the host sees it (/proc/self/status of the host's procfs, read before the
    minimal root hides /proc); -1 when unreadable."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def close_all_but(keep: set[int]) -> None:
    prev = -1
    for fd in sorted(keep):
        if fd > prev + 1:
            close_range(prev + 1, fd - 1)
        prev = fd
    close_range(prev + 1)


def reopen_read_only(fd: int) -> int:
    """A fresh read-only open file description of an input (own offset, cannot be written)."""
    try:
        new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            raise
        return fd
    os.close(fd)
    return new


def apply_all(
    plan: SandboxPlan,
    *,
    status_fd: int,
    log_fd: int,
    input_fds: tuple[int, ...],
    output_fds: tuple[int, ...],
    limits: dict[str, int],
    probe: Probe | None,
    stream_fds: tuple[int, ...] = (),
) -> tuple[LayerRun, tuple[int, ...], dict[int, tuple[int, int]]]:
    """Apply every layer to the calling (freshly forked, single-threaded) process.

    Returns the layer bookkeeping, the input fds as reopened read-only, and the rlimits set."""
    run = LayerRun(plan, probe)
    prctl(PR_SET_PDEATHSIG, 9)  # die with the zygote
    if host_ppid() != plan.zygote_pid:  # getppid() is 0 in the child's own pid namespace
        raise LayerFailed("fresh-process", "the zygote is gone")
    run.applied["fresh-process"] = (
        f"ok: forked from the zygote (pid {plan.zygote_pid}, single-threaded, holds no secrets)"
    )

    # fds-closed: stdin from /dev/null, stdout/stderr into the capped log pipe, inputs read-only
    os.dup2(plan.devnull_fd, 0, inheritable=False)
    os.dup2(log_fd, 1, inheritable=False)
    os.dup2(log_fd, 2, inheritable=False)
    inputs = tuple(reopen_read_only(fd) for fd in input_fds)
    keep = {0, 1, 2, status_fd, *inputs, *output_fds, *stream_fds}
    if probe is not None:
        keep |= probe.extra_fds()

    def close_fds() -> str:
        close_all_but(keep)
        return (
            f"stdin /dev/null, stdout+stderr to the log pipe, status pipe, {len(inputs)} input(s) "
            f"reopened read-only, {len(output_fds)} output pipe(s)"
            + (", the accelerator stream's two pipe ends" if stream_fds else "")
            + "; everything else closed"
        )

    run.apply("fds-closed", close_fds)

    limit_table = rlimits.plan(
        vm_size=rlimits.read_vm_size(),
        memory_bytes=limits["memory_bytes"],
        cpu_seconds=limits["cpu_seconds"],
        max_open_files=limits["max_open_files"],
    )
    run.apply("rlimits", lambda: rlimits.apply(limit_table))
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # needed by Landlock and seccomp once capabilities are gone

    def not_dumpable() -> str:
        prctl(PR_SET_DUMPABLE, 0)
        return "PR_SET_DUMPABLE 0, no_new_privs 1"

    run.apply("not-dumpable", not_dumpable)
    # pid_max is written through the host's /proc, before the namespaces layer makes it read-only
    run.apply("pid-namespace", lambda: namespaces.bound_pid_namespace(plan.zygote_ns.get("pid", -1)))
    run.apply("namespaces", namespaces.enter_private)
    run.apply(
        "minimal-root",
        lambda: namespaces.enter_minimal_root(
            plan.read_paths, zygote_mnt_ns=plan.zygote_ns.get("mnt", -1), scratch=probe is not None
        ),
    )
    if probe is not None:
        probe.prepare_fs_target()

    def drop() -> str:
        privileges.drop(to_nobody=plan.to_nobody, last_cap=plan.last_cap)
        if plan.to_nobody:
            return "uid/gid 65534, no supplementary groups, no capabilities, securebits locked"
        return (
            f"uid 0 without capabilities ({plan.uid_reason}); effective, permitted, inheritable, "
            "ambient and bounding sets empty; securebits NOROOT|NO_SETUID_FIXUP (+locks)"
        )

    run.apply("uid", drop)

    if probe is not None:
        probe.prepare_scope_targets()
    wanted = {name: run.enabled(name) for name in LANDLOCK_LAYERS}
    for name, on in wanted.items():
        if not on:
            run.applied[name] = f"MISSING: {DISABLED}"
        elif plan.landlock_abi < LANDLOCK_MIN_ABI[name]:
            wanted[name] = False  # a weak sandbox still gets the Landlock parts the kernel has
            run.fail(
                name,
                f"Landlock ABI {plan.landlock_abi} of this kernel lacks it "
                f"(needs ABI {LANDLOCK_MIN_ABI[name]})",
            )
    if any(wanted.values()):
        try:
            summary = landlock.restrict(
                plan.landlock_abi,
                plan.read_paths,
                fs=wanted["landlock-fs"],
                net=wanted["landlock-net"],
                scope=wanted["landlock-scope"],
            )
        except Exception as exc:
            for name, on in wanted.items():
                if on:
                    run.fail(name, f"{type(exc).__name__}: {exc}")
        else:
            if wanted["landlock-fs"]:
                run.applied["landlock-fs"] = f"ok: {summary}"
            if wanted["landlock-net"]:
                run.applied["landlock-net"] = "ok: TCP bind/connect handled with no allowed port"
            if wanted["landlock-scope"]:
                run.applied["landlock-scope"] = "ok: abstract unix sockets and signals scoped to the domain"
    if probe is not None:
        probe.check_landlock()

    run.apply("seccomp", lambda: seccomp_filter.load(os.getpid()))
    return run, inputs, limit_table


def verify(
    run: LayerRun,
    probe: Probe,
    *,
    expected_fds: set[int],
    read_only: tuple[int, ...],
    limit_table: dict[int, tuple[int, int]],
    fresh_problem: str | None,
) -> dict[str, str]:
    """Probe only: check every layer by behaviour and produce the layer report."""
    problems: dict[str, str | None] = {
        "fresh-process": fresh_problem,
        "rlimits": probe.check_rlimits(limit_table),
        "not-dumpable": probe.check_not_dumpable(),
        "namespaces": probe.check_namespaces(),
        "pid-namespace": probe.check_pid_namespace(),
        "minimal-root": probe.check_minimal_root(),
        "uid": probe.check_uid(),
        "landlock-fs": probe.landlock_problem("landlock-fs"),
        "landlock-net": probe.landlock_problem("landlock-net"),
        "landlock-scope": probe.landlock_problem("landlock-scope"),
        "seccomp": probe.check_seccomp(),
    }
    problems["fds-closed"] = probe.check_fds(expected_fds, read_only)  # last: closes the probe's own fds
    report: dict[str, str] = {}
    for name in LAYER_NAMES:
        applied = run.applied.get(name, "MISSING: not applied")
        problem = problems.get(name)
        if applied.startswith("MISSING"):
            if applied.endswith(DISABLED) and problem:
                applied = f"MISSING: {problem} ({DISABLED})"
            report[name] = applied
        elif problem:
            report[name] = f"MISSING: applied but not in effect: {problem}"
        else:
            verified = probe.landlock.get(name, "") if name in LANDLOCK_LAYERS else VERIFIED.get(name, "")
            report[name] = applied + (f"; {verified}" if verified else "")
    return report
