"""Each dataset's spent privacy budget (epsilon), kept in this worker's sealed state.

A task with ``params.dp`` (dp_params.py) states each input's total epsilon in the manifest its owner
signed. Before any input is decrypted the enclave reads what each input dataset has spent, refuses
the task when any would pass its total (naming the dataset), and then writes the new amounts, each
sealed with AES-256-GCM under the measurement-bound sealing key with the dataset id bound as
associated data. A write that fails refuses the task: no input is decrypted and no output released.
An edited, truncated or swapped file does not unseal: the task is refused, fail closed.

What this does NOT guarantee (docs/ARCHITECTURE.md, "Differential privacy"): the files are on the
host's disk. A host that deletes a dataset's file or puts back an older copy (a rollback) makes the
enclave see less spent, and can then spend the budget again: each rollback gives the dataset's whole
budget back at most. So can a host that sends tasks to another worker (each has its own state) or to
another build (another measurement, another sealing key, a fresh state). Stopping that needs a
monotonic counter the TEE vouches for (SGX's retired PSE counters, a TPM NV counter, or a quorum of
workers), which the sim backend does not have. Receipts name the task's epsilon and the run, so
owners can add up what the receipts of their datasets' tasks say.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .backend import TeeBackend
from .errors import EnclaveError, IntegrityError
from .sealed_file import write_atomically

BUDGET_LABEL = b"privacy-budget"
BUDGET_AAD = b"confide-privacy-budget-v1\0"


class PrivacyBudget:
    def __init__(self, backend: TeeBackend, state_dir: Path) -> None:
        self.backend = backend
        self.dir = state_dir / "privacy"
        self._lock = threading.Lock()

    def path(self, dataset_id: str) -> Path:
        return self.dir / f"{dataset_id}-{self.backend.identity.measurement[:16]}.sealed"

    def _aead(self, dataset_id: str) -> tuple[AESGCM, bytes]:
        key = self.backend.sealing_key("measurement", BUDGET_LABEL)
        aad = BUDGET_AAD + bytes.fromhex(self.backend.identity.measurement) + b"\0" + dataset_id.encode()
        return AESGCM(key), aad

    def spent(self, dataset_id: str) -> Decimal:
        """The epsilon `dataset_id` has spent on this worker (0 when it has no record)."""
        path = self.path(dataset_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return Decimal(0)
        except OSError as exc:
            raise EnclaveError(f"cannot read the privacy budget ({exc.strerror})", where=str(path)) from None
        aead, aad = self._aead(dataset_id)
        try:
            record = json.loads(aead.decrypt(blob[:12], blob[12:], aad))
            spent = Decimal(record["spent"])
        except (InvalidTag, ValueError, KeyError, TypeError, InvalidOperation):
            raise IntegrityError(
                "sealed privacy budget does not unseal: another build, another dataset's record, or "
                "tampered (the task is refused)",
                where=str(path),
            ) from None
        if record.get("dataset_id") != dataset_id or not spent.is_finite() or spent < 0:
            raise IntegrityError("sealed privacy budget is not this dataset's record", where=str(path))
        return spent

    def charge(self, epsilon: Decimal, totals: Mapping[str, tuple[Decimal, str]]) -> dict[str, Decimal]:
        """Charge `epsilon` to each dataset of `totals` (dataset id -> (its total, where to name
        it)); refuses before writing anything when one would pass its total. Returns what each
        dataset has spent now. A record that cannot be written refuses the task."""
        with self._lock:
            spent = {ds: self.spent(ds) for ds in totals}
            for ds, (total, where) in totals.items():
                if spent[ds] + epsilon > total:
                    raise IntegrityError(
                        f"privacy budget exhausted: dataset {ds} has spent epsilon {spent[ds]} of its "
                        f"total {total}; this task needs {epsilon} more (counted by this worker)",
                        where=where,
                    )
            after = {}
            for ds in totals:
                after[ds] = spent[ds] + epsilon
                self._write(ds, after[ds])
            return after

    def _write(self, dataset_id: str, spent: Decimal) -> None:
        aead, aad = self._aead(dataset_id)
        nonce = os.urandom(12)
        plain = json.dumps({"dataset_id": dataset_id, "spent": str(spent)}).encode()
        path = self.path(dataset_id)
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path, lambda fh: fh.write(nonce + aead.encrypt(nonce, plain, aad)))
        except OSError as exc:
            raise EnclaveError(
                f"cannot record the privacy budget ({exc.strerror}): no input is decrypted and no "
                "output released without it",
                where=str(path),
            ) from None
