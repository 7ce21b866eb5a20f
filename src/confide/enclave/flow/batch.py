"""Sealed batches: the only thing a dataflow engine ever handles.

Layout::

    b"CNFFLOW1" | u16 header length | header (canonical JSON) | 12-byte nonce | AES-256-GCM ciphertext

The header is visible to the engine (it routes by it) and is the AEAD's associated data, so each
field is bound to the ciphertext: ``job`` (the job id), ``kind`` (data, end, report, ticket),
``stage``, ``part`` (the source partition: the task that made it), ``bucket`` (its destination),
``seq`` (its index in the stream from ``part`` to ``bucket``) and ``last`` (set only on the end
batch that closes that stream; its payload is the stream's authenticated batch and record count).
The key is derived with HKDF from the job key, which only enclave code holds, salted with the job
id; a batch of another job fails its tag (or its job id check) and any edit to a header field
fails the tag. Headers are parsed as hostile: exact field set, types, ranges, canonical form.

Bucket assignment is a keyed PRF: keyed BLAKE2b (hashlib's, 8-byte digest) over the canonical key
encoding under a second job-derived key, so the engine sees which bucket a batch goes to but cannot
tell which key is in it. (BLAKE2b in keyed mode is a PRF by design, and 2.5x faster than HMAC-SHA256
per key here: it runs once per distinct key of every task's output.)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..encoding import canonical_json, check_fields, get_typed, parse_json_object
from .errors import FlowFormatError, FlowIntegrityError

MAGIC = b"CNFFLOW1"
NONCE_LEN = 12
TAG_LEN = 16
JOB_ID_LEN = 16
KEY_LEN = 32
MAX_HEADER = 512
MAX_INDEX = (1 << 31) - 1
MAX_BATCH = 64 << 20
KINDS = ("data", "end", "report", "ticket")
_LEN = struct.Struct(">H")


def _hkdf(job_key: bytes, job_id: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_LEN, salt=job_id, info=b"confide-flow-v1 " + label).derive(job_key)


@dataclass(frozen=True)
class Header:
    job: str  # hex job id
    kind: str
    stage: int
    part: int
    bucket: int
    seq: int
    last: bool

    def encode(self) -> bytes:
        body = canonical_json(
            {
                "job": self.job,
                "kind": self.kind,
                "stage": self.stage,
                "part": self.part,
                "bucket": self.bucket,
                "seq": self.seq,
                "last": self.last,
            }
        )
        return MAGIC + _LEN.pack(len(body)) + body

    def where(self) -> str:
        return f"stage {self.stage} partition {self.part}"


def parse_header(blob: bytes, *, where: str) -> tuple[Header, int]:
    """Parse a batch's header strictly; returns it and the offset of the nonce."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise FlowFormatError(f"a batch must be bytes, got {type(blob).__name__}", where=where)
    if len(blob) > MAX_BATCH:
        raise FlowFormatError(f"batch of {len(blob)} bytes exceeds the {MAX_BATCH}-byte limit", where=where)
    if len(blob) < len(MAGIC) + 2 or bytes(blob[: len(MAGIC)]) != MAGIC:
        raise FlowFormatError("not a Confide dataflow batch (bad magic)", where=where)
    (n,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + 2
    if n > MAX_HEADER or len(blob) < start + n + NONCE_LEN + TAG_LEN:
        raise FlowFormatError("batch header length out of range or batch truncated", where=where)
    raw = bytes(blob[start : start + n])
    obj = parse_json_object(raw, where=f"{where}: batch header")
    hw = f"{where}: batch header"
    check_fields(obj, required=("job", "kind", "stage", "part", "bucket", "seq", "last"), where=hw)
    job = get_typed(obj, "job", str, where=hw)
    if len(job) != 2 * JOB_ID_LEN or any(c not in "0123456789abcdef" for c in job):
        raise FlowFormatError("field 'job' must be 32 lowercase hex digits", where=hw)
    kind = get_typed(obj, "kind", str, where=hw)
    if kind not in KINDS:
        raise FlowFormatError(f"unknown batch kind {kind!r}", where=hw)
    ints = {}
    for name in ("stage", "part", "bucket", "seq"):
        value = get_typed(obj, name, int, where=hw)
        if not 0 <= value <= MAX_INDEX:
            raise FlowFormatError(f"field {name!r} out of range 0..{MAX_INDEX}", where=hw)
        ints[name] = value
    last = get_typed(obj, "last", bool, where=hw)
    header = Header(job, kind, ints["stage"], ints["part"], ints["bucket"], ints["seq"], last)
    if header.encode() != bytes(blob[: start + n]):
        raise FlowFormatError("batch header is not in canonical form", where=hw)
    return header, start + n


class JobKeys:
    """The keys of one job, derived from its job key (held only by enclave code)."""

    def __init__(self, job_id: bytes, job_key: bytes) -> None:
        if len(job_id) != JOB_ID_LEN or len(job_key) != KEY_LEN:
            raise ValueError("job id must be 16 bytes and job key 32 bytes")
        self.job_id = job_id
        self.job_hex = job_id.hex()
        self.job_key = job_key
        self._aead = AESGCM(_hkdf(job_key, job_id, b"batch"))
        self._prf = _hkdf(job_key, job_id, b"bucket-prf")
        self._sample = _hkdf(job_key, job_id, b"sort-sample")

    def seal(self, header: Header, payload: bytes) -> bytes:
        if header.job != self.job_hex:
            raise ValueError("header of another job")
        aad = header.encode()
        nonce = os.urandom(NONCE_LEN)
        return aad + nonce + self._aead.encrypt(nonce, payload, aad)

    def open(self, blob: bytes, *, where: str) -> tuple[Header, bytes]:
        header, off = parse_header(blob, where=where)
        if header.job != self.job_hex:
            raise FlowIntegrityError(
                f"batch of another job ({header.job}, this job is {self.job_hex}) from {header.where()}",
                where=where,
            )
        nonce = bytes(blob[off : off + NONCE_LEN])
        try:
            payload = self._aead.decrypt(nonce, bytes(blob[off + NONCE_LEN :]), bytes(blob[:off]))
        except InvalidTag:
            raise FlowIntegrityError(
                f"batch claiming {header.kind} from {header.where()} to bucket {header.bucket} seq "
                f"{header.seq} failed authentication (forged, edited header, or spliced)",
                where=where,
            ) from None
        return header, payload

    def sample_seed(self, stage: int, part: int) -> bytes:
        """The seed of a range sort's sampling in task (stage, part): fixed per job and task, so a
        re-run of the task samples the same keys, and unknown to the engine."""
        return hmac.digest(self._sample, f"{stage}:{part}".encode(), "sha256")

    def bucket_of(self, key_json: str, buckets: int) -> int:
        return prf_buckets(self._prf, [key_json.encode("utf-8")], buckets)[0]

    def buckets_of(self, key_jsons: Iterable[bytes], buckets: int) -> list[int]:
        return prf_buckets(self._prf, key_jsons, buckets)


def prf_buckets(key: bytes, key_jsons: Iterable[bytes], buckets: int) -> list[int]:
    """Which of `buckets` each canonical key encoding (UTF-8) goes to under the PRF key `key`."""
    b2, from_bytes = hashlib.blake2b, int.from_bytes
    return [from_bytes(b2(k, key=key, digest_size=8).digest(), "big") % buckets for k in key_jsons]
