"""Whole-file sealing for parties: encrypt a file or stream to recipients, open a sealed file, and
decrypt one to a file. Run on a party's machine (the CLI, the SDK, model preparation), outside the
TCB.

The sealed-file format is ``confide.enclave.sealed_file`` (``SealedWriter``, ``SealedReader``,
``write_atomically``), which the enclave uses for its own inputs and outputs; these helpers only put
files and streams around it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.sealed_file import (
    DEFAULT_CHUNK_SIZE,
    Progress,
    ReadStream,
    SealedHeader,
    SealedReader,
    SealedWriter,
    write_atomically,
)


def encrypt_stream(
    src: ReadStream,
    dst: BinaryIO,
    *,
    recipients: Sequence[PublicIdentity] = (),
    data_key: bytes | None = None,
    metadata: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> SealedWriter:
    writer = SealedWriter(
        dst, recipients=recipients, data_key=data_key, metadata=metadata, chunk_size=chunk_size
    )
    writer.write_chunks_from(src, progress)
    return writer


def encrypt_file(
    src_path: Path,
    dst_path: Path,
    *,
    recipients: Sequence[PublicIdentity],
    metadata: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> SealedHeader:
    try:
        src = open(src_path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfideError(f"cannot read input ({exc.strerror})", where=str(src_path)) from None
    with src:
        writer = write_atomically(
            dst_path,
            lambda dst: encrypt_stream(
                src, dst, recipients=recipients, metadata=metadata, chunk_size=chunk_size, progress=progress
            ),
        )
    return writer.header


def open_reader(path: Path) -> tuple[io.FileIO, SealedReader]:
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller; chunks are read whole
    except OSError as exc:
        raise ConfideError(f"cannot read sealed file ({exc.strerror})", where=str(path)) from None
    try:
        return fh, SealedReader(fh, where=str(path))
    except BaseException:
        fh.close()
        raise


def decrypt_file(
    src_path: Path, dst_path: Path, *, identity: Identity, progress: Progress | None = None
) -> SealedReader:
    fh, reader = open_reader(src_path)
    with fh:
        reader.unlock(identity=identity)
        write_atomically(dst_path, lambda dst: reader.decrypt_to(dst, progress))
    return reader
