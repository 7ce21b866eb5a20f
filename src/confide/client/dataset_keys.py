"""A data owner's side of dataset key envelopes (PROTOCOL.md section 3): a new dataset id, and the
dataset's data key wrapped to the service. Run on the owner's machine, outside the TCB.

The envelope's format, its HPKE purpose and the binding of every field are those of
``confide.enclave.dataset_keys``, where the enclave opens envelopes (``open_dataset_key``); the
fields are checked with its parser before anything is wrapped.
"""

from __future__ import annotations

import os
from typing import Any

from confide.enclave import hpke_box
from confide.enclave.dataset_keys import DatasetKeyEnvelope, parse_dataset_key
from confide.enclave.encoding import b64e
from confide.enclave.errors import FormatError
from confide.enclave.keys import PublicIdentity
from confide.enclave.task_fields import DATASET_KEY_PURPOSE


def new_dataset_id() -> str:
    return os.urandom(16).hex()


def wrap_dataset_key(
    data_key: bytes,
    *,
    dataset_id: str,
    owner: PublicIdentity | str,
    service: PublicIdentity,
    ciphertext_sha256: str,
) -> dict[str, Any]:
    """Owner side: the dataset's data key wrapped to the service, bound to dataset, owner and blob."""
    if len(data_key) != 32:
        raise FormatError("a data key is 32 bytes", where="dataset key envelope")
    owner_fp = owner.fingerprint if isinstance(owner, PublicIdentity) else owner
    env = DatasetKeyEnvelope(dataset_id, owner_fp, service.fingerprint, ciphertext_sha256, b"")
    parse_dataset_key({**env.to_json(), "wrapped": b64e(bytes(48))})  # validate the fields first
    wrapped = hpke_box.seal(data_key, service.kem_key, DATASET_KEY_PURPOSE, **env.binding())
    return DatasetKeyEnvelope(dataset_id, owner_fp, service.fingerprint, ciphertext_sha256, wrapped).to_json()
