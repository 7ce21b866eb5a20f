"""A sort over the memory budget: the sorting task's external merge sort and the routing task's
streaming.

A sorting task whose batches exceed half the budget forms sorted runs of about a quarter of the
budget as it opens them (`_SortRuns`), spills each as a sealed file (`_SpillFiles`, as the keyed
spill), merges them streaming (passes first where one merge cannot read every run within a quarter
of the budget) and feeds the merged records a quarter of the budget at a time to sandboxed runs of
what follows the sort in its stage (`run_sort_spilled`). A sort's routing task over the budget first
opens every stream's end batch and then its sample, then routes the pairs piece by piece
(`run_routing_streamed`); nothing spills. Each piece is one sandboxed run (`run_piece`).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..sandbox import make_input_memfd
from ..sealed_file import MIN_CHUNK_SIZE, TAG_LEN
from . import driver
from .batch import Header, parse_header
from .emitter import _Emitter
from .errors import FlowIntegrityError, FlowTaskError
from .padding import COUNT
from .plan import Stage
from .spill import _not_per_piece, _SpillFiles, over_budget

if TYPE_CHECKING:
    from .task import FlowEnclave, _Job


def run_sort_spilled(
    enclave: FlowEnclave,
    job: _Job,
    st: Stage,
    partition: int,
    batches: Sequence[bytes],
    report: dict[str, Any],
    out_dir: str | None,
    incoming: int,
    where: str,
) -> list[tuple[int, bytes]]:
    """A sorting task over the budget, sorted externally (_SortRuns): sorted runs are formed and
    spilled as the batches are opened, then merged, and the merged records are fed about a
    quarter of the budget at a time to sandboxed runs of what follows the sort in this stage,
    whose output is sealed as it comes. The sort keys are those the map side's key_by computed
    in its sandbox: forming and merging runs compares those decoded values here, and runs no
    user code; the operators after the sort run in the sandbox as before, once per piece."""
    budget = enclave.memory_budget
    assert budget is not None
    tail = list(st.chain[1:])
    op = _not_per_piece(tail, st)  # per piece = per partition only for per-record operators
    if op is not None:
        raise over_budget(
            incoming, budget, f"its sort is followed by {op}, which needs the whole partition at once", where
        )
    sorter = _SortRuns(enclave, job, st, partition, budget, incoming, where)
    try:
        _, consumed, n_in = enclave._check_batches(job, st, partition, batches, where, sink=sorter.add)
        report["consumed"] = consumed
        report["records_in"] = n_in
        emitter = _Emitter(enclave, job, st, partition, out_dir, where)
        try:
            held, pieces = sorter.held, 0
            piece: list[Any] = []
            per_piece = max(1, budget // 4 // sorter.mean_record)
            for entry in sorter.merge():
                piece.append(entry[5])
                if len(piece) >= per_piece:
                    held = max(held, run_piece(enclave, job, st, _framed(piece), tail, emitter, where))
                    pieces += 1
                    piece = []
            if piece or not pieces:
                held = max(held, run_piece(enclave, job, st, _framed(piece), tail, emitter, where))
                pieces += 1
            outputs = emitter.finish(report)
        finally:
            emitter.abort()
        enclave.last_task = {
            "held_bytes": held + sorter.merge_held,
            "subpartitions": pieces,
            "spilled_bytes": sorter.files.written,
            "runs": sorter.first_runs,
            "merge_passes": sorter.passes,
            "spill_files": len(sorter.files.sizes),
            "spill_file_bytes": sum(sorter.files.sizes),
        }
        return outputs
    finally:
        sorter.remove()


def run_routing_streamed(
    enclave: FlowEnclave,
    job: _Job,
    st: Stage,
    partition: int,
    batches: Sequence[bytes],
    report: dict[str, Any],
    out_dir: str | None,
    incoming: int,
    where: str,
) -> list[tuple[int, bytes]]:
    """A sort's routing task over the budget. Routing is per record (each pair to the range its
    key falls in), but the boundaries depend on every map task's sample, the last data batch of
    its stream: so first, for each stream, its end batch is opened (its authenticated header
    counts the stream's data batches) and then its last data batch, the sample; then every
    batch is checked as usual and the pairs are routed about a quarter of the budget at a time,
    each piece in one sandboxed run that computes the same boundaries from the same samples.
    Nothing spills."""
    budget = enclave.memory_budget
    assert budget is not None
    plan = job.plan
    (k,) = st.parents
    ends: dict[int, int] = {}  # source task -> index of its end batch
    data: dict[tuple[int, int], int] = {}  # (source task, seq) -> index of that data batch
    for i, blob in enumerate(batches):
        h, _ = parse_header(blob, where=f"{where}: batch {i}")
        if h.stage == k and h.bucket == partition and h.kind == "end":
            ends.setdefault(h.part, i)
        elif h.stage == k and h.bucket == partition and h.kind == "data":
            data.setdefault((h.part, h.seq), i)
    samples: list[bytes] = []
    sample_seq: dict[int, int] = {}  # source task -> the seq of its sample batch
    for p in plan.expected_sources(k, partition):
        src = f"stream from stage {k} partition {p}"
        if p not in ends:
            raise FlowIntegrityError(
                f"no end batch from stage {k} partition {p} (its shuffle blocks were dropped)",
                where=where,
            )
        end, _ = job.keys.open(batches[ends[p]], where=f"{where}: batch {ends[p]}")
        at = data.get((p, end.seq - 1))
        if at is None:
            raise FlowIntegrityError(
                f"{src}: no sample batch (its last data batch, seq {end.seq - 1}: dropped or moved)",
                where=where,
            )
        header, payload = job.keys.open(batches[at], where=f"{where}: batch {at}")
        if (
            (end.kind, end.stage, end.part, end.bucket) != ("end", k, p, partition)
            or (header.kind, header.stage, header.part, header.bucket) != ("data", k, p, partition)
            or header.last
            or len(payload) < COUNT.size
        ):
            raise FlowIntegrityError(f"{src}: malformed sample or end batch", where=where)
        samples.append(payload[COUNT.size :].rstrip(b" "))
        sample_seq[p] = header.seq
    framed_samples = b"".join(driver.FRAME.pack(len(f)) + f for f in samples)
    if len(framed_samples) > budget // 2:
        raise FlowTaskError(
            f"the sort's samples ({len(framed_samples)} bytes) are over half the worker's memory "
            f"budget of {budget} bytes: give the sort fewer ranges or the worker more memory",
            where=where,
        )
    # a piece, its routed output (the same records, each with its bucket) and the samples
    emitter = _Emitter(enclave, job, st, partition, out_dir, where)
    try:
        pieces = Pieces(
            enclave, job, st, emitter, where, (budget - len(framed_samples)) // 4, [], framed_samples
        )

        def feed(parent: int, header: Header, payload: bytes, count: int) -> None:
            if sample_seq.get(header.part) != header.seq:  # not that stream's sample (checked below)
                pieces.add(payload)

        _, consumed, n_in = enclave._check_batches(job, st, partition, batches, where, sink=feed)
        for p, seq in sample_seq.items():
            if consumed.get(str(k), {}).get(str(p), [None])[0] != seq + 1:
                raise FlowIntegrityError(
                    f"stream from stage {k} partition {p}: its sample is not its last data batch",
                    where=where,
                )
        pieces.finish()
        report["consumed"] = consumed
        report["records_in"] = n_in
        outputs = emitter.finish(report)
    finally:
        emitter.abort()
    enclave.last_task = {"held_bytes": pieces.held, "subpartitions": pieces.runs, "spilled_bytes": 0}
    return outputs


class Pieces:
    """A streamed task's records (encoded batch payloads, in order) cut into pieces of about
    `piece_bytes`, each run through `chain` in one sandboxed run (run_piece) as it fills, its output
    to `emitter`; `finish` runs the last (or the only, empty, one). `held`: the most one run was
    given and gave back."""

    def __init__(
        self,
        enclave: FlowEnclave,
        job: _Job,
        st: Stage,
        emitter: _Emitter,
        where: str,
        piece_bytes: int,
        chain: Sequence[dict[str, Any]],
        samples: bytes | None = None,
    ) -> None:
        self.enclave, self.job, self.st, self.emitter, self.where = enclave, job, st, emitter, where
        self.piece_bytes, self.chain, self.samples = max(1, piece_bytes), chain, samples
        self.piece: list[bytes] = []
        self.size = self.held = self.runs = 0

    def add(self, payload: bytes) -> None:
        if self.piece and self.size + len(payload) > self.piece_bytes:
            self._flush()
        self.piece.append(payload)
        self.size += len(payload)

    def finish(self) -> None:
        if self.piece or not self.runs:
            self._flush()

    def _flush(self) -> None:
        framed = b"".join(driver.FRAME.pack(len(f)) + f for f in self.piece)
        self.piece, self.size = [], 0
        held = run_piece(
            self.enclave, self.job, self.st, framed, self.chain, self.emitter, self.where, self.samples
        )
        self.held = max(self.held, held)
        self.runs += 1


def run_piece(
    enclave: FlowEnclave,
    job: _Job,
    st: Stage,
    framed: bytes,
    chain: Sequence[dict[str, Any]],
    emitter: _Emitter,
    where: str,
    samples: bytes | None = None,
) -> int:
    """One sandboxed run of `chain` over one piece of a streamed task, its output to `emitter`;
    returns the decrypted bytes the run was given and gave back."""
    fds = {"in0": make_input_memfd(framed, name="confide-flow-in0")}
    specs: list[dict[str, Any]] = [{"name": "in0", "kind": "frames"}]
    if samples is not None:
        fds["samples"] = make_input_memfd(samples, name="confide-flow-samples")
        specs.append({"name": "samples", "kind": "samples"})
    try:
        out = enclave._run_driver(job, st, specs, fds, where, chain)
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    emitter.add(out)
    return len(framed) + len(samples or b"") + len(out)


def _framed(records: list[Any]) -> bytes:
    """Encoded records as one frame of the driver's input."""
    frame = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode()
    return driver.FRAME.pack(len(frame)) + frame


class _SortRuns:
    """A sorting task's partition over the memory budget, sorted externally: records (the routed
    (key, record) pairs) are gathered as their batches are opened into runs of about a quarter of
    the budget, each sorted and written as a sealed spill file (lines of about a chunk, each a JSON
    array of entries [parent, source task, batch, position, key, record]: the key as the map
    side's key_by computed it); merge() streams them back in order. Runs beyond what one merge
    reads within a quarter of the budget are merged in passes first. Ties: every record's origin
    (parent, source task, batch, position) is part of its sort key, so the order is exactly that of
    a stable sort of the records in stream order (what the unbudgeted task does), whatever order
    the engine delivered the streams in."""

    def __init__(
        self,
        enclave: FlowEnclave,
        job: _Job,
        st: Stage,
        partition: int,
        budget: int,
        incoming: int,
        where: str,
    ) -> None:
        self.where = where
        self.ascending = bool(st.chain[0]["ascending"])
        self.run_bytes = max(1, budget // 4)
        merge_bytes = max(1, budget // 4)
        # runs are at least 3/4 full when batches are at most 1/16 of the budget (see _Emitter)
        runs = -(-incoming * 4 // (3 * self.run_bytes)) + 1
        # a run being read holds two chunk buffers (SealedReader.iter_chunks) and one line's
        # entries: chunks small enough for one merge of every run within a quarter of the budget,
        # as far as the smallest chunk allows (below, merge passes)
        self.chunk = max(MIN_CHUNK_SIZE, min(64 << 10, merge_bytes // (3 * runs) - TAG_LEN))
        self.fan_in = max(2, merge_bytes // (3 * (self.chunk + TAG_LEN)))
        self.files = _SpillFiles(enclave, job, st, partition, where, chunk_size=self.chunk)
        self.buffer: list[tuple[Any, list[Any]]] = []
        self.buffered = 0
        self.records = 0
        self.record_bytes = 0  # encoded, all records together (their mean sizes lines and pieces)
        self.runs: list[int] = []  # the runs to merge, in order
        self.first_runs = 0
        self.next_run = 0
        self.passes = 0
        self.held = 0  # the most decrypted bytes (encoded records) held while forming runs

    def add(self, parent: int, header: Header, payload: bytes, count: int) -> None:
        """One opened batch's records (a sink of _check_batches): into the run being formed, which
        is sorted and spilled first if they would take it over a quarter of the budget."""
        if self.buffer and self.buffered + len(payload) > self.run_bytes:
            self._spill_run()
        try:
            records = json.loads(payload)
        except (ValueError, RecursionError):
            raise FlowIntegrityError("a batch's records are not valid JSON", where=self.where) from None
        if not isinstance(records, list):
            raise FlowIntegrityError("a batch's records are not a list", where=self.where)
        for pos, rec in enumerate(records):
            if not (isinstance(rec, list) and len(rec) == 2):
                raise FlowTaskError("sort_by's records are not (key, record) pairs", where=self.where)
            entry = [parent, header.part, header.seq, pos, rec[0], rec[1]]
            self.buffer.append((self._key(entry), entry))
        self.records += len(records)
        self.record_bytes += len(payload)
        self.buffered += len(payload)
        self.held = max(self.held, self.buffered)

    @property
    def mean_record(self) -> int:
        return max(1, self.record_bytes // max(1, self.records))

    def _key(self, entry: list[Any]) -> tuple[Any, tuple[int, ...]]:
        """(the decoded key, the origin): ascending, ties in stream order; descending (the merge and
        the run sorts reverse it), ties still in stream order, by the negated origin."""
        try:
            key = driver.dec(entry[4])
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError, IndexError):
            raise FlowTaskError("a sort key is not a record value", where=self.where) from None
        if self.ascending:
            return key, (entry[0], entry[1], entry[2], entry[3])
        return key, (-entry[0], -entry[1], -entry[2], -entry[3])

    def _writer(self) -> Callable[[list[Any] | None], None]:
        """Appends entries to a new run, a line of about a chunk at a time; None ends the run."""
        slot = ("run", self.next_run, 0)
        self.runs.append(self.next_run)
        self.next_run += 1
        per_line = max(1, self.chunk // self.mean_record)
        line: list[list[Any]] = []

        def put(entry: list[Any] | None) -> None:
            if entry is not None:
                line.append(entry)
            if line and (entry is None or len(line) >= per_line):
                self.files.write(
                    slot, json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                )
                line.clear()
            if entry is None:
                self.files.seal(slot)

        return put

    def _spill_run(self) -> None:
        if not self.buffer:
            return
        try:
            self.buffer.sort(key=lambda t: t[0], reverse=not self.ascending)
        except TypeError:
            raise _uncomparable(self.where) from None
        put = self._writer()
        for _, entry in self.buffer:
            put(entry)
        put(None)
        self.first_runs += 1
        self.buffer, self.buffered = [], 0

    def _read(self, run: int) -> Iterator[tuple[Any, list[Any]]]:
        """Run `run`'s entries in order, with their sort keys; its file is checked (the slot in its
        header, every chunk's tag, its final chunk) and deleted once read."""
        slot = ("run", run, 0)
        reader = self.files.open(slot)
        pending = b""
        for chunk in reader.iter_chunks():
            lines = (pending + bytes(chunk)).split(b"\n")
            pending = lines.pop()
            for line in lines:
                try:
                    entries = json.loads(line)
                except (ValueError, RecursionError):
                    raise FlowIntegrityError(
                        "a spill run's line is not valid JSON", where=self.where
                    ) from None
                for entry in entries:
                    yield self._key(entry), entry
        if pending:
            raise FlowIntegrityError("a spill run ends inside a line", where=self.where)
        self.files.discard(slot)

    def _merged(self, runs: list[int]) -> Iterator[tuple[Any, list[Any]]]:
        return heapq.merge(*(self._read(r) for r in runs), key=lambda t: t[0], reverse=not self.ascending)

    @property
    def merge_held(self) -> int:
        """What the final merge holds: each run's chunk buffers and one line's entries."""
        return len(self.runs) * 3 * (self.chunk + TAG_LEN)

    def merge(self) -> Iterator[list[Any]]:
        """Every record's entry in sorted order, the runs merged streaming."""
        self._spill_run()
        try:
            while len(self.runs) > self.fan_in:  # a pass: each group of fan_in runs into one
                self.passes += 1
                runs, self.runs = self.runs, []
                for i in range(0, len(runs), self.fan_in):
                    group = runs[i : i + self.fan_in]
                    if len(group) == 1:
                        self.runs.append(group[0])
                        continue
                    put = self._writer()
                    for _, entry in self._merged(group):
                        put(entry)
                    put(None)
            for _, entry in self._merged(self.runs):
                yield entry
        except TypeError:
            raise _uncomparable(self.where) from None

    def remove(self) -> None:
        self.files.remove()


def _uncomparable(where: str) -> FlowTaskError:
    """Keys that do not compare: the failure the unbudgeted sort in the sandbox reports."""
    return FlowTaskError("the stage's functions failed: exception (TypeError)", where=where)
