"""Steps shared by the single-client ``run`` call and the multi-party ``task`` call.

- ``open_input``: a sealed input file, checked (header digest, or SHA-256 of the whole ciphertext
  *as read while decrypting*, so a file swapped after the check is caught), decrypted into a sealed
  memfd reserved against the memory budget;
- ``OutputFile``: a declared output, sealed to its recipients as the function writes it, capped,
  written under a temporary name and published only on success;
- ``run_sandboxed``: the function's working memory reserved, limits set, one sandboxed run;
- ``write_error_output``: a failed function's own error text, sealed (it may carry data), cut to
  the approved cap and padded to it.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .config import EnclaveConfig
from .errors import EnclaveError, IntegrityError
from .keys import PublicIdentity
from .memory import MemoryBudget
from .padding import PAD_FORMAT, TRAILER, padded_size, trailer
from .sandbox import RunResult, SandboxLimits, Zygote, make_input_memfd
from .sealed_file import SealedReader, SealedWriter, create_partial

MIN_WORKING_MEMORY = 16 << 20
ENCLAVE_PARAM = "_enclave"  # params the enclave fills in (run_sandboxed); a manifest may not set it
_BLOCK = 1 << 20


# ---- inputs -----------------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A file as SealedReader reads it, hashing the bytes read in order from offset 0. SealedReader
    reads the header, then (after a seek to the end for the size) every chunk in order, so after a
    full decryption the hash covers exactly the bytes that were decrypted."""

    def __init__(self, fh: io.FileIO) -> None:
        super().__init__()
        self._fh = fh
        self._sha = hashlib.sha256()
        self._pos = 0
        self.hashed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._fh.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = self._fh.readinto(buf) or 0
        if n and self._pos <= self.hashed < self._pos + n:
            self._sha.update(memoryview(buf).cast("B")[self.hashed - self._pos : n])
            self.hashed = self._pos + n
        self._pos += n
        return n

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def sha256_of(fh: BinaryIO) -> str:
    fh.seek(0)
    h = hashlib.sha256()
    while block := fh.read(_BLOCK):
        h.update(block)
    return h.hexdigest()


def _open(path: str, where: str) -> io.FileIO:
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise EnclaveError(f"cannot open input ({exc.strerror})", where=where) from None


def input_metadata(path: str, *, where: str) -> dict[str, Any]:
    """The header metadata of a sealed input, read before its data key is used (not yet
    authenticated: open_input hashes the whole file against the approved digest)."""
    with _open(path, where) as fh:
        return dict(SealedReader(fh, where=where).header.metadata)


def input_sha256(path: str, *, where: str) -> str:
    """SHA-256 of a whole input file (constant memory), before any key is used on it."""
    with _open(path, where) as fh:
        return sha256_of(fh)


