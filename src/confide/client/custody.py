"""Secrets a party hands only to the enclave: tasks for the ``password-check`` and ``sign``
built-ins, uploads that show the platform nothing of a password or key, and the words an approver
reads about what such a task releases to whom.

A plain ``upload_dataset`` publishes a CSV's header line and row count as the dataset's schema, and
the sealed file's size tells the host the plaintext's size; ``upload_password`` and ``upload_key``
publish no schema, and a password is padded to a fixed size first. The enclave enforces the rest
(the check's result only to the owner of the password, no key byte in any output or error).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError
from confide.enclave.manifest import Manifest

if TYPE_CHECKING:
    from confide.client.sdk import Client, DatasetRef

PASSWORD_PAD = 8192  # builtins/password_check.py: the input's size; trailing NUL bytes are padding
MAX_PASSWORD = 4096
SIGN_ALGORITHMS = ("ed25519", "rsa-pss-sha256", "rsa-pkcs1v15-sha256")
SIGN_OUTPUTS = ("signature", "public_key")


def _upload_opaque(client: Client, path: Path, name: str, what: str) -> DatasetRef:
    """Seal and upload a file with no schema and no row count (the platform learns only its size)."""
    return client._upload(path, name, {"columns": []}, None, {}, what)


def upload_password(client: Client, password: str, *, name: str = "password") -> DatasetRef:
    """Upload one password for ``password-check``, padded with NUL bytes to a fixed 8 KiB (the
    platform sees that size, no schema); returns the dataset, whose ``.ref`` names the input."""
    raw = password.encode("utf-8")
    if not raw or len(raw) > MAX_PASSWORD or "\n" in password or "\r" in password or "\0" in password:
        raise ConfideError(
            f"a password is 1..{MAX_PASSWORD} UTF-8 bytes on one line, without NUL", where="upload_password"
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="confide-secret-") as tmp:
        path = Path(tmp) / "password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw.ljust(PASSWORD_PAD, b"\0"))
        return _upload_opaque(client, path, name, "password")


def upload_key(client: Client, path: Path, *, name: str | None = None) -> DatasetRef:
    """Upload a private key file (unencrypted PKCS#8, PEM or DER) for ``sign``: sealed like any
    dataset, with no schema, so the platform sees only its size; the enclave checks the key."""
    path = Path(path)
    return _upload_opaque(client, path, name or path.stem, "key")


def password_check(client: Client, *, password: str, exposed: str, **task: Any) -> str:
    """Create a ``password-check`` task: is the password of input `password` (a dataset reference,
    see ``upload_password``) in the breach corpus `exposed` (SHA1HEX:COUNT lines)? The result goes to
    the owner of `password` only (the enclave refuses anything else). Returns the task id."""
    owner = client._dataset_pin(password, "input 'password'").owner
    return client.create_task(
        function="password-check",
        inputs={"password": password, "exposed": exposed},
        outputs={"result": [owner]},
        params={},
        **task,
    )


def sign_message(
    client: Client,
    *,
    key: str,
    message: str,
    algorithm: str,
    outputs: Sequence[str] = ("signature",),
    recipients: Sequence[str] | None = None,
    **task: Any,
) -> str:
    """Create a ``sign`` task: the enclave signs dataset `message` with the private key of dataset
    `key` (see ``upload_key``) using `algorithm` (ed25519, rsa-pss-sha256, rsa-pkcs1v15-sha256).
    `outputs`: any of ``signature`` and ``public_key``, sealed to `recipients` (default this client).
    Returns the task id."""
    if algorithm not in SIGN_ALGORITHMS:
        raise ConfideError(
            f"algorithm must be one of {', '.join(SIGN_ALGORITHMS)}, got {algorithm!r}", where="sign"
        )
    wanted = list(outputs)
    bad = sorted(set(wanted) - set(SIGN_OUTPUTS)) or (["(none)"] if not wanted else [])
    if bad:
        raise ConfideError(f"sign outputs must be some of {', '.join(SIGN_OUTPUTS)}, got {bad}", where="sign")
    to = list(recipients) if recipients is not None else [client.fingerprint]
    return client.create_task(
        function="sign",
        inputs={"key": key, "message": message},
        outputs={o: to for o in wanted},
        params={"algorithm": algorithm},
        **task,
    )


# ---- what an approver reads -------------------------------------------------------------------


def describe(m: Manifest, clean: Callable[[str], str] = str) -> list[str]:
    """Lines for the approval text of a password-check or sign task."""
    fn = m.function
    if fn.kind != "builtin" or fn.name not in ("password-check", "sign"):
        return []
    owner = {i.name: clean(m.name_of(i.owner)) for i in m.inputs}
    to = {o.name: ", ".join(clean(m.name_of(r)) for r in o.recipients) for o in m.outputs}
    lines = [f"What leaves ({fn.name}, enforced in the enclave):"]
    if fn.name == "password-check":
        lines += [
            f"  result -> {to.get('result', '-')}: whether the password of {owner.get('password', '?')} "
            f"is in the corpus of {owner.get('exposed', '?')}, and its count there (fixed size: the host "
            "cannot tell the answer from it); the enclave seals it to the password's owner only",
            f"  {owner.get('exposed', '?')} learns only that a check ran (and, if the run fails, the error, "
            "which never quotes the password); the whole corpus is read whatever the password",
        ]
        return lines
    algorithm = m.params.get("algorithm")
    lines.append(
        f"  the private key of {owner.get('key', '?')} (input key) signs the message of "
        f"{owner.get('message', '?')} (input message) with {clean(repr(algorithm))}; no byte of the key "
        "leaves the enclave, in any output or error"
    )
    if "signature" in to:
        lines.append(f"  signature -> {to['signature']}: the signature's raw bytes")
    if "public_key" in to:
        lines.append(f"  public_key -> {to['public_key']}: the key's public half (PEM)")
    lines.append(
        "  whoever receives the signature can show the key's owner signed this message: approve only "
        "messages you mean to sign"
    )
    return lines


__all__ = ["describe", "password_check", "sign_message", "upload_key", "upload_password"]
