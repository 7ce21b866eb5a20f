"""Sealed files: a chunked AES-256-GCM stream with an authenticated header.

Layout::

    b"CNFSEAL1" | u32 header length | header (canonical JSON) | 32-byte header MAC | chunk 0 | chunk 1 | ...

The header holds the format version, chunk size, a random file id, free-form metadata and the
file's data key wrapped (HPKE, RFC 9180) to each recipient, bound to the file id. From the data key
HKDF derives a header-MAC key and a chunk key (salted with the file id, so keys are per file). Chunk i
is ``AES-256-GCM(chunk key, nonce = i as u64 || final flag || 000, aad = SHA-256(header))``:

- a flipped bit anywhere fails that chunk's tag or the header MAC;
- reordering changes the index in the nonce; truncation at a chunk boundary leaves a last chunk
  whose final flag is 0; data after the final chunk is rejected;
- a chunk spliced from another file was made under another key and another header digest;
- the wrong recipient finds no wrapped key for its fingerprint, and a forged one does not open.

Memory is constant (two chunk buffers) whatever the file size; chunk i can be read on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import hpke_box
from .encoding import b64d, b64e, canonical_json, check_fields, get_typed, parse_json_object
from .errors import ConfideError, FormatError, IntegrityError, KeyMismatchError
from .keys import Identity, PublicIdentity

MAGIC = b"CNFSEAL1"
VERSION = 1
TAG_LEN = 16
MAC_LEN = 32
KEY_LEN = 32
FILE_ID_LEN = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 64 << 20
MAX_HEADER_LEN = 1 << 20
MAX_RECIPIENTS = 256
WRAP_PURPOSE = "sealed-file-key"

Progress = Callable[[int], None]
ReadStream = io.RawIOBase | io.BufferedIOBase  # anything with readinto and seek: files, BytesIO


def _derive(data_key: bytes, file_id: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_LEN, salt=file_id, info=b"confide-sealed-file-v1 " + label).derive(
        data_key
    )


def _nonce(index: int, final: bool) -> bytes:
    return struct.pack(">QB3x", index, 1 if final else 0)


@dataclass(frozen=True)
class SealedHeader:
    chunk_size: int
    file_id: bytes
    metadata: dict[str, Any]
    wrapped_keys: dict[str, bytes]  # recipient fingerprint -> HPKE-wrapped data key
    raw: bytes  # magic | length | header JSON: what the MAC and every chunk's AAD cover

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    @property
    def recipients(self) -> list[str]:
        return sorted(self.wrapped_keys)

    @property
    def body_offset(self) -> int:
        return len(self.raw) + MAC_LEN


def _encode_header(
    chunk_size: int, file_id: bytes, metadata: Mapping[str, Any], wrapped: Mapping[str, bytes]
) -> bytes:
    body = canonical_json(
        {
            "version": VERSION,
            "alg": "AES-256-GCM",
            "chunk_size": chunk_size,
            "file_id": b64e(file_id),
            "metadata": dict(metadata),
            "recipients": [{"fp": fp, "wrapped_key": b64e(w)} for fp, w in sorted(wrapped.items())],
        }
    )
    if len(body) > MAX_HEADER_LEN:
        raise FormatError(f"header too large ({len(body)} bytes; metadata too big?)")
    return MAGIC + struct.pack(">I", len(body)) + body


def _fill_buffer(src: ReadStream, buf: bytearray | memoryview) -> int:
    """Read until `buf` is full or the stream ends; returns the byte count."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_exact(src: ReadStream, n: int) -> bytes:
    """Up to `n` bytes: fewer only at end of file (unbuffered files may return short reads)."""
    buf = bytearray(n)
    return bytes(buf[: _fill_buffer(src, buf)])


