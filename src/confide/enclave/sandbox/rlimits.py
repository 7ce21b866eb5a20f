"""The rlimits layer: address space, CPU time, open files, no file writes, no core dumps."""

from __future__ import annotations

import resource

# RLIMIT_NPROC is not set (the child keeps the zygote's): it counts every process of the real uid on
# the host (and is not enforced for uid 0), so with uid 65534 one run's threads would block another's,
# a covert channel and a denial of service between concurrent runs. The pid-namespace layer bounds
# each run's tasks on its own, whatever the uid (namespaces.PID_MAX).


def read_vm_size() -> int:
    """VmSize of the calling process in bytes."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmSize missing from /proc/self/status")


def plan(
    *, vm_size: int, memory_bytes: int, cpu_seconds: int, max_open_files: int
) -> dict[int, tuple[int, int]]:
    address_space = vm_size + memory_bytes
    return {
        resource.RLIMIT_AS: (address_space, address_space),
        # soft = hard: SIGKILL at the limit. The child is pid 1 of its own pid namespace, and the
        # kernel never delivers a default-action SIGXCPU to a namespace's init.
        resource.RLIMIT_CPU: (cpu_seconds, cpu_seconds),
        resource.RLIMIT_NOFILE: (max_open_files, max_open_files),
        resource.RLIMIT_FSIZE: (0, 0),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
        resource.RLIMIT_MSGQUEUE: (0, 0),
    }


def apply(limits: dict[int, tuple[int, int]]) -> str:
    for which, (soft, hard) in limits.items():
        resource.setrlimit(which, (soft, hard))
    with open("/proc/self/oom_score_adj", "w") as f:  # the child, not the zygote, goes first on OOM
        f.write("1000")
    address_space = limits[resource.RLIMIT_AS][0]
    cpu = limits[resource.RLIMIT_CPU][0]
    nofile = limits[resource.RLIMIT_NOFILE][0]
    return f"AS {address_space // 2**20} MiB, CPU {cpu} s, NOFILE {nofile}, FSIZE 0, CORE 0, NPROC not set (tasks bounded by the pid namespace); oom_score_adj 1000"


def mismatches(limits: dict[int, tuple[int, int]]) -> list[str]:
    return [
        f"limit {which}: {resource.getrlimit(which)} != {want}"
        for which, want in limits.items()
        if resource.getrlimit(which) != want
    ]
