"""Exit codes of the sandboxed child (the enclave trusts the exit status, not the status line)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_EXCEPTION = 1
EXIT_INTERNAL = 70
EXIT_SETUP_FAILED = 71
