"""How many times this worker has run each task (PROTOCOL.md section 5, "Run limits").

Approvals carry ``max_runs``; before a task's first input is decrypted the enclave counts the run
here, sealed (AES-256-GCM under the measurement-bound sealing key, the task id bound as associated
data) in the worker's state directory, and refuses once the count would pass the smallest
``max_runs`` of the approvals it was given. The count is written before any data is decrypted: a
host that cannot (or will not) store it gets no run.

What this does NOT guarantee: the state directory is the host's disk. A host that deletes or
restores an older copy of the count (a rollback), or that sends the task to another worker (each
worker has its own state directory and its own count), gets `max_runs` more runs each time. Without
a monotonic counter the TEE vouches for, an enclave cannot tell a rolled-back state from a fresh
one. Receipts therefore carry the run number and the limit, so recipients refuse results of runs
beyond it and can notice two different receipts claiming one run of one worker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .backend import TeeBackend
from .errors import EnclaveError, IntegrityError
from .sealed_file import write_atomically

LEDGER_LABEL = b"task-runs"
LEDGER_AAD = b"confide-task-runs-v1\0"


class RunLedger:
    def __init__(self, backend: TeeBackend, state_dir: Path) -> None:
        self.backend = backend
        self.dir = state_dir / "runs"

    def _path(self, task_id: str) -> Path:
        return self.dir / f"{task_id}-{self.backend.identity.measurement[:16]}.sealed"

    def _aead(self, task_id: str) -> tuple[AESGCM, bytes]:
        key = self.backend.sealing_key("measurement", LEDGER_LABEL)
        aad = LEDGER_AAD + bytes.fromhex(self.backend.identity.measurement) + b"\0" + task_id.encode()
        return AESGCM(key), aad

    def count(self, task_id: str) -> int:
        """Runs of `task_id` this worker has counted (0 when it has none on record)."""
        path = self._path(task_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise EnclaveError(f"cannot read the run count ({exc.strerror})", where=str(path)) from None
        aead, aad = self._aead(task_id)
        try:
            plain = aead.decrypt(blob[:12], blob[12:], aad)
            runs = json.loads(plain)["runs"]
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise IntegrityError(
                "sealed run count does not unseal: another build, another task's count, or tampered",
                where=str(path),
            ) from None
        if not isinstance(runs, int) or runs < 0:
            raise IntegrityError("sealed run count is not a count", where=str(path))
        return runs

    def next_run(self, task_id: str, max_runs: int) -> int:
        """Count one more run of `task_id` and return its number (1 for the first), sealed to disk
        before returning; refuses (IntegrityError) when it would exceed `max_runs`."""
        run = self.count(task_id) + 1
        if run > max_runs:
            raise IntegrityError(
                f"run {run} of this task exceeds the {max_runs} run(s) its approvals allow "
                "(counted by this worker)",
                where=f"task {task_id}",
            )
        aead, aad = self._aead(task_id)
        nonce = os.urandom(12)
        plain = json.dumps({"task_id": task_id, "runs": run}).encode()
        path = self._path(task_id)
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path, lambda fh: fh.write(nonce + aead.encrypt(nonce, plain, aad)))
        except OSError as exc:
            raise EnclaveError(
                f"cannot record the run count ({exc.strerror}): the task does not run uncounted",
                where=str(path),
            ) from None
        return run
