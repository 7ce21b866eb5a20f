"""Errors raised by Confide. Every error says what failed and where (file, field, party, call)."""

from __future__ import annotations


class ConfideError(Exception):
    """Base class: a failure that stops the work, with a message meant for a person."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class FormatError(ConfideError):
    """Input is malformed: bad magic, wrong length, unknown or missing field."""


class IntegrityError(ConfideError):
    """Authentication failed: a tag, signature or digest did not match."""


class KeyMismatchError(ConfideError):
    """The data is not addressed to this key (wrong recipient or wrong identity)."""


class EvidenceError(ConfideError):
    """Evidence is not authentic (bad signature, bad chain, expired) or cannot be parsed."""


class PolicyError(ConfideError):
    """Evidence is authentic but does not satisfy the verification policy."""


class EnclaveError(ConfideError):
    """The enclave refused or failed an enclave call."""


class MemoryBudgetError(EnclaveError):
    """The enclave memory budget (the simulated EPC) would be exceeded."""


class SandboxError(ConfideError):
    """The sandbox could not be set up, or the function in it failed or was stopped."""
