"""What the zygote decided at start and hands to every child it forks (never crosses a process boundary
except by fork, so it may hold plain Python objects)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxPlan:
    zygote_pid: int
    zygote_ns: dict[str, int]  # namespace name -> inode of the zygote's namespace
    devnull_fd: int  # the zygote's /dev/null, dup'ed onto the child's stdin
    devnull_rdev: int
    landlock_abi: int
    read_paths: tuple[str, ...]  # Landlock: read-only beneath these, nothing else
    to_nobody: bool  # True: setresuid(65534); False: stay uid 0 without any capability
    uid_reason: str  # why uid 65534 is not used (empty when it is)
    last_cap: int
    disabled: frozenset[str] = frozenset()  # layers switched off by the _disable_layers test hook
    tolerated: frozenset[str] = frozenset()  # layers known missing in a weak (strict=False) sandbox


@dataclass(frozen=True)
class ChildFds:
    """Descriptors of one run as numbered in the zygote (received over SCM_RIGHTS)."""

    payload: int  # sealed memfd: JSON with source, params, names and limits (the zygote never reads it)
    status: int  # write end: the child's one-line JSON status record
    log: int  # write end: becomes the child's stdout and stderr
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    # (read end, write end) of a byte stream to an accelerator process, or () (see zygote.Zygote.run)
    stream: tuple[int, ...] = ()
