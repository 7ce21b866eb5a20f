"""Errors of the dataflow: each names the stage and partition where it was found."""

from __future__ import annotations

from ..errors import EnclaveError, FormatError, IntegrityError


class FlowFormatError(FormatError):
    """A batch, a job description or a message from the engine is malformed."""


class FlowIntegrityError(IntegrityError):
    """The engine tampered with the job: a batch or task is missing, duplicated, reordered, replayed,
    spliced, swapped or of another job. The job is refused."""


class FlowTaskError(EnclaveError):
    """A task failed (a user function raised, hit a limit, or produced malformed output)."""
