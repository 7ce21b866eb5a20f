"""Dataset key envelopes (PROTOCOL.md section 3): a dataset's data key wrapped to the enclave
service, bound to the dataset, its owner, the service and the ciphertext digest. The owner wraps
(``confide.client.dataset_keys``, outside the TCB, with ``DatasetKeyEnvelope.binding`` from here);
the enclave parses, checks and opens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import hpke_box
from .encoding import b64d, b64e, check_fields
from .errors import FormatError, IntegrityError
from .keys import Identity
from .task_fields import (
    DATASET_KEY_FORMAT,
    DATASET_KEY_PURPOSE,
    HEX32_RE,
    HEX64_RE,
    MAX_ENVELOPE_BYTES,
    fingerprint_field,
    hex_field,
    load_object,
)

# ---- datasets (section 3) --------------------------------------------------------------------------

if TYPE_CHECKING:  # only for annotations: manifest imports this module
    from .manifest import TaskInput


@dataclass(frozen=True)
class DatasetKeyEnvelope:
    dataset_id: str
    owner: str
    service: str
    ciphertext_sha256: str
    wrapped: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DATASET_KEY_FORMAT,
            "dataset_id": self.dataset_id,
            "owner": self.owner,
            "service": self.service,
            "ciphertext_sha256": self.ciphertext_sha256,
            "wrapped": b64e(self.wrapped),
        }

    def binding(self) -> dict[str, str]:
        return {
            "dataset": self.dataset_id,
            "owner": self.owner,
            "service": self.service,
            "ciphertext_sha256": self.ciphertext_sha256,  # not "ciphertext": open_sealed's own argument
        }


def parse_dataset_key(
    data: str | bytes | Mapping[str, Any], *, where: str = "dataset key envelope"
) -> DatasetKeyEnvelope:
    obj = load_object(data, MAX_ENVELOPE_BYTES, where)
    check_fields(
        obj,
        required=("format", "dataset_id", "owner", "service", "ciphertext_sha256", "wrapped"),
        where=where,
    )
    if obj["format"] != DATASET_KEY_FORMAT:
        raise FormatError(f"unknown envelope format {str(obj['format'])[:80]!r}", where=where)
    wrapped = b64d(obj["wrapped"], field="wrapped", where=where)
    if not hpke_box.ENC_LEN + hpke_box.TAG_LEN <= len(wrapped) <= 256:
        raise FormatError(f"wrapped key of {len(wrapped)} bytes has the wrong size", where=where)
    return DatasetKeyEnvelope(
        dataset_id=hex_field(obj, "dataset_id", HEX32_RE, where),
        owner=fingerprint_field(obj, "owner", where),
        service=fingerprint_field(obj, "service", where),
        ciphertext_sha256=hex_field(obj, "ciphertext_sha256", HEX64_RE, where),
        wrapped=wrapped,
    )


def check_dataset_key(
    envelope: DatasetKeyEnvelope, expect: TaskInput, service_fp: str, *, where: str
) -> None:
    """The envelope is for this service and says what the manifest says about the input."""
    if envelope.service != service_fp:
        raise IntegrityError(
            f"key envelope is wrapped to service {envelope.service}, not this service {service_fp}",
            where=where,
        )
    if envelope.dataset_id != expect.dataset_id:
        raise IntegrityError(
            f"key envelope is for dataset {envelope.dataset_id}, but the manifest names dataset "
            f"{expect.dataset_id}",
            where=where,
        )
    if envelope.owner != expect.owner:
        raise IntegrityError(
            f"key envelope is bound to owner {envelope.owner}, but the manifest says the owner is {expect.owner}",
            where=where,
        )
    if envelope.ciphertext_sha256 != expect.ciphertext_sha256:
        raise IntegrityError(
            f"key envelope is for ciphertext {envelope.ciphertext_sha256}, but the manifest names "
            f"{expect.ciphertext_sha256}",
            where=where,
        )


def open_dataset_key(
    envelope: DatasetKeyEnvelope | Mapping[str, Any],
    service: Identity,
    *,
    expect: TaskInput | None = None,
    where: str = "dataset key envelope",
) -> bytes:
    """Enclave side: unwrap a data key. With `expect`, the envelope must match that manifest input
    first; the HPKE info binds every field, so an edited envelope does not open."""
    env = envelope if isinstance(envelope, DatasetKeyEnvelope) else parse_dataset_key(envelope, where=where)
    if expect is not None:
        check_dataset_key(env, expect, service.fingerprint, where=where)
    key = hpke_box.open_sealed(
        env.wrapped, service.kem_key, DATASET_KEY_PURPOSE, where=where, **env.binding()
    )
    if len(key) != 32:
        raise FormatError(f"unwrapped data key has {len(key)} bytes, not 32", where=where)
    return key
