"""Sealed state: private keys kept on the host's disk, readable only by this build on this platform.

AES-256-GCM under a sealing key the backend derives for this measurement and a label; the
measurement and the label are also bound as associated data.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .backend import TeeBackend
from .errors import IntegrityError
from .keys import Identity
from .sealed_file import write_atomically

STATE_AAD = b"confide-enclave-state-v1"


def state_path(backend: TeeBackend, state_dir: Path, kind: str) -> Path:
    return state_dir / f"{kind}-{backend.identity.measurement[:16]}.sealed"


def _aead(backend: TeeBackend, label: bytes) -> tuple[AESGCM, bytes]:
    aad = STATE_AAD + bytes.fromhex(backend.identity.measurement) + b"\0" + label
    return AESGCM(backend.sealing_key("measurement", label)), aad


def seal_identity(backend: TeeBackend, path: Path, label: bytes, identity: Identity) -> None:
    aead, aad = _aead(backend, label)
    nonce = os.urandom(12)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, lambda fh: fh.write(nonce + aead.encrypt(nonce, identity.private_bytes(), aad)))


def unseal_identity(backend: TeeBackend, path: Path, label: bytes, what: str) -> Identity:
    aead, aad = _aead(backend, label)
    blob = path.read_bytes()
    try:
        plain = aead.decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"sealed {what} does not unseal: made by another build or platform, or tampered", where=str(path)
        ) from None
    return Identity.from_private_bytes(plain, where=str(path))
