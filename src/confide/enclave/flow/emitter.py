"""A task's output: the sandbox's (hostile) output parsed, bucketed by the keyed PRF and sealed into
batches as it comes, or written to the sink's sealed part file.

A task that runs in one sandboxed run gives the emitter its output once; a spilled or streamed task
(a keyed stage's sub-partitions, a sort's merged pieces, a routing task's pieces) once per run. At
most one batch per bucket is held in clear between pieces; a padded stream's full batches are sealed as they fill,
its last batch and its dummies at the end; a range sort's map side samples its keys here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..encoding import canonical_json
from ..keys import PublicIdentity
from ..sealed_file import SealedWriter, create_partial
from . import driver
from .batch import Header
from .errors import FlowFormatError, FlowTaskError
from .padding import COUNT, check_bound, fixed_size_json, padded_payload, padded_payloads
from .plan import Stage

if TYPE_CHECKING:
    from .task import FlowEnclave, _Job

CACHE_KEYS = 1 << 16  # keys whose bucket a task remembers; beyond, the cache starts again


def sink_file_names(name: str, part: int, attempt: str) -> str:
    """A sink task's part file: named per attempt (8 hex digits, random per task run), so two runs of
    one task (Spark's speculative execution, a retry) never write the same file; the manifest names
    the one whose report the verification accepted."""
    return f"{name}-part-{part:05d}-{attempt}.cnfseal"


def stray_part_files(out_dir: str | Path, name: str, keep: set[str]) -> list[Path]:
    """Part files of output `name` in `out_dir` that the manifest does not name (`keep`): another
    attempt's, or an earlier job's whose manifest this one replaced."""
    pattern = re.compile(rf"^{re.escape(name)}-part-\d{{5}}-[0-9a-f]{{8}}\.cnfseal$")
    return sorted(p for p in Path(out_dir).iterdir() if pattern.match(p.name) and p.name not in keep)


class _HashingFile:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        return self.fh.write(data)


class _SinkFile:
    """A sealed part file written as records come; published (renamed into place) only by close."""

    def __init__(self, recipients: Sequence[str], path: Path, metadata: dict[str, Any]) -> None:
        pubs = [PublicIdentity.from_line(r, where="job recipients") for r in recipients]
        self.path = path
        self.tmp, self.fh = create_partial(path)
        self.hashing = _HashingFile(self.fh)
        self.writer = SealedWriter(self.hashing, recipients=pubs, metadata=metadata)  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> str:
        self.writer.close()
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.hashing.sha.hexdigest()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _frames(out: bytes, where: str) -> Iterator[memoryview]:
    """The sandbox's output split into its length-prefixed frames, checked as hostile input."""
    view = memoryview(out)
    off = 0
    while off < len(view):
        if off + 4 > len(view):
            raise FlowTaskError("the sandbox's output ends inside a frame header", where=where)
        (n,) = driver.FRAME.unpack_from(view, off)
        if n > driver.MAX_FRAME or off + 4 + n > len(view):
            raise FlowTaskError("the sandbox's output has a frame of bad length", where=where)
        yield view[off + 4 : off + 4 + n]
        off += 4 + n


def _parse_output(out: bytes, *, keyed: str | None, where: str) -> list[Any]:
    """The sandbox's JSON output frames, parsed as hostile input: on a range output [bucket, record]
    pairs (keyed="range"), on a sample output [key, record] pairs."""
    items: list[Any] = []
    for frame in _frames(out, where):
        try:
            recs = json.loads(bytes(frame))
        except (ValueError, RecursionError):
            raise FlowTaskError("the sandbox's output is not valid JSON", where=where) from None
        if not isinstance(recs, list):
            raise FlowTaskError("the sandbox's output frame is not a list", where=where)
        if keyed:
            for it in recs:
                if not (isinstance(it, list) and len(it) == 2 and type(it[0]) is int):
                    raise FlowTaskError("the sandbox's keyed output is malformed", where=where)
        items.extend(recs)
    return items


def _parse_keyed(out: bytes, where: str) -> tuple[list[bytes], list[bytes]]:
    """A hash output's frames (driver.write_keyed_frame), checked as hostile input: (the records' key
    encodings, their encoded records). The records are not decoded here: their bytes (no newline in
    them, none empty) become a batch's JSON array, which the next task's driver decodes, so a record
    that is not one JSON value fails that task."""
    keys: list[bytes] = []
    recs: list[bytes] = []
    size = driver.KEYED.size
    for frame in _frames(out, where):
        if len(frame) < size:
            raise FlowTaskError("the sandbox's keyed output frame is too short", where=where)
        n, klen = driver.KEYED.unpack_from(frame)
        if size + klen > len(frame) or (n == 0) != (len(frame) == size):
            raise FlowTaskError("the sandbox's keyed output frame has bad lengths", where=where)
        if n == 0:
            continue
        ks = bytes(frame[size : size + klen]).split(b"\n")
        rs = bytes(frame[size + klen :]).split(b"\n")
        if len(ks) != n or len(rs) != n or b"" in rs:
            raise FlowTaskError(
                f"the sandbox's keyed output frame does not hold the {n} keys and records it says",
                where=where,
            )
        keys.extend(ks)
        recs.extend(rs)
    return keys, recs


_encode = driver.record_json


def _payloads(recs: list[bytes], batch_records: int) -> list[tuple[int, bytes]]:
    """An unpadded stream: (record count, payload) per batch of up to `batch_records` encoded records."""
    out = []
    for i in range(0, len(recs), batch_records):
        part = recs[i : i + batch_records]
        out.append((len(part), COUNT.pack(len(part)) + b"[" + b",".join(part) + b"]"))
    return out


class _Emitter:
    """One task's output, fed the sandbox's output in one or more pieces (one per sub-partition or
    merged piece of a spilled task, or piece of a streamed routing task): records are bucketed and
    sealed into batches as they come (a padded stream's full batches too; its last one and its
    dummies at the end), a sink's part file is written as it comes. Holds at most one batch per
    bucket in clear."""

    def __init__(
        self, enclave: FlowEnclave, job: _Job, st: Stage, partition: int, out_dir: str | None, where: str
    ) -> None:
        self.enclave, self.job, self.st, self.partition, self.where = enclave, job, st, partition, where
        self.kind = st.output.kind
        self.records = 0
        self.outputs: list[tuple[int, bytes]] = []
        self.pending: dict[int, list[bytes]] = {b: [] for b in job.plan.expected_buckets(st.id, partition)}
        self.seq = dict.fromkeys(self.pending, 0)
        self.counts = dict.fromkeys(self.pending, 0)
        self.cache: dict[bytes, int] = {}
        self.limit = enclave.batch_records  # records per unpadded batch (see add)
        self.sink: _SinkFile | None = None
        self.sample_keys: list[Any] = []  # a range sort's map side: a reservoir of encoded keys
        self.sample_seen = 0
        self.rng = random.Random(job.keys.sample_seed(st.id, partition))
        if self.kind == "sink":
            if out_dir is None:
                raise FlowFormatError("the engine gave no output directory for a sink task", where=where)
            name = st.output.sink_name
            meta = {"confide_flow": {"job": job.plan.job_id, "output": name, "part": partition}}
            fname = sink_file_names(name, partition, os.urandom(4).hex())
            self.sink = _SinkFile(job.plan.recipients, Path(out_dir) / fname, meta)
            self.sink_name = fname

    def add(self, out: bytes) -> None:
        if self.kind == "hash":
            self._add_keyed(*_parse_keyed(out, self.where), len(out))
            return
        items = _parse_output(out, keyed="range" if self.kind == "range" else None, where=self.where)
        self.records += len(items)
        self._set_limit(len(items), len(out))
        if self.sink is not None:
            text = self.st.output.sink_format == "text"
            for x in items:
                if text:
                    if not isinstance(x, str):
                        raise FlowTaskError("a text sink got a non-text record", where=self.where)
                    self.sink.write((x + "\n").encode("utf-8"))
                else:
                    self.sink.write((_encode(x) + "\n").encode("utf-8"))
            return
        if self.kind == "sample":  # (key, record) pairs to this task's own bucket, keys sampled
            cap = self.st.output.sample
            for rec in items:
                if not (isinstance(rec, list) and len(rec) == 2):
                    raise FlowTaskError(
                        "sort_by's map side did not give (key, record) pairs", where=self.where
                    )
                self.sample_seen += 1
                if len(self.sample_keys) < cap:
                    self.sample_keys.append(rec[0])
                else:
                    j = self.rng.randrange(self.sample_seen)
                    if j < cap:
                        self.sample_keys[j] = rec[0]
                self._put(self.partition, _encode(rec).encode("utf-8"))
            return
        if self.kind == "range":  # the routing stage's [bucket, (key, record)]
            n = self.st.output.buckets
            for b, rec in items:
                if not 0 <= b < n:
                    raise FlowTaskError("the sort's routing gave a bucket out of range", where=self.where)
                self._put(b, _encode(rec).encode("utf-8"))
            return
        (only,) = self.pending
        for rec in items:
            self._put(only, _encode(rec).encode("utf-8"))

    def _set_limit(self, records: int, size: int) -> None:
        """Under a memory budget, batches of ~1/16 of it: the next task opens them."""
        budget = self.enclave.memory_budget
        if budget is not None and records:
            mean = max(1, size // records)
            self.limit = max(1, min(self.enclave.batch_records, budget // 16 // mean))

    def _add_keyed(self, keys: list[bytes], recs: list[bytes], size: int) -> None:
        """A hash output's records to their buckets by the keyed PRF, once per distinct key (the
        cache is bounded: a task's keys may all differ)."""
        self.records += len(recs)
        self._set_limit(len(recs), size)
        cache = self.cache
        if len(cache) > CACHE_KEYS:
            cache.clear()
        miss = list({k for k in keys if k not in cache})
        cache.update(zip(miss, self.job.keys.buckets_of(miss, self.st.output.buckets), strict=True))
        if self.st.output.pad is not None:
            for k, rec in zip(keys, recs, strict=True):
                self._put(cache[k], rec)
            return
        pending = self.pending  # unpadded: bucket the lot, then seal the full batches
        held = {b: len(r) for b, r in pending.items()}
        for k, rec in zip(keys, recs, strict=True):
            pending[cache[k]].append(rec)
        for b, r in pending.items():
            if len(r) > held[b]:
                self.counts[b] += len(r) - held[b]
                self._seal_full(b, r)

    def _seal_full(self, bucket: int, recs: list[bytes]) -> None:
        """Seal an unpadded bucket's full batches of `limit` records, as _put does one record at a
        time (the same batches), keeping the rest pending."""
        full = len(recs) - len(recs) % self.limit
        if full:
            for i in range(0, full, self.limit):
                self._seal(bucket, _payloads(recs[i : i + self.limit], self.enclave.batch_records))
            del recs[:full]

    def _put(self, bucket: int, rec: bytes) -> None:
        recs = self.pending[bucket]
        recs.append(rec)
        self.counts[bucket] += 1
        pad = self.st.output.pad
        if pad is None:
            if len(recs) >= self.limit:
                self._seal(bucket, _payloads(recs, self.enclave.batch_records))
                recs.clear()
        elif len(recs) >= pad.batch_records:  # a full padded batch: sealed now, the rest at the end
            check_bound(self.counts[bucket], pad, self.where)
            self._seal(bucket, [padded_payload(recs, pad, self.where)])
            recs.clear()

    def _seal(self, bucket: int, payloads: list[tuple[int, bytes]]) -> None:
        keys = self.job.keys
        for _, payload in payloads:
            header = Header(keys.job_hex, "data", self.st.id, self.partition, bucket, self.seq[bucket], False)
            self.outputs.append((bucket, keys.seal(header, payload)))
            self.seq[bucket] += 1

    def finish(self, report: dict[str, Any]) -> list[tuple[int, bytes]]:
        report["records_out"] = self.records
        if self.sink is not None:
            sha = self.sink.close()
            self.sink = None
            name = self.st.output.sink_name
            report["sink"] = {"output": name, "file": self.sink_name, "sha256": sha, "records": self.records}
            return []
        keys, pad = self.job.keys, self.st.output.pad
        for b, recs in self.pending.items():
            if self.kind != "sample" or b == self.partition:
                self._seal(
                    b,
                    padded_payloads(recs, pad, self.where, sent=self.seq[b])
                    if pad
                    else _payloads(recs, self.enclave.batch_records),
                )
            recs.clear()
            if self.kind == "sample":  # the last data batch of every stream: this task's sample
                self._seal(b, [self._sample_payload()])
                self.counts[b] += 1
            counts = {"batches": self.seq[b], "records": self.counts[b]}
            end = fixed_size_json(counts) if pad else canonical_json(counts)
            header = Header(keys.job_hex, "end", self.st.id, self.partition, b, self.seq[b], True)
            self.outputs.append((b, keys.seal(header, end)))
            report["produced"][str(b)] = [self.seq[b], self.counts[b]]
        return self.outputs

    def _sample_payload(self) -> tuple[int, bytes]:
        """One record: [this task's record count, its sampled keys]. Padded, its size is fixed by the
        sample size and the record bound, whatever the keys and counts."""
        keys = [json.dumps(k, ensure_ascii=False, separators=(",", ":")) for k in self.sample_keys]
        body = f"[[{self.sample_seen},[{','.join(keys)}]]]".encode()
        pad = self.st.output.pad
        if pad is None:
            return 1, COUNT.pack(1) + body
        if any(len(k.encode()) > pad.record_bytes for k in keys):
            raise FlowTaskError(
                f"a sort key is over the job's padded record size ({pad.record_bytes} bytes encoded)",
                where=self.where,
            )
        size = 32 + self.st.output.sample * (pad.record_bytes + 1)
        return 1, COUNT.pack(1) + body + b" " * (size - len(body))

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.discard()
            self.sink = None
