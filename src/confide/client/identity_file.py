"""Writing a party's private key file. Run on a party's machine (``confide keygen``), outside the
TCB: the enclave keeps its own keys in sealed state (enclave/state.py), never in a key file.

The file's content is ``Identity.private_bytes()`` (confide.enclave.keys, which also reads it back
with ``Identity.load``).
"""

from __future__ import annotations

import os
from pathlib import Path

from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity


def save_identity(identity: Identity, path: Path, *, overwrite: bool = False) -> None:
    """Write with mode 0600, never following a symlink and never widening permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfideError("refusing to overwrite an existing identity", where=str(path)) from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o600)
        fh.write(identity.private_bytes())
