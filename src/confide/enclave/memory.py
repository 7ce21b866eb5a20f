"""The enclave memory budget: like SGX's EPC, a fixed amount of protected memory.

Decrypted inputs and the sandboxed function's data allowance are reserved against it before use;
a reservation that does not fit fails with a message saying what needed how much.
"""

from __future__ import annotations

from .errors import MemoryBudgetError

MIB = 1 << 20


class MemoryBudget:
    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def reserve(self, nbytes: int, what: str) -> int:
        if nbytes < 0:
            raise ValueError("negative reservation")
        if nbytes > self.free:
            raise MemoryBudgetError(
                f"{what} needs {nbytes / MIB:.1f} MiB of enclave memory but only {self.free / MIB:.1f} MiB of the "
                f"{self.total / MIB:.0f} MiB budget is free (raise memory_budget_mib in the enclave config; "
                "it changes the measurement)",
                where="enclave memory",
            )
        self.used += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