def open_input(
    path: str,
    name: str,
    *,
    data_key: bytes,
    budget: MemoryBudget,
    header_sha256: str | None = None,
    ciphertext_sha256: str | None = None,
    where: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[int, int]:
    """Decrypt a sealed input into a sealed memfd; returns (fd, bytes reserved against the budget).
    With `header_sha256` the file's header must have that digest; with `ciphertext_sha256` the
    bytes decrypted must hash to it. `metadata`, if given, receives the header's metadata as read
    from the same bytes (authenticated once this returns)."""
    where = where or f"input {name!r} ({path})"
    reserved = 0
    with _open(path, where) as fh:
        src: io.RawIOBase = _HashingReader(fh) if ciphertext_sha256 is not None else fh
        reader = SealedReader(src, where=where)
        if header_sha256 is not None and reader.header.digest.hex() != header_sha256:
            raise IntegrityError(
                "input file is not the file the client approved (header digest mismatch)", where=where
            )
        reader.unlock(data_key=data_key)
        reserved = budget.reserve(reader.plaintext_size, f"input {name!r}")
        try:
            fd = make_input_memfd(reader.iter_chunks(), name=f"confide-input-{name}")
            if isinstance(src, _HashingReader):
                size = fh.seek(0, os.SEEK_END)
                if src.hashed != size or src.hexdigest() != ciphertext_sha256:
                    os.close(fd)
                    raise IntegrityError(
                        "input changed while it was read: the bytes decrypted are not the approved ciphertext",
                        where=where,
                    )
        except BaseException:
            budget.release(reserved)
            raise
        if metadata is not None:
            metadata.update(reader.header.metadata)
    return fd, reserved


# ---- outputs ----------------------------------------------------------------------------------------


class OutputLimitExceeded(EnclaveError):
    """An output grew past its own cap (the run is stopped; nothing is published)."""


class _HashingFile:
    """Pass-through writer that hashes what goes to disk (the sealed bytes)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        return self.fh.write(data)


class OutputFile:
    """A declared output: sealed to its recipients as the function writes it; published only on success.

    With `pad` ("pow2", a bucket size, or "fixed": exactly `max_bytes`) the plaintext is padded to its
    bucket before the file is closed, the true length in an encrypted trailer (see padding.py)."""

    def __init__(
        self,
        path: Path,
        recipients: Sequence[PublicIdentity],
        metadata: Mapping[str, str],
        *,
        max_bytes: int | None = None,
        pad: str | int | None = None,
    ) -> None:
        if pad == "fixed" and max_bytes is None:
            raise ValueError("fixed padding needs max_bytes")
        self.path = path
        self.max_bytes = max_bytes
        self.pad = pad
        self.data_size = 0
        if pad is not None:
            metadata = {**metadata, "pad": PAD_FORMAT}
        self.tmp, self.fh = create_partial(path)
        self.hashing = _HashingFile(self.fh)
        self.writer = SealedWriter(self.hashing, recipients=recipients, metadata=metadata)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        """Plaintext bytes written so far (after `publish`, with the padding: what the host sees)."""
        return self.writer.plaintext_bytes

    def write(self, data: bytes) -> None:
        if self.max_bytes is not None and self.size + len(data) > self.max_bytes:
            raise OutputLimitExceeded(f"output exceeded its {self.max_bytes}-byte cap", where=str(self.path))
        self.writer.write(data)

    def publish(self) -> str:
        """Pad (if asked), finish, rename into place; returns the SHA-256 of the sealed file."""
        self.data_size = n = self.writer.plaintext_bytes
        if self.pad is not None:
            if self.pad == "fixed":  # exactly the cap, trailer included
                assert self.max_bytes is not None
                total = self.max_bytes
            else:
                total = padded_size(n, self.pad)
            zeros = total - n - TRAILER
            block = bytes(min(_BLOCK, zeros))
            while zeros > 0:  # in blocks: a bucket may be tens of MiB
                self.writer.write(block[: min(_BLOCK, zeros)])
                zeros -= min(_BLOCK, zeros)
            self.writer.write(trailer(n))
        self.writer.close()
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.hashing.sha.hexdigest()

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def error_text(result: RunResult, max_bytes: int | None) -> bytes:
    """The error report, cut to `max_bytes` (UTF-8 safe, with a note of how much was cut)."""
    text = f"category: {result.category}\n\n{result.detail}".encode()
    if max_bytes is None or len(text) <= max_bytes:
        return text
    note = f"\n[error text cut to the approved {max_bytes}-byte cap; it had {len(text)} bytes]".encode()
    keep = max(0, max_bytes - len(note))
    return (text[:keep].decode("utf-8", "ignore").encode() + note)[:max_bytes]


def write_error_output(
    path: Path,
    recipients: Sequence[PublicIdentity],
    metadata: Mapping[str, str],
    result: RunResult,
    *,
    max_bytes: int | None = None,
) -> tuple[str, int]:
    """The function's own error text may carry data: sealed to the given recipients only. With
    `max_bytes` (the cap the owners approved) the text is cut to it and padded to exactly that size,
    so the host learns neither the text nor its length. Returns (SHA-256 of the sealed file, size
    the host sees)."""
    out = OutputFile(
        path, recipients, metadata, max_bytes=max_bytes, pad=None if max_bytes is None else "fixed"
    )
    try:
        out.write(error_text(result, None if max_bytes is None else max_bytes - TRAILER))
        return out.publish(), out.size
    except BaseException:
        out.discard()
        raise


# ---- the sandboxed run ------------------------------------------------------------------------------


def run_sandboxed(
    zygote: Zygote,
    budget: MemoryBudget,
    config: EnclaveConfig,
    *,
    source: str,
    params: dict[str, Any],
    inputs: dict[str, int],
    outputs: Mapping[str, OutputFile],
    max_output_bytes: int,
    stream: tuple[int, int] | None = None,
    enclave_params: dict[str, Any] | None = None,
) -> RunResult:
    """One run: what is left of the memory budget is the function's allowance (at least
    MIN_WORKING_MEMORY), released afterwards. An output over its own cap ends as `output-limit`.
    `stream`: the child's ends of an accelerator stream (accelerator_link) or of the weight stream
    (model_stream), passed on as they are. `enclave_params`: facts the enclave gives the function
    in ``params[ENCLAVE_PARAM]`` (never the host's word, never the manifest's), with the
    allowance added as ``memory_allowance``."""
    if budget.free < MIN_WORKING_MEMORY:
        budget.reserve(MIN_WORKING_MEMORY, "the function's working memory (minimum)")
    allowance = budget.reserve(budget.free, "the function's working memory")
    if enclave_params is not None:
        params = {**params, ENCLAVE_PARAM: {**enclave_params, "memory_allowance": allowance}}
    try:
        limits = SandboxLimits(
            memory_bytes=allowance,
            cpu_seconds=config.cpu_seconds,
            wall_seconds=float(config.wall_seconds),
            max_output_bytes=min(config.max_output_mib << 20, max_output_bytes),
        )
        try:
            return zygote.run(
                source, params=params, inputs=inputs, outputs=dict(outputs), limits=limits, stream=stream
            )
        except OutputLimitExceeded as exc:
            return RunResult(False, "output-limit", str(exc), None, None, 0.0)
    finally:
        budget.release(allowance)
