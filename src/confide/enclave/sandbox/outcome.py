"""Turns what the enclave observed about a finished child into a RunResult.

The exit status and the kills the zygote or the enclave performed decide the category; the child's
status line (which the function could have forged) only refines "exception" vs "memory-limit" and
supplies the detail text.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from confide.enclave.sandbox.api import DETAIL_CAP, RunResult
from confide.enclave.sandbox.exitcodes import EXIT_EXCEPTION, EXIT_OK, EXIT_SETUP_FAILED

LOG_CAP = 32 * 1024
# RLIMIT_CPU kills with SIGKILL at the limit (rlimits.py); the CPU time wait4 reports for the child
# was measured up to 6% short of a 1 s limit, so a SIGKILL within max(0.25 s, 10%) of it is the limit's.
CPU_SLACK_S = 0.25
STATUS_CAP = 512 * 1024


@dataclass
class Observed:
    wait_status: int | None = None
    duration_s: float = 0.0
    cpu_s: float = 0.0
    wall_timeout: bool = False
    output_limit: str | None = None  # name of the output that went over the cap
    zygote_error: str | None = None
    status_bytes: bytes = b""
    log_bytes: bytes = b""
    log_dropped: int = 0
    output_sizes: dict[str, int] = field(default_factory=dict)


def parse_status(data: bytes) -> dict[str, Any] | None:
    """The last line of the status pipe that is a JSON object with an "outcome"."""
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("outcome"), str):
            return record
    return None


def _cap(text: str) -> str:
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= DETAIL_CAP:
        return text
    return data[: DETAIL_CAP - 20].decode("utf-8", "ignore") + "\n[... truncated]"


def classify(obs: Observed, *, cpu_seconds: int, max_output_bytes: int) -> RunResult:
    exit_code: int | None = None
    sig: int | None = None
    if obs.wait_status is not None:
        if os.WIFSIGNALED(obs.wait_status):
            sig = os.WTERMSIG(obs.wait_status)
        elif os.WIFEXITED(obs.wait_status):
            exit_code = os.WEXITSTATUS(obs.wait_status)
    record = parse_status(obs.status_bytes) or {}
    outcome = record.get("outcome")
    reason = str(record.get("detail", ""))

    if obs.zygote_error is not None:
        category, reason = "crashed", f"the zygote could not run the function: {obs.zygote_error}"
    elif obs.output_limit is not None:
        category = "output-limit"
        reason = f"output {obs.output_limit!r} exceeded {max_output_bytes} bytes; the child was killed"
    elif obs.wall_timeout:
        category, reason = "wall-timeout", "wall-clock limit reached; the child was killed"
    elif sig == signal.SIGSYS:
        category, reason = "sandbox-violation", "killed by seccomp (SIGSYS): a forbidden system call ABI"
    elif sig == signal.SIGXCPU or (
        sig == signal.SIGKILL and obs.cpu_s >= cpu_seconds - max(CPU_SLACK_S, 0.1 * cpu_seconds)
    ):
        category, reason = "cpu-limit", f"CPU time limit of {cpu_seconds} s reached"
    elif sig is not None:
        category = "crashed"
        reason = f"killed by signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig}"
    elif exit_code == EXIT_OK and outcome == "ok":
        category = "ok"
    elif exit_code == EXIT_EXCEPTION and outcome == "exception":
        category = "memory-limit" if record.get("exc_type") == "MemoryError" else "exception"
    elif exit_code == EXIT_SETUP_FAILED and outcome == "setup-failed":
        category, reason = "crashed", f"sandbox setup failed, the function was not run: {reason}"
    else:
        category = "crashed"
        reason = f"the child exited with code {exit_code} without a matching status ({outcome or 'none'})"
    log = obs.log_bytes.decode("utf-8", "replace")
    if obs.log_dropped:
        log += f"\n[... {obs.log_dropped} more bytes of stdout/stderr dropped]"
    detail = reason
    if log:
        detail += ("\n" if detail else "") + f"--- stdout/stderr ---\n{log}"
    return RunResult(
        ok=category == "ok",
        category=category,
        detail=_cap(detail),
        exit_code=exit_code,
        signal=sig,
        duration_s=obs.duration_s,
        output_sizes=dict(obs.output_sizes),
    )