def read_header(src: ReadStream, *, where: str) -> SealedHeader:
    """Parse (but not yet authenticate) the header of a sealed file. `src` is positioned at 0."""
    prefix = _read_exact(src, len(MAGIC) + 4)
    if len(prefix) < len(MAGIC) + 4 or not prefix.startswith(MAGIC):
        raise FormatError("not a Confide sealed file (bad magic)", where=where)
    (length,) = struct.unpack(">I", prefix[len(MAGIC) :])
    if length > MAX_HEADER_LEN:
        raise FormatError(f"header length {length} exceeds the {MAX_HEADER_LEN}-byte limit", where=where)
    body = _read_exact(src, length)
    if len(body) != length:
        raise FormatError("file ends inside the header (truncated)", where=where)
    hw = f"{where}: header"
    obj = parse_json_object(body, where=hw)
    check_fields(
        obj, required=("version", "alg", "chunk_size", "file_id", "metadata", "recipients"), where=hw
    )
    if obj["version"] != VERSION:
        raise FormatError(
            f"unsupported format version {obj['version']!r} (this build reads {VERSION})", where=hw
        )
    if obj["alg"] != "AES-256-GCM":
        raise FormatError(f"unsupported algorithm {obj['alg']!r}", where=hw)
    chunk_size = get_typed(obj, "chunk_size", int, where=hw)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk_size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}", where=hw)
    file_id = b64d(obj["file_id"], field="file_id", where=hw, length=FILE_ID_LEN)
    metadata = get_typed(obj, "metadata", dict, where=hw)
    recipients = get_typed(obj, "recipients", list, where=hw)
    if len(recipients) > MAX_RECIPIENTS:
        raise FormatError(f"more than {MAX_RECIPIENTS} recipients", where=hw)
    wrapped: dict[str, bytes] = {}
    for i, entry in enumerate(recipients):
        rw = f"{hw}.recipients[{i}]"
        if not isinstance(entry, dict):
            raise FormatError("recipient entry must be an object", where=rw)
        check_fields(entry, required=("fp", "wrapped_key"), where=rw)
        fp = get_typed(entry, "fp", str, where=rw)
        if fp in wrapped:
            raise FormatError(f"recipient {fp} listed twice", where=rw)
        wrapped[fp] = b64d(entry["wrapped_key"], field="wrapped_key", where=rw)
    return SealedHeader(chunk_size, file_id, metadata, wrapped, prefix + body)


