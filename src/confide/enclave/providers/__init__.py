"""Evidence providers for real TEEs: what the enclave runtime uses in place of the sim backend.

- `gramine_sgx.GramineSgxBackend`: an SGX enclave under Gramine, through /dev/attestation.
- `tsm.TsmBackend`: an SEV-SNP or TDX confidential VM, through Linux configfs-tsm.

Both implement `confide.enclave.backend.TeeBackend` and return their hardware evidence wrapped in a
`confide-evidence-v1` envelope (`envelope.wrap_evidence`) that also carries what the hardware does
not sign but report data binds (the enclave's public keys) and, for SEV-SNP, the certificate table
the host supplied. Part of the TCB: they import only the standard library, `cryptography` and
`confide.enclave`. Their interface paths are constructor parameters so that tests can point them
at directories laid out like the kernel's or Gramine's.
"""

from __future__ import annotations

import os
from pathlib import Path

from confide.enclave.errors import ConfideError

MAX_ATTRIBUTE_BYTES = 1 << 20  # configfs outblob is capped at 32 KiB, quotes are ~5 KiB


def read_attribute(path: Path, what: str, *, limit: int = MAX_ATTRIBUTE_BYTES) -> bytes:
    """Read a pseudo-file completely (at most `limit` bytes); ConfideError naming the path."""
    try:
        with open(path, "rb", buffering=0) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfideError(f"cannot read {what} ({exc.strerror or exc})", where=str(path)) from None
    if len(data) > limit:
        raise ConfideError(f"{what} is larger than {limit} bytes", where=str(path))
    return data


def write_attribute(path: Path, data: bytes, what: str) -> None:
    """Write a pseudo-file in one write() call, as configfs and Gramine expect. The file must exist
    (pseudo-files do; neither interface lets a program create one)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfideError(
            f"cannot open {what} for writing ({exc.strerror or exc})", where=str(path)
        ) from None
    try:
        written = os.write(fd, data)
    except OSError as exc:
        raise ConfideError(f"cannot write {what} ({exc.strerror or exc})", where=str(path)) from None
    finally:
        os.close(fd)
    if written != len(data):
        raise ConfideError(f"short write of {what}: {written} of {len(data)} bytes", where=str(path))
