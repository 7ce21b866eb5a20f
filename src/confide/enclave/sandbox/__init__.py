"""Sandbox for untrusted functions (part of the enclave's trusted computing base).

A function written by one party runs on another party's decrypted data in a fresh child of a
zygote process, behind these layers, all applied before its source is compiled: fresh
single-threaded process, every other fd closed, rlimits, not dumpable + no_new_privs, its own pid
namespace (pid 1, at most 300 tasks), private net/ipc/uts/mount namespaces (all mounts read-only,
noatime), a minimal root (tmpfs + read-only binds of the interpreter and library trees, no /proc),
uid 65534 (or uid 0 without any capability where those trees are unreadable to it), Landlock
(read-only interpreter files, no TCP, scoped abstract sockets and signals), and a seccomp-bpf filter
(which also denies the page-cache probes). Its only ways out are its declared outputs, its status and its stdout/stderr
(both returned to the enclave, which treats them as confidential).

The zygote is a fresh interpreter (fork + exec) that never sees inputs, params or source; every
layer is verified by behaviour in a probe child when it starts (Zygote.layers).

Imports only the standard library, pyseccomp and confide.enclave.errors.
"""

from confide.enclave.sandbox.api import CATEGORIES, LAYER_NAMES, OutputSink, RunResult, SandboxLimits
from confide.enclave.sandbox.bench import bench_child_start
from confide.enclave.sandbox.context import Context
from confide.enclave.sandbox.memfd import make_input_memfd
from confide.enclave.sandbox.zygote import Zygote

__all__ = [
    "CATEGORIES",
    "LAYER_NAMES",
    "Context",
    "OutputSink",
    "RunResult",
    "SandboxLimits",
    "Zygote",
    "bench_child_start",
    "make_input_memfd",
]