class SealedWriter:
    """Streaming writer. Holds back one chunk so that the last one can carry the final flag."""

    def __init__(
        self,
        dst: BinaryIO,
        *,
        recipients: Sequence[PublicIdentity] = (),
        data_key: bytes | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if not recipients and data_key is None:
            raise ValueError("a sealed file needs at least one recipient or an explicit data key")
        self.data_key = data_key if data_key is not None else AESGCM.generate_key(256)
        self.file_id = os.urandom(FILE_ID_LEN)
        wrapped = {
            r.fingerprint: hpke_box.seal(self.data_key, r.kem_key, WRAP_PURPOSE, file_id=self.file_id.hex())
            for r in recipients
        }
        raw = _encode_header(chunk_size, self.file_id, metadata or {}, wrapped)
        self.header = SealedHeader(chunk_size, self.file_id, dict(metadata or {}), wrapped, raw)
        mac = hmac.new(_derive(self.data_key, self.file_id, b"header-mac"), raw, hashlib.sha256).digest()
        self._aead = AESGCM(_derive(self.data_key, self.file_id, b"chunks"))
        self._aad = self.header.digest
        self._dst = dst
        self._chunk = chunk_size
        self._pending = bytearray(
            chunk_size
        )  # the held-back chunk: full ones are emitted only when more data comes
        self._fill = 0
        self._out = bytearray(chunk_size + TAG_LEN)
        self._index = 0
        self._closed = False
        self.plaintext_bytes = 0
        dst.write(raw + mac)

    def _emit(self, data: bytes | bytearray | memoryview, final: bool) -> None:
        n = len(data)
        out = memoryview(self._out)[: n + TAG_LEN]
        self._aead.encrypt_into(_nonce(self._index, final), data, self._aad, out)
        self._dst.write(out)
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("write to a closed SealedWriter")
        self.plaintext_bytes += len(data)
        view = memoryview(data).cast("B")
        if self._fill == 0 and len(view) > self._chunk:
            # fast path: encrypt whole chunks straight from the caller's buffer, hold back the tail
            whole = (len(view) - 1) // self._chunk * self._chunk
            for off in range(0, whole, self._chunk):
                self._emit(view[off : off + self._chunk], final=False)
            view = view[whole:]
        if len(view) and not self._pending:
            self._pending = bytearray(self._chunk)
        while len(view):
            if self._fill == self._chunk:  # more data follows the held-back chunk: it is not the final one
                self._emit(self._pending, final=False)
                self._fill = 0
            take = min(len(view), self._chunk - self._fill)
            self._pending[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]

    def write_chunks_from(self, src: ReadStream, progress: Progress | None = None) -> None:
        """Encrypt everything readable from `src` with two alternating buffers and no extra copy."""
        if self._fill:
            raise ValueError("write_chunks_from needs an empty writer")
        bufs = (bytearray(self._chunk), bytearray(self._chunk))
        n = _fill_buffer(src, bufs[0])
        current = 0
        while True:
            following = 1 - current
            m = _fill_buffer(src, bufs[following]) if n == self._chunk else 0
            self._emit(memoryview(bufs[current])[:n], final=m == 0)
            self.plaintext_bytes += n
            if progress:
                progress(n)
            if m == 0:
                self._closed = True
                return
            current, n = following, m

    def close(self) -> None:
        if not self._closed:
            self._emit(memoryview(self._pending)[: self._fill], final=True)
            self._closed = True

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


class SealedReader:
    """Reads a sealed file: parse header, unlock with an identity or a data key, then read chunks."""

    def __init__(self, src: ReadStream, *, where: str = "sealed file") -> None:
        self.where = where
        self._src = src
        src.seek(0)
        self.header = read_header(src, where=where)
        mac = _read_exact(src, MAC_LEN)
        if len(mac) != MAC_LEN:
            raise FormatError("file ends inside the header MAC (truncated)", where=where)
        self._mac = mac
        end = src.seek(0, os.SEEK_END)
        body = end - self.header.body_offset
        stride = self.header.chunk_size + TAG_LEN
        if body < TAG_LEN:
            raise IntegrityError("file is truncated: no final chunk", where=where)
        self.n_chunks = (body + stride - 1) // stride
        last = body - (self.n_chunks - 1) * stride
        if last < TAG_LEN:
            raise IntegrityError("file is truncated inside a chunk tag", where=where)
        self.plaintext_size = body - self.n_chunks * TAG_LEN
        self._aead: AESGCM | None = None
        self._pos = end
        self._pins: list[bytes] | None = None

    # ---- keys --------------------------------------------------------------------------------
    def unwrap_key(self, identity: Identity) -> bytes:
        fp = identity.fingerprint
        wrapped = self.header.wrapped_keys.get(fp)
        if wrapped is None:
            listed = ", ".join(self.header.recipients) or "none"
            raise KeyMismatchError(
                f"file is not addressed to identity {fp} (recipients: {listed})", where=self.where
            )
        return hpke_box.open_sealed(
            wrapped,
            identity.kem_key,
            WRAP_PURPOSE,
            where=f"{self.where}: wrapped key for {fp}",
            file_id=self.header.file_id.hex(),
        )

    def unlock(self, *, identity: Identity | None = None, data_key: bytes | None = None) -> SealedReader:
        if data_key is None:
            if identity is None:
                raise ValueError("unlock needs an identity or a data key")
            data_key = self.unwrap_key(identity)
        if len(data_key) != KEY_LEN:
            raise KeyMismatchError(f"data key must be {KEY_LEN} bytes", where=self.where)
        fid = self.header.file_id
        expect = hmac.new(_derive(data_key, fid, b"header-mac"), self.header.raw, hashlib.sha256).digest()
        if not hmac.compare_digest(expect, self._mac):
            raise IntegrityError(
                "header authentication failed (tampered header or wrong data key)", where=self.where
            )
        self._aead = AESGCM(_derive(data_key, fid, b"chunks"))
        self.data_key = data_key
        return self

    # ---- chunks --------------------------------------------------------------------------------
    def pin_chunks(self, digests: Sequence[bytes]) -> None:
        """From now on each chunk read must have this SHA-256 of its ciphertext (recorded by a pass
        over the file whose whole digest was checked, model_stream.py): a file changed after that
        pass fails even where the change is a valid chunk under the same key."""
        if len(digests) != self.n_chunks or any(len(d) != 32 for d in digests):
            raise ValueError(f"pin_chunks needs {self.n_chunks} SHA-256 digests")
        self._pins = list(digests)

    def _chunk_len(self, index: int) -> int:
        if index == self.n_chunks - 1:
            return self.plaintext_size - index * self.header.chunk_size + TAG_LEN
        return self.header.chunk_size + TAG_LEN

    def read_chunk_into(self, index: int, buf: bytearray, cbuf: bytearray) -> memoryview:
        """Decrypt chunk `index` using caller-provided buffers; returns a view of the plaintext."""
        if self._aead is None:
            raise ValueError("unlock() the reader first")
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} out of range 0..{self.n_chunks - 1}")
        n = self._chunk_len(index)
        offset = self.header.body_offset + index * (self.header.chunk_size + TAG_LEN)
        if offset != self._pos:
            self._src.seek(offset)
        cview = memoryview(cbuf)[:n]
        got = _fill_buffer(self._src, cview)
        self._pos = offset + got
        if got != n:
            raise IntegrityError(f"chunk {index} is short (file changed while reading?)", where=self.where)
        if self._pins is not None and not hmac.compare_digest(
            hashlib.sha256(cview).digest(), self._pins[index]
        ):
            raise IntegrityError(
                f"chunk {index} of {self.n_chunks} is not the ciphertext whose digest was checked before "
                "the run (the file changed after the check)",
                where=self.where,
            )
        out = memoryview(buf)[: n - TAG_LEN]
        final = index == self.n_chunks - 1
        try:
            self._aead.decrypt_into(_nonce(index, final), cview, self.header.digest, out)
        except InvalidTag:
            raise IntegrityError(self._explain(index, cview, final), where=self.where) from None
        return out

    def _explain(self, index: int, data: memoryview, final: bool) -> str:
        assert self._aead is not None
        if final:
            try:
                self._aead.decrypt(_nonce(index, False), bytes(data), self.header.digest)
                return f"file is truncated: chunk {index} is the last present but not the final chunk"
            except InvalidTag:
                pass
        else:
            try:
                self._aead.decrypt(_nonce(index, True), bytes(data), self.header.digest)
                return f"data follows the final chunk (chunk {index}): appended or spliced data"
            except InvalidTag:
                pass
        return (
            f"chunk {index} of {self.n_chunks} failed authentication "
            "(modified, reordered, or spliced from another file)"
        )

    def read_chunk(self, index: int) -> bytes:
        size = self.header.chunk_size + TAG_LEN
        return bytes(self.read_chunk_into(index, bytearray(size), bytearray(size)))

    def iter_chunks(self) -> Iterator[memoryview]:
        """Yields views into a reused buffer: consume each before asking for the next."""
        size = self.header.chunk_size + TAG_LEN
        buf, cbuf = bytearray(size), bytearray(size)
        for i in range(self.n_chunks):
            yield self.read_chunk_into(i, buf, cbuf)

    def decrypt_to(self, dst: BinaryIO, progress: Progress | None = None) -> int:
        total = 0
        for chunk in self.iter_chunks():
            dst.write(chunk)
            total += len(chunk)
            if progress:
                progress(len(chunk))
        return total


# ---- atomic files (the enclave's outputs and state; parties' whole-file helpers: client/sealing.py)


def create_partial(path: Path) -> tuple[Path, BinaryIO]:
    """A new private temporary file beside `path`, to be renamed onto it once complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfideError(f"cannot create output ({exc.strerror})", where=str(path)) from None
    return tmp, os.fdopen(fd, "wb")


def write_atomically(path: Path, fill: Callable[[BinaryIO], Any]) -> Any:
    """Write `path` via a temporary file in the same directory; on any failure nothing is left behind
    (no partial plaintext, and an existing file at `path` stays as it was)."""
    path = Path(path)
    tmp, out = create_partial(path)
    try:
        with out as fh:
            result = fill(fh)
        os.replace(tmp, path)
        return result
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
