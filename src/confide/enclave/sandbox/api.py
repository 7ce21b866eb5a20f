"""Public value types of the sandbox: limits, results, output sinks, and the fixed vocabularies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# Layer names, in the order the child applies them.
LAYER_NAMES: tuple[str, ...] = (
    "fresh-process",
    "fds-closed",
    "rlimits",
    "not-dumpable",
    "pid-namespace",
    "namespaces",
    "minimal-root",
    "uid",
    "landlock-fs",
    "landlock-net",
    "landlock-scope",
    "seccomp",
)

# Result categories: a fixed vocabulary that is safe to show an untrusted host.
CATEGORIES: tuple[str, ...] = (
    "ok",
    "exception",
    "cpu-limit",
    "memory-limit",
    "wall-timeout",
    "output-limit",
    "sandbox-violation",
    "crashed",
)

DETAIL_CAP = 64 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    memory_bytes: int = 512 * 2**20  # data allowance on top of the child's address space at fork
    cpu_seconds: int = 30  # RLIMIT_CPU (SIGKILL at the limit)
    wall_seconds: float = 60.0  # SIGKILL after this
    max_output_bytes: int = 256 * 2**20  # per declared output
    max_open_files: int = 64  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.cpu_seconds <= 0 or self.wall_seconds <= 0:
            raise ValueError("sandbox limits must be positive")
        if self.max_output_bytes < 0 or self.max_open_files < 8:
            raise ValueError("max_output_bytes must be >= 0 and max_open_files >= 8")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run.

    ``category`` is from :data:`CATEGORIES` and may be shown to the host. ``detail`` is text produced
    inside the child (traceback, stdout/stderr) and is CONFIDENTIAL: it may carry the data.
    """

    ok: bool
    category: str
    detail: str
    exit_code: int | None
    signal: int | None
    duration_s: float
    output_sizes: dict[str, int] = field(default_factory=dict)


class OutputSink(Protocol):
    """Receives a declared output as it streams out of the child (in the caller's process)."""

    def write(self, data: bytes) -> None: ...
