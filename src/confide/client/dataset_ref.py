"""Dataset references: what a data owner hands to a task creator instead of a bare dataset id.

``cds1:<dataset id, 32 hex>:<owner fingerprint, 32 hex>:<ciphertext SHA-256, 64 hex>`` (135
characters). It names the dataset, pins its owner by the full 128-bit fingerprint and its exact
ciphertext, so the creator's client builds the manifest input from the reference itself and only
checks that the platform's record agrees: the host cannot substitute another owner's dataset, or
another (say, re-uploaded or poisoned) ciphertext of the same owner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from confide.enclave.errors import FormatError
from confide.enclave.keys import check_pin

PREFIX = "cds1"
_REF_RE = re.compile(r"cds1:([0-9a-f]{32}):([0-9a-f]{32}):([0-9a-f]{64})")
_ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class DatasetPin:
    dataset_id: str
    owner: str  # the full fingerprint, dashed form
    ciphertext_sha256: str

    def __str__(self) -> str:
        return f"{PREFIX}:{self.dataset_id}:{self.owner.replace('-', '')}:{self.ciphertext_sha256}"


def make_ref(dataset_id: str, owner: str, ciphertext_sha256: str) -> str:
    return str(DatasetPin(dataset_id, check_pin(owner, where="dataset owner"), ciphertext_sha256))


def is_bare_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


def parse_ref(text: str, *, where: str = "dataset reference") -> DatasetPin:
    """Strictly parse a ``cds1:`` reference (lowercase hex, exact lengths)."""
    if not isinstance(text, str):
        raise FormatError("dataset reference must be text", where=where)
    m = _REF_RE.fullmatch(text.strip())
    if m is None:
        shown = text[:160]
        hint = (
            "a bare dataset id lets the platform substitute another dataset: use the reference the "
            "owner's upload printed"
            if is_bare_id(text.strip())
            else "expected cds1:<dataset id>:<owner fingerprint>:<ciphertext sha256>"
        )
        raise FormatError(f"{shown!r} is not a dataset reference ({hint})", where=where)
    dataset_id, owner, sha = m.groups()
    return DatasetPin(dataset_id, check_pin(owner, where=where), sha)
