"""Sealed messages: HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.

The context a message is for (its purpose, and the dataset, task or file it belongs to) is bound
as the HPKE ``info``: a message sealed for one purpose or dataset does not open for another.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .encoding import canonical_json
from .errors import FormatError, IntegrityError

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
ENC_LEN = 32  # X25519 encapsulated key
TAG_LEN = 16


def context_info(purpose: str, **binding: str) -> bytes:
    """The bytes bound into a message: what it is for, and which dataset/task/file it belongs to."""
    if not purpose:
        raise ValueError("a sealed message needs a purpose")
    return canonical_json({"confide-hpke": 1, "purpose": purpose, **dict(sorted(binding.items()))})


def seal(plaintext: bytes, recipient: X25519PublicKey, purpose: str, **binding: str) -> bytes:
    return SUITE.encrypt(plaintext, recipient, info=context_info(purpose, **binding))


def open_sealed(
    ciphertext: bytes, key: X25519PrivateKey, purpose: str, *, where: str, **binding: str
) -> bytes:
    if len(ciphertext) < ENC_LEN + TAG_LEN:
        raise FormatError(f"sealed message too short ({len(ciphertext)} bytes)", where=where)
    try:
        return SUITE.decrypt(ciphertext, key, info=context_info(purpose, **binding))
    except (InvalidTag, ValueError):
        raise IntegrityError(
            "sealed message does not open: wrong recipient key, wrong context "
            f"(purpose {purpose!r}{_describe(binding)}) or tampered ciphertext",
            where=where,
        ) from None


def _describe(binding: Mapping[str, str]) -> str:
    return "".join(f", {k} {v!r}" for k, v in sorted(binding.items()))
