"""Content-addressed blob store: ``<root>/sha256/aa/bb/<hash>``.

Blobs are ciphertext (sealed datasets, sealed outputs). A blob is written to a temporary file in
``<root>/tmp`` while its SHA-256 is computed, flushed to disk, and renamed into place only once
its digest is known (and equals the expected one, when there is one): a reader never sees a
half-written blob, and a crash leaves only temporary files, removed at the next start.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from confide.enclave.errors import ConfideError, IntegrityError

CHUNK = 1 << 20
DEFAULT_MAX_BYTES = 4 << 30
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobTooLarge(ConfideError):
    """A blob exceeds the store's size cap (nothing was kept)."""


def check_digest(sha256: str, *, where: str = "sha256") -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ConfideError("a blob digest is 64 lowercase hex digits", where=where)
    return sha256


class BlobWriter:
    """One blob being written; ``commit`` publishes it, ``abort`` (or an exception) discards it."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        fd, name = tempfile.mkstemp(prefix="upload-", dir=store.tmp_dir)
        self.tmp = Path(name)
        self.fh: BinaryIO = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.store.max_bytes:
            self.abort()
            raise BlobTooLarge(f"blob exceeds the {self.store.max_bytes}-byte limit", where="blob store")
        self.sha.update(data)
        self.fh.write(data)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()

    def commit(self, expected_sha256: str | None = None) -> tuple[str, int]:
        """Publish under the computed digest; with ``expected_sha256``, refuse other content."""
        digest = self.sha256
        if expected_sha256 is not None and digest != expected_sha256:
            self.abort()
            raise IntegrityError(
                f"content has SHA-256 {digest}, expected {expected_sha256}", where="blob store"
            )
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.store.publish(self.tmp, digest)
        self.done = True
        return digest, self.size

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.fh.close()
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.abort()


STALE_UPLOAD_S = 600.0  # an upload that wrote nothing for this long was cut short


class BlobStore:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "sha256").mkdir(exist_ok=True, mode=0o700)

    def clean_temporary(self, *, older_than_s: float = STALE_UPLOAD_S) -> int:
        """Remove temporary files left by a crash: those not written for `older_than_s` seconds (an
        upload in progress, perhaps another server's on a shared store, keeps touching its file)."""
        removed = 0
        cutoff = time.time() - older_than_s
        for path in self.tmp_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:  # finished (published or aborted) meanwhile
                continue
        return removed

    def path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def publish(self, tmp: Path, sha256: str) -> Path:
        """Move a finished temporary file into place (same file system: an atomic rename)."""
        dst = self.path(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(tmp, 0o400)
        os.replace(tmp, dst)
        return dst

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def import_file(self, src: Path, *, expected_sha256: str | None = None) -> tuple[str, int]:
        """Take ownership of a finished file (an enclave output), checking its digest as it is read.

        The file is hashed, then renamed into the store when it lives on the same file system (it
        is only ever written by the enclave before this call), else copied through a writer.
        """
        sha = hashlib.sha256()
        size = 0
        with open(src, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                sha.update(chunk)
                size += len(chunk)
        digest = sha.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(
                f"file has SHA-256 {digest}, the enclave reported {expected_sha256}", where=str(src)
            )
        if size > self.max_bytes:
            raise BlobTooLarge(f"blob exceeds the {self.max_bytes}-byte limit", where=str(src))
        try:
            self.publish(Path(src), digest)
        except OSError:  # another file system: copy through a verified writer
            with open(src, "rb") as fh, self.writer() as w:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    w.write(chunk)
                w.commit(digest)
            Path(src).unlink(missing_ok=True)
        return digest, size

    def iter_bytes(self, sha256: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as fh:
            yield from iter(lambda: fh.read(chunk), b"")

    def verify(self, sha256: str) -> bool:
        """Re-hash a stored blob (storage is untrusted too: disks rot and hosts tamper)."""
        try:
            sha = hashlib.sha256()
            for chunk in self.iter_bytes(sha256):
                sha.update(chunk)
        except FileNotFoundError:
            return False
        return sha.hexdigest() == sha256
