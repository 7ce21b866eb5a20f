"""The 64 bytes of report data every Confide enclave binds into its evidence, and every verifier
checks: H(enclave public keys) || H(verifier's nonce) (zeros when there is none).

Kept apart from `backend` so a client checking a policy imports two hash functions, not the backend."""

from __future__ import annotations

import hashlib

from .keys import PublicIdentity

REPORT_DATA_LEN = 64


def keys_binding(enclave: PublicIdentity) -> bytes:
    return hashlib.sha256(b"confide-enclave-keys-v1\0" + enclave.sign_pub + enclave.kem_pub).digest()


def nonce_binding(nonce: bytes | None) -> bytes:
    return bytes(32) if not nonce else hashlib.sha256(b"confide-nonce-v1\0" + nonce).digest()


def report_data_for(enclave: PublicIdentity, nonce: bytes | None) -> bytes:
    """Report data of a Confide enclave: H(enclave public keys) || H(verifier's nonce) (zeros if none)."""
    return keys_binding(enclave) + nonce_binding(nonce)
