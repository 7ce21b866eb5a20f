"""Output size padding (PROTOCOL.md section 5, "Output padding"): the host sees a bucket, not a size.

An output the owners approved with ``pad`` is written, inside the enclave and before sealing, as

    data || 0x00 * k || len(data) as 16 lowercase hex digits (ASCII)

with the total (``len(data) + k + 16``) the smallest bucket that holds ``len(data) + 16`` bytes:
``"pow2"`` -> the next power of two (at least ``MIN_POW2_BUCKET``); an integer ``N`` -> the next
multiple of N; ``fixed`` (used for ``_error``, whose text is cut first) -> exactly the cap.
The trailer is text so a padded error report still reads as UTF-8.
The trailer is encrypted with the rest, so only the recipient learns the true length; the sealed
file's header metadata names the padding (``"pad": "confide-pad-v1"``, authenticated by the header
MAC under the data key). `unpad` checks the trailer and that every padding byte is zero.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

from .errors import FormatError, IntegrityError

PAD_FORMAT = "confide-pad-v1"
TRAILER = 16
MIN_POW2_BUCKET = 64
_BLOCK = 1 << 20


def check_pad(value: Any, where: str) -> str | int:
    """A manifest's ``pad`` value: ``"pow2"`` or a bucket size in bytes (16 .. 2^30)."""
    if value == "pow2":
        return "pow2"
    if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 1 << 30:
        raise FormatError('pad must be "pow2" or a bucket size in bytes (16 .. 2^30)', where=where)
    return value


def padded_size(n: int, pad: str | int) -> int:
    """The bucket for `n` data bytes (trailer included)."""
    need = n + TRAILER
    if pad == "pow2":
        return max(MIN_POW2_BUCKET, 1 << (need - 1).bit_length())
    assert isinstance(pad, int)
    return -(-need // pad) * pad


def trailer(n: int) -> bytes:
    """The last 16 bytes of a padded output: the true length."""
    return b"%016x" % n


def pad_bytes(data: bytes, total: int) -> bytes:
    """`data` padded to `total` bytes (zeros, then the length trailer)."""
    if total < len(data) + TRAILER:
        raise ValueError("bucket smaller than the data")
    return data + b"\0" * (total - len(data) - TRAILER) + trailer(len(data))


def describe_pad(pad: str | int | None) -> str:
    if pad is None:
        return "exact size visible to the host"
    if pad == "pow2":
        return "padded to a power of two (the host sees only the bucket)"
    return f"padded to a multiple of {pad} bytes (the host sees only the bucket)"


def unpad_bytes(data: bytes, *, where: str) -> bytes:
    if len(data) < TRAILER:
        raise IntegrityError("padded output shorter than its length trailer", where=where)
    n = _length(data[-TRAILER:], where)
    if n > len(data) - TRAILER or any(data[n:-TRAILER]):
        raise IntegrityError("padded output has a bad length trailer or non-zero padding", where=where)
    return data[:n]


def unpad_file(path: Path, *, where: str) -> int:
    """Strip the padding of a decrypted file in place; returns the true length."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size < TRAILER:
            raise IntegrityError("padded output shorter than its length trailer", where=where)
        fh.seek(size - TRAILER)
        n = _length(fh.read(TRAILER), where)
        if n > size - TRAILER:
            raise IntegrityError("padded output has a bad length trailer", where=where)
        _check_zeros(fh, n, size - TRAILER, where)
        fh.truncate(n)
    return n


def _length(raw: bytes, where: str) -> int:
    if len(raw) != TRAILER or not all(c in b"0123456789abcdef" for c in raw):
        raise IntegrityError("padded output has a malformed length trailer", where=where)
    return int(raw, 16)


def _check_zeros(fh: BinaryIO, start: int, end: int, where: str) -> None:
    fh.seek(start)
    left = end - start
    while left > 0:
        block = fh.read(min(_BLOCK, left))
        if not block:
            break
        if block.count(0) != len(block):
            raise IntegrityError("padded output has non-zero padding", where=where)
        left -= len(block)
