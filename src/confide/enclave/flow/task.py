"""The enclave side of a dataflow job: open the job, run its tasks, verify it is complete.

An engine (local process pool, later Spark) calls three things and handles only bytes:

- ``start_job(sealed description, input paths)`` opens the job description (sealed to this
  enclave), checks each input file against the digest it names, unwraps the input data keys, draws
  a fresh job key and returns a *ticket* (the resolved plan and the input keys, sealed under the
  job key) plus the public job graph (stages, partition counts, parents) the engine schedules by;
- ``run_task(ticket, stage, partition, batches, ...)`` checks every batch it is given (job, stage,
  bucket, order, completeness per source task against the end batch's authenticated counts),
  decrypts them into one sandboxed run of the fixed driver (driver.py) with the user's module, then
  buckets the result with the keyed PRF and seals it; it returns ``(bucket, batch)`` pairs, one end
  batch per destination stream, and a sealed task report (what it consumed and produced);
- ``finish_job(ticket, reports, out_dir)`` accepts the job only if every task of every stage
  reported exactly once and every stream a task produced was consumed whole by the task it was for
  (so every input partition was consumed exactly once and every shuffle block arrived); then it
  writes a sealed manifest for the recipients naming each output part and its SHA-256.

A job's key leaves the coordinator only to another worker whose evidence shows this same build
(backend, measurement, debug flag, as the platform's workers check each other) holding the keys the
key is sealed to; that worker in turn accepts the key only with the coordinator's evidence vouching
for exactly that grant (this job, this worker, this ciphertext): ``evidence``, ``grant``, ``accept``.

One sandboxed run per (stage, partition), or, for a task over the worker's memory budget, one per
sub-partition (a keyed stage, spilled by key), per merged piece (a sort, sorted externally) or per
piece (a sort's routing, streamed). A long-lived sandboxed child fed a stream of batches is a later
step (issue 8).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import hmac
import io
import json
import os
import random
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .. import hpke_box
from ..backend import TeeBackend
from ..encoding import canonical_json, parse_json_object
from ..keys import Identity, PublicIdentity
from ..peer import check_peer
from ..report_data import nonce_binding, report_data_for
from ..sandbox import SandboxLimits, Zygote, make_input_memfd
from ..sealed_file import (
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    TAG_LEN,
    SealedReader,
    SealedWriter,
    create_partial,
)
from . import driver
from .batch import KEY_LEN, Header, JobKeys, parse_header
from .errors import FlowFormatError, FlowIntegrityError, FlowTaskError
from .padding import check_bound, fixed_size_json, padded_payload, padded_payloads
from .plan import JobPlan, Stage, parse_plan

BATCH_RECORDS = 4096
BATCH_BYTES = 1 << 20
MAX_DESCRIPTION = 16 << 20
GRANT_PURPOSE = "confide-flow-job-key"
DRIVER_SOURCE = Path(driver.__file__).read_text(encoding="utf-8")
_COUNT = struct.Struct(">I")
_EXC = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(:|$)")


@dataclass
class _Job:
    keys: JobKeys
    plan: JobPlan
    input_keys: dict[str, bytes]
    input_chunks: dict[str, int]
    csv_names: dict[str, list[str] | None]


class _Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class _HashingFile:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _seal_for(recipients: Sequence[str], payload_lines: Any, path: Path, metadata: dict[str, Any]) -> str:
    """Write a sealed file to the recipients; returns the SHA-256 of what was written."""
    pubs = [PublicIdentity.from_line(r, where="job recipients") for r in recipients]
    tmp, fh = create_partial(path)
    try:
        with fh:
            hashing = _HashingFile(fh)
            with SealedWriter(hashing, recipients=pubs, metadata=metadata) as w:  # type: ignore[arg-type]
                for chunk in payload_lines:
                    w.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashing.sha.hexdigest()


def sink_file_names(name: str, part: int) -> str:
    return f"{name}-part-{part:05d}.cnfseal"


def manifest_name(name: str) -> str:
    return f"{name}.manifest.cnfseal"


class FlowEnclave:
    """An enclave worker for dataflow jobs. `identity` is its key pair (inputs and job descriptions
    are sealed to it); `zygote` the sandbox its user functions run in; `backend` the TEE that vouches
    for it (its evidence, and the check of other workers' evidence before a job key passes between
    them: without one this worker runs the jobs it opens itself, and grants and accepts no key)."""

    def __init__(
        self,
        identity: Identity,
        zygote: Zygote,
        *,
        backend: TeeBackend | None = None,
        limits: SandboxLimits | None = None,
        batch_records: int = BATCH_RECORDS,
        memory_budget: int | None = None,
        spill_dir: str | Path | None = None,
    ) -> None:
        self.identity = identity
        self.zygote = zygote
        self.backend = backend
        # the decrypted records a task may hold at once (like SGX's EPC): a keyed stage whose input is
        # larger spills to encrypted files in spill_dir (see _run_spilled); None: no limit
        self.memory_budget = memory_budget
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.last_task: dict[str, int] = {}  # what the last task held and spilled (tests, benchmarks)
        self._boot_evidence: bytes | None = None
        self.limits = limits or SandboxLimits(memory_bytes=256 << 20, cpu_seconds=60, wall_seconds=120.0)
        self.batch_records = batch_records
        self._jobs: dict[str, _Job] = {}

    @property
    def public_line(self) -> str:
        return self.identity.public.to_line()

    # ---- job start (coordinator) -------------------------------------------------------------------

    def start_job(self, sealed_description: bytes, inputs: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
        where = "job description"
        if len(sealed_description) > MAX_DESCRIPTION:
            raise FlowFormatError("job description too large", where=where)
        reader = SealedReader(io.BytesIO(sealed_description), where=where).unlock(identity=self.identity)
        body = b"".join(bytes(c) for c in reader.iter_chunks())
        return self.start_plan(parse_json_object(body, where=where), inputs)

    def start_plan(self, description: dict[str, Any], inputs: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
        """`start_job` for a description already inside the enclave (a platform flow task's)."""
        where = "job description"
        plan = parse_plan(description)
        if plan.job_id in self._jobs:
            raise FlowIntegrityError("this job was already started (a replayed job description)", where=where)
        input_keys: dict[str, bytes] = {}
        input_chunks: dict[str, int] = {}
        csv_names: dict[str, list[str] | None] = {}
        for name, spec in plan.inputs.items():
            iw = f"input {name!r}"
            if name not in inputs:
                raise FlowFormatError("the engine gave no path for this input", where=iw)
            with open(inputs[name], "rb", buffering=0) as fh:
                r = SealedReader(fh, where=iw)
                if r.header.digest.hex() != spec.header_sha256:
                    raise FlowIntegrityError(
                        "not the file the job description names (header digest)", where=iw
                    )
                # the owner's data key from the sealed description, or the file is sealed to this worker
                r.unlock(data_key=spec.data_key) if spec.data_key else r.unlock(identity=self.identity)
                input_keys[name] = r.data_key
                input_chunks[name] = r.n_chunks
                csv_names[name] = _csv_names(r, iw) if spec.format == "csv" and spec.csv_header else None
        keys = JobKeys(bytes.fromhex(plan.job_id), os.urandom(KEY_LEN))
        job = _Job(keys, plan, input_keys, input_chunks, csv_names)
        self._jobs[plan.job_id] = job
        ticket_body = canonical_json(
            {
                "plan": plan.raw,
                "input_keys": {k: base64.b64encode(v).decode() for k, v in input_keys.items()},
                "input_chunks": input_chunks,
                "csv_names": csv_names,
            }
        )
        ticket = keys.seal(Header(plan.job_id, "ticket", 0, 0, 0, 0, True), ticket_body)
        graph = {
            "job": plan.job_id,
            "stages": [
                {
                    "stage": st.id,
                    "partitions": st.partitions,
                    "parents": list(st.parents),
                    "source": st.source,
                    "sink": st.output.kind == "sink",
                }
                for st in plan.stages
            ],
        }
        return ticket, graph

    # ---- attestation, and key release to other workers -----------------------------------------------

    def _require_backend(self, what: str) -> TeeBackend:
        if self.backend is None:
            raise FlowIntegrityError(
                "this worker has no TEE backend to attest with: no job key passes to or from it",
                where=what,
            )
        return self.backend

    def evidence(self, nonce: bytes | None = None) -> bytes:
        """Evidence binding this worker's keys (and `nonce`, a client's fresh challenge, when given):
        what a client checks before it seals a job description to this worker, and a coordinator
        before it grants a job key to it."""
        backend = self._require_backend("evidence")
        if nonce:
            return backend.evidence(
                report_data_for(self.identity.public, nonce), extra={"flow": self.public_line}
            )
        if self._boot_evidence is None:
            self._boot_evidence = backend.evidence(
                report_data_for(self.identity.public, None), extra={"flow": self.public_line}
            )
        return self._boot_evidence

    def grant(self, ticket: bytes, worker_line: str, worker_evidence: bytes) -> tuple[bytes, bytes]:
        """The job key sealed to another worker, only if `worker_evidence` shows this same build
        holding `worker_line`'s keys; with this enclave's evidence vouching for that grant."""
        job = self._job(ticket)
        backend = self._require_backend("job key grant")
        worker = PublicIdentity.from_line(worker_line, where="worker identity")
        what = f"job key grant: the evidence of worker {worker.fingerprint}"
        if check_peer(backend, worker_evidence, what) != report_data_for(worker, None):
            raise FlowIntegrityError("the evidence does not bind this worker's keys: refused", where=what)
        measurement = backend.identity.measurement
        wrapped = hpke_box.seal(
            job.keys.job_key, worker.kem_key, GRANT_PURPOSE, job=job.keys.job_hex, measurement=measurement
        )
        vouch = backend.evidence(
            report_data_for(self.identity.public, _grant_binding(job.keys.job_hex, worker, wrapped)),
            extra={"flow": self.public_line},
        )
        return wrapped, vouch

    def accept(self, ticket: bytes, wrapped: bytes, granter_evidence: bytes) -> None:
        """Take a job key granted by a coordinator whose evidence (same build) vouches for exactly this
        grant: this job, this worker, this ciphertext."""
        backend = self._require_backend("job key grant")
        header, _ = parse_header(ticket, where="ticket")
        what = "job key grant: the granting enclave's evidence"
        report_data = check_peer(backend, granter_evidence, what)
        if report_data[32:] != nonce_binding(_grant_binding(header.job, self.identity.public, wrapped)):
            raise FlowIntegrityError(
                "the granter's evidence does not vouch for this grant (another job, worker or key): refused",
                where=what,
            )
        key = hpke_box.open_sealed(
            wrapped,
            self.identity.kem_key,
            GRANT_PURPOSE,
            where="job key grant",
            job=header.job,
            measurement=backend.identity.measurement,
        )
        keys = JobKeys(bytes.fromhex(header.job), key)
        _, body = keys.open(ticket, where="ticket")
        obj = parse_json_object(body, where="ticket")
        plan = parse_plan(obj["plan"])
        self._jobs[header.job] = _Job(
            keys,
            plan,
            {k: base64.b64decode(v) for k, v in obj["input_keys"].items()},
            dict(obj["input_chunks"]),
            dict(obj["csv_names"]),
        )

    def _job(self, ticket: bytes) -> _Job:
        header, _ = parse_header(ticket, where="ticket")
        job = self._jobs.get(header.job)
        if job is None or header.kind != "ticket":
            raise FlowIntegrityError(f"no job {header.job} is open in this enclave worker", where="ticket")
        job.keys.open(ticket, where="ticket")
        return job

    # ---- tasks -------------------------------------------------------------------------------------

    def run_task(
        self,
        ticket: bytes,
        stage: int,
        partition: int,
        batches: Sequence[bytes],
        *,
        source_path: str | None = None,
        out_dir: str | None = None,
    ) -> tuple[list[tuple[int, bytes]], bytes]:
        job = self._job(ticket)
        plan = job.plan
        if not 0 <= stage < len(plan.stages):
            raise FlowIntegrityError(f"the job has no stage {stage}", where="task")
        st = plan.stages[stage]
        where = f"stage {stage} partition {partition}"
        if not 0 <= partition < st.partitions:
            raise FlowIntegrityError(f"stage {stage} has {st.partitions} partitions", where=where)
        report: dict[str, Any] = {"stage": stage, "part": partition, "consumed": {}, "produced": {}}
        fds: dict[str, int] = {}
        specs: list[dict[str, Any]] = []
        try:
            if st.source is not None:
                if batches:
                    raise FlowIntegrityError("a source task was given batches", where=where)
                raw, c0, c1 = self._source_bytes(job, st, partition, source_path, where)
                report["source"] = {"input": st.source, "chunks": [c0, c1]}
                spec = plan.inputs[st.source]
                specs.append(
                    {
                        "name": "in0",
                        "kind": "raw",
                        "format": spec.format,
                        "skip_header": spec.csv_header and partition == 0,
                        "csv_names": job.csv_names.get(st.source),
                        "input": st.source,
                        "row_groups": [partition, st.partitions],
                    }
                )
                fds["in0"] = make_input_memfd(raw, name="confide-flow-in0")
                report["records_in"] = None
            else:
                incoming = sum(len(b) for b in batches)
                budget = self.memory_budget
                if budget is not None and incoming > budget // 2:
                    if st.chain and st.chain[0]["op"] == "sort_local":
                        run = self._run_sort_spilled
                    elif any(plan.stages[k].output.kind == "sample" for k in st.parents):
                        run = self._run_routing_streamed
                    else:
                        run = self._run_spilled
                    outputs = run(job, st, partition, batches, report, out_dir, incoming, where)
                    header = Header(plan.job_id, "report", stage, partition, 0, 0, True)
                    body = fixed_size_json(report) if plan.padded else canonical_json(report)
                    return outputs, job.keys.seal(header, body)
                samples: list[bytes] | None = None
                if any(plan.stages[k].output.kind == "sample" for k in st.parents):
                    samples = []  # a range sort's routing stage: every map task's sample batch
                frames, consumed, n_in = self._check_batches(
                    job, st, partition, batches, where, samples=samples
                )
                report["consumed"] = consumed
                report["records_in"] = n_in
                for i, data in enumerate(frames):
                    specs.append({"name": f"in{i}", "kind": "frames"})
                    fds[f"in{i}"] = make_input_memfd(data, name=f"confide-flow-in{i}")
                if samples is not None:
                    specs.append({"name": "samples", "kind": "samples"})
                    framed = b"".join(driver.FRAME.pack(len(f)) + f for f in samples)
                    fds["samples"] = make_input_memfd(framed, name="confide-flow-samples")
                self.last_task = {
                    "held_bytes": sum(len(f) for f in frames),
                    "subpartitions": 1,
                    "spilled_bytes": 0,
                }
            out = self._run_driver(job, st, specs, fds, where)
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        outputs = self._emit(job, st, partition, out, report, out_dir, where)
        header = Header(plan.job_id, "report", stage, partition, 0, 0, True)
        body = fixed_size_json(report) if plan.padded else canonical_json(report)
        return outputs, job.keys.seal(header, body)

    # ---- spilling: a keyed stage's partition larger than the memory budget -------------------------

    def _run_spilled(
        self,
        job: _Job,
        st: Stage,
        partition: int,
        batches: Sequence[bytes],
        report: dict[str, Any],
        out_dir: str | None,
        incoming: int,
        where: str,
    ) -> list[tuple[int, bytes]]:
        """Split the partition by key into sub-partitions that each fit half the budget, spilled as
        sealed files (a fresh key held only here; each file's header binds job, stage, partition,
        sub-partition and parent), then run the stage's functions once per sub-partition. Every
        record of a key lands in one sub-partition, so per-key operators (reduce, aggregate, group,
        distinct, join) give the same result, and so do per-record operators after them and a
        shuffle's map-side combiner at the end; anything else (map_partitions) would see a
        sub-partition instead of the partition and is refused before anything spills, naming the
        budget, as is a stage reading an unkeyed exchange (a union's consumer), which cannot spill
        (a sort's stages: _run_sort_spilled, _run_routing_streamed)."""
        budget = self.memory_budget
        assert budget is not None
        plan = job.plan
        keyed = [
            plan.stages[k].output.keyed if plan.stages[k].output.kind == "hash" else None for k in st.parents
        ]
        if not st.parents or None in keyed:
            raise FlowTaskError(
                f"the partition holds {incoming} bytes, over half the worker's memory budget of {budget} "
                "bytes, and this stage reads an unkeyed exchange (union, count), which cannot "
                "spill: give it more partitions or the worker more memory",
                where=where,
            )
        op = _needs_whole_partition(st, [str(k) for k in keyed])
        if op is not None:  # refused before anything spills: per sub-partition it would see a part
            raise FlowTaskError(
                f"the partition holds {incoming} bytes, over half the worker's memory budget of {budget} "
                f"bytes, and this keyed stage runs {op}, which needs the whole partition at once (a "
                "spilled stage runs once per sub-partition): give it more partitions or the worker "
                "more memory",
                where=where,
            )
        n_sub = min(4096, -(-incoming // max(1, budget // 4)))  # ~a quarter of the budget each
        spill = _Spill(self, job, st, partition, n_sub, len(st.parents), budget, where)
        try:
            route = spill.router([str(k) for k in keyed])
            _, consumed, n_in = self._check_batches(job, st, partition, batches, where, sink=route)
            report["consumed"] = consumed
            report["records_in"] = n_in
            spill.seal_all()
            emitter = _Emitter(self, job, st, partition, out_dir, where)
            try:
                held = 0
                for sub in range(n_sub):
                    parts = spill.read(sub)
                    held = max(held, sum(len(x) for x in parts))
                    fds = {
                        f"in{i}": make_input_memfd(data, name=f"confide-flow-in{i}")
                        for i, data in enumerate(parts)
                    }
                    specs = [{"name": f"in{i}", "kind": "frames"} for i in range(len(parts))]
                    try:
                        out = self._run_driver(job, st, specs, fds, where)
                    finally:
                        for fd in fds.values():
                            with contextlib.suppress(OSError):
                                os.close(fd)
                    held = max(held, len(out))
                    emitter.add(out)
                    del out, parts
                outputs = emitter.finish(report)
            finally:
                emitter.abort()
            self.last_task = {"held_bytes": held, "subpartitions": n_sub, "spilled_bytes": spill.written}
            return outputs
        finally:
            spill.remove()

    def _run_sort_spilled(
        self,
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
        budget = self.memory_budget
        assert budget is not None
        tail = list(st.chain[1:])
        for i, op in enumerate(tail):  # per piece = per partition only for per-record operators
            last = i == len(tail) - 1
            if not (
                op["op"] in _PER_RECORD_OPS
                or (op["op"] in _COMBINER_OPS and last and st.output.kind != "sink")
            ):
                raise FlowTaskError(
                    f"the partition holds {incoming} bytes, over half the worker's memory budget of "
                    f"{budget} bytes, and its sort is followed by {op['op']}, which needs the whole "
                    "partition at once: give it more partitions or the worker more memory",
                    where=where,
                )
        sorter = _SortRuns(self, job, st, partition, budget, incoming, where)
        try:
            _, consumed, n_in = self._check_batches(job, st, partition, batches, where, sink=sorter.add)
            report["consumed"] = consumed
            report["records_in"] = n_in
            emitter = _Emitter(self, job, st, partition, out_dir, where)
            try:
                held, pieces = sorter.held, 0
                piece: list[Any] = []
                per_piece = max(1, budget // 4 // sorter.mean_record)
                for entry in sorter.merge():
                    piece.append(entry[5])
                    if len(piece) >= per_piece:
                        held = max(held, self._run_piece(job, st, _framed(piece), tail, emitter, where))
                        pieces += 1
                        piece = []
                if piece or not pieces:
                    held = max(held, self._run_piece(job, st, _framed(piece), tail, emitter, where))
                    pieces += 1
                outputs = emitter.finish(report)
            finally:
                emitter.abort()
            self.last_task = {
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

    def _run_routing_streamed(
        self,
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
        budget = self.memory_budget
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
                or len(payload) < _COUNT.size
            ):
                raise FlowIntegrityError(f"{src}: malformed sample or end batch", where=where)
            samples.append(payload[_COUNT.size :].rstrip(b" "))
            sample_seq[p] = header.seq
        framed_samples = b"".join(driver.FRAME.pack(len(f)) + f for f in samples)
        if len(framed_samples) > budget // 2:
            raise FlowTaskError(
                f"the sort's samples ({len(framed_samples)} bytes) are over half the worker's memory "
                f"budget of {budget} bytes: give the sort fewer ranges or the worker more memory",
                where=where,
            )
        # a piece, its routed output (the same records, each with its bucket) and the samples
        piece_bytes = max(1, (budget - len(framed_samples)) // 4)
        emitter = _Emitter(self, job, st, partition, out_dir, where)
        try:
            held, pieces, size = 0, 0, 0
            piece: list[bytes] = []

            def flush() -> None:
                nonlocal held, pieces, size, piece
                framed = b"".join(driver.FRAME.pack(len(f)) + f for f in piece)
                piece, size = [], 0
                held = max(held, self._run_piece(job, st, framed, [], emitter, where, framed_samples))
                pieces += 1

            def feed(parent: int, header: Header, payload: bytes) -> None:
                nonlocal size
                if sample_seq.get(header.part) == header.seq:
                    return  # that stream's sample (checked below to be its last data batch)
                if piece and size + len(payload) > piece_bytes:
                    flush()
                piece.append(payload)
                size += len(payload)

            _, consumed, n_in = self._check_batches(job, st, partition, batches, where, sink=feed)
            for p, seq in sample_seq.items():
                if consumed.get(str(k), {}).get(str(p), [None])[0] != seq + 1:
                    raise FlowIntegrityError(
                        f"stream from stage {k} partition {p}: its sample is not its last data batch",
                        where=where,
                    )
            if piece or not pieces:
                flush()
            report["consumed"] = consumed
            report["records_in"] = n_in
            outputs = emitter.finish(report)
        finally:
            emitter.abort()
        self.last_task = {"held_bytes": held, "subpartitions": pieces, "spilled_bytes": 0}
        return outputs

    def _run_piece(
        self,
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
            out = self._run_driver(job, st, specs, fds, where, chain)
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        emitter.add(out)
        return len(framed) + len(samples or b"") + len(out)

    def _open_spill(self, path: Path) -> io.BufferedIOBase:
        """A spill file as it is on disk now (the host may have changed, swapped or removed it)."""
        return open(path, "rb")

    def _source_bytes(
        self, job: _Job, st: Stage, partition: int, path: str | None, where: str
    ) -> tuple[bytes, int, int]:
        """The bytes of the lines that start in this partition's chunk range (Hadoop's rule: partition
        p > 0 skips up to its first newline; every partition reads the line that starts at its end).
        A Parquet source's partition gets the whole file (its footer says where the row groups are)
        and reads only its row groups; its chunk range still names the partition in the report."""
        assert st.source is not None
        spec = job.plan.inputs[st.source]
        if path is None:
            raise FlowFormatError("the engine gave no input path for a source task", where=where)
        n = job.input_chunks[st.source]
        c0, c1 = partition * n // st.partitions, (partition + 1) * n // st.partitions
        with open(path, "rb", buffering=0) as fh:
            reader = SealedReader(fh, where=f"{where}: input {st.source!r}")
            if reader.header.digest.hex() != spec.header_sha256 or reader.n_chunks != n:
                raise FlowIntegrityError(
                    f"input {st.source!r} is not the file the job opened (swapped or resized)", where=where
                )
            reader.unlock(data_key=job.input_keys[st.source])
            if spec.format == "parquet":  # the child reads its share of the row groups from the footer
                return b"".join(reader.read_chunk(i) for i in range(n)), c0, c1
            buf = b"".join(reader.read_chunk(i) for i in range(c0, c1))
            start = 0
            if partition > 0:
                i = buf.find(b"\n")
                if i < 0:
                    return b"", c0, c1
                start = i + 1
            tail = bytearray()
            nxt = c1
            while nxt < n:
                chunk = reader.read_chunk(nxt)
                j = chunk.find(b"\n")
                if j >= 0:
                    tail += chunk[: j + 1]
                    break
                tail += chunk
                nxt += 1
            return buf[start:] + bytes(tail), c0, c1

    def _check_batches(
        self,
        job: _Job,
        st: Stage,
        bucket: int,
        batches: Sequence[bytes],
        where: str,
        sink: Callable[[int, Header, bytes], None] | None = None,
        samples: list[bytes] | None = None,
    ) -> tuple[list[bytes], dict[str, dict[str, list[int]]], int]:
        """Open and check every batch; returns one framed input per parent, what was consumed, and the
        record count. Any missing, extra, duplicated, out-of-order, foreign or forged batch fails.
        With `sink`, each data batch's records go to sink(parent index, its authenticated header,
        payload) as it is opened and nothing is kept (the framed inputs come back empty). From a
        ``sample`` parent (a range sort's map side) each stream's last data batch is its sample:
        appended to `samples` (with a sink, the sink gets it: the caller picks it out)."""
        plan = job.plan
        streams: dict[tuple[int, int], dict[str, Any]] = {}
        for k in st.parents:
            for p in plan.expected_sources(k, bucket):
                streams[(k, p)] = {"next": 0, "records": 0, "ended": False, "frames": []}
        for i, blob in enumerate(batches):
            bw = f"{where}: batch {i}"
            header, payload = job.keys.open(blob, where=bw)
            if header.kind not in ("data", "end"):
                raise FlowIntegrityError(f"a {header.kind} record was delivered as a shuffle batch", where=bw)
            if header.stage not in st.parents:
                raise FlowIntegrityError(
                    f"batch from stage {header.stage} delivered to stage {st.id}, which reads stages "
                    f"{list(st.parents)}",
                    where=where,
                )
            if header.bucket != bucket:
                raise FlowIntegrityError(
                    f"batch for partition {header.bucket} (from stage {header.stage} partition "
                    f"{header.part}) delivered to partition {bucket}: partitions swapped",
                    where=where,
                )
            s = streams.get((header.stage, header.part))
            src = f"stream from stage {header.stage} partition {header.part}"
            if s is None:
                raise FlowIntegrityError(f"{src} is not an input of this task", where=where)
            if s["ended"]:
                raise FlowIntegrityError(
                    f"{src}: batch after the end batch (replayed or duplicated)", where=where
                )
            if header.seq != s["next"]:
                what = (
                    "duplicated or replayed"
                    if header.seq < s["next"]
                    else "out of order or a batch is missing"
                )
                raise FlowIntegrityError(
                    f"{src}: batch seq {header.seq} where seq {s['next']} was due ({what})", where=where
                )
            if header.kind == "data":
                if header.last or len(payload) < _COUNT.size:
                    raise FlowIntegrityError(f"{src}: malformed data batch", where=where)
                (count,) = _COUNT.unpack_from(payload)
                s["records"] += count
                records = payload[_COUNT.size :].rstrip(b" ")  # a padded batch's filler
                if sink is not None:
                    sink(st.parents.index(header.stage), header, records)
                else:
                    s["frames"].append(records)
                s["next"] += 1
            else:
                counts = parse_json_object(payload, where=f"{where}: end batch")
                counts.pop("pad", None)
                out = plan.stages[header.stage].output
                pad = out.pad
                if pad is not None:
                    want = pad.batches
                    if out.kind == "sample":  # data only to the task's own bucket, a sample to all
                        want = (pad.batches if header.part == bucket else 0) + 1
                    if s["next"] != want:
                        raise FlowIntegrityError(
                            f"{src}: {s['next']} batches of a padded stream of {want} arrived",
                            where=where,
                        )
                if not header.last or counts != {"batches": s["next"], "records": s["records"]}:
                    raise FlowIntegrityError(
                        f"{src}: the end batch counts {counts.get('batches')} batches and "
                        f"{counts.get('records')} records, {s['next']} batches and {s['records']} records "
                        "arrived (batches dropped)",
                        where=where,
                    )
                s["ended"] = True
        consumed: dict[str, dict[str, list[int]]] = {}
        framed: list[bytes] = []
        total = 0
        for k in st.parents:
            parts: list[bytes] = []
            consumed[str(k)] = {}
            for p in plan.expected_sources(k, bucket):
                s = streams[(k, p)]
                if not s["ended"]:
                    raise FlowIntegrityError(
                        f"no end batch from stage {k} partition {p} (its shuffle blocks were dropped)",
                        where=where,
                    )
                consumed[str(k)][str(p)] = [s["next"], s["records"]]
                total += s["records"]
                if plan.stages[k].output.kind == "sample" and sink is None:
                    if samples is None or not s["frames"]:
                        raise FlowIntegrityError(
                            f"no sample batch from stage {k} partition {p} (a sort's sample)", where=where
                        )
                    samples.append(s["frames"].pop())
                parts.extend(driver.FRAME.pack(len(f)) + f for f in s["frames"])
            framed.append(b"".join(parts))
        return framed, consumed, total

    def _run_driver(
        self,
        job: _Job,
        st: Stage,
        specs: list[dict[str, Any]],
        fds: dict[str, int],
        where: str,
        chain: Sequence[dict[str, Any]] | None = None,
    ) -> bytes:
        """One sandboxed run of the driver over `fds`: the stage's operators (or `chain`: what
        follows a spilled sort's merge), its output encoded for the stage's output."""
        params = {
            "module": job.plan.module_source,
            "inputs": specs,
            "combine": st.combine,
            "how": st.how,
            "chain": list(st.chain if chain is None else chain),
            "keyed": st.output.keyed if st.output.kind == "hash" else None,
            "range": (
                {"buckets": st.output.buckets, "ascending": st.output.ascending}
                if st.output.kind == "range"
                else None
            ),
            "text": st.output.kind == "sink" and st.output.sink_format == "text",
        }
        sink = _Collect()
        result = self.zygote.run(
            DRIVER_SOURCE, params=params, inputs=fds, outputs={"out": sink}, limits=self.limits
        )
        if not result.ok:
            exc = ""
            lines = [ln for ln in result.detail.splitlines() if ln.strip()]
            if result.category == "exception" and lines:
                m = _EXC.match(lines[-1])
                exc = f" ({m.group(1)})" if m else ""
            # the detail (traceback, stdout) may carry data: it is not shown to the engine
            raise FlowTaskError(f"the stage's functions failed: {result.category}{exc}", where=where)
        return bytes(sink.data)

    def _emit(
        self,
        job: _Job,
        st: Stage,
        partition: int,
        out: bytes,
        report: dict[str, Any],
        out_dir: str | None,
        where: str,
    ) -> list[tuple[int, bytes]]:
        """Parse the sandbox's (hostile) output, bucket and seal it, or write the sink's part file."""
        emitter = _Emitter(self, job, st, partition, out_dir, where)
        try:
            emitter.add(out)
            return emitter.finish(report)
        finally:
            emitter.abort()

    def _payloads(self, recs: list[Any]) -> list[tuple[int, bytes]]:
        """An unpadded stream: (record count, payload) per batch of up to `batch_records` records."""
        out = []
        for i in range(0, len(recs), self.batch_records):
            part = recs[i : i + self.batch_records]
            payload = (
                _COUNT.pack(len(part)) + json.dumps(part, ensure_ascii=False, separators=(",", ":")).encode()
            )
            out.append((len(part), payload))
        return out

    # ---- the final verification --------------------------------------------------------------------

    def finish_job(self, ticket: bytes, reports: Sequence[bytes], out_dir: str) -> dict[str, Any]:
        job = self._job(ticket)
        plan = job.plan
        got: dict[tuple[int, int], dict[str, Any]] = {}
        for i, blob in enumerate(reports):
            header, payload = job.keys.open(blob, where=f"task report {i}")
            w = f"stage {header.stage} partition {header.part}"
            if header.kind != "report":
                raise FlowIntegrityError(f"a {header.kind} batch was given as a task report", where=w)
            rep = parse_json_object(payload, where=f"{w}: report")
            if (rep.get("stage"), rep.get("part")) != (header.stage, header.part):
                raise FlowIntegrityError("report body and header disagree", where=w)
            if (header.stage, header.part) in got:
                raise FlowIntegrityError(
                    "two reports for one task (task run twice or report replayed)", where=w
                )
            got[(header.stage, header.part)] = rep
        for st in plan.stages:
            for p in range(st.partitions):
                if (st.id, p) not in got:
                    raise FlowIntegrityError(
                        "no report: the task was not run or its report was dropped",
                        where=f"stage {st.id} partition {p}",
                    )
        extra = sorted(k for k in got if k[0] >= len(plan.stages) or k[1] >= plan.stages[k[0]].partitions)
        if extra:
            raise FlowIntegrityError(
                "report of a task the job does not have", where=f"stage {extra[0][0]} partition {extra[0][1]}"
            )
        for st in plan.stages:  # every stream produced was consumed, whole, by the task it was for
            for p in range(st.partitions):
                rep = got[(st.id, p)]
                w = f"stage {st.id} partition {p}"
                if st.source is not None:
                    n = job.input_chunks[st.source]
                    want = [p * n // st.partitions, (p + 1) * n // st.partitions]
                    if rep.get("source") != {"input": st.source, "chunks": want}:
                        raise FlowIntegrityError(
                            f"input {st.source!r} chunks {want} were not the ones read", where=w
                        )
                for k in st.parents:
                    for src in plan.expected_sources(k, p):
                        produced = got[(k, src)]["produced"].get(str(p))
                        consumed = rep["consumed"].get(str(k), {}).get(str(src))
                        if produced is None or produced != consumed:
                            raise FlowIntegrityError(
                                f"stage {k} partition {src} sent {produced} (batches, records) to this task, "
                                f"which consumed {consumed}",
                                where=w,
                            )
                if sorted(int(b) for b in rep["produced"]) != plan.expected_buckets(st.id, p):
                    raise FlowIntegrityError("the task did not close every output stream", where=w)
        outputs: dict[str, dict[str, Any]] = {}
        stages = []
        for st in plan.stages:
            reps = [got[(st.id, p)] for p in range(st.partitions)]
            stages.append(
                {
                    "stage": st.id,
                    "tasks": st.partitions,
                    "records_out": sum(r["records_out"] for r in reps),
                    "batches_out": sum(v[0] for r in reps for v in r["produced"].values()),
                }
            )
            if st.output.kind == "sink":
                outputs[st.output.sink_name] = {
                    "partitions": st.partitions,
                    "format": st.output.sink_format,
                    "files": [{"part": r["part"], **r["sink"]} for r in reps],
                }
        manifest = {"job": plan.job_id, "outputs": outputs, "stages": stages}
        for name in outputs:
            _seal_for(
                plan.recipients,
                [canonical_json({**manifest, "output": name})],
                Path(out_dir) / manifest_name(name),
                {"confide_flow": {"job": plan.job_id, "manifest": name}},
            )
        del self._jobs[plan.job_id]
        return {
            "job": plan.job_id,
            "accepted": True,
            "stages": len(plan.stages),
            "outputs": sorted(outputs),
            "counts": stages,  # per stage: tasks, records and batches out, as verified
        }


def _csv_names(reader: SealedReader, where: str) -> list[str]:
    import csv

    first = bytearray()
    for i in range(reader.n_chunks):
        chunk = reader.read_chunk(i)
        j = chunk.find(b"\n")
        first += chunk if j < 0 else chunk[:j]
        if j >= 0:
            break
    try:
        row = next(csv.reader([first.decode("utf-8").rstrip("\r")]), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FlowFormatError(f"the CSV header row cannot be read ({exc})", where=where) from None
    if len(set(row)) != len(row) or not row:
        raise FlowFormatError("the CSV header row is empty or names a column twice", where=where)
    return row


_PER_RECORD_OPS = frozenset({"map", "flat_map", "filter", "key_by"})
# a shuffle's map-side combiners: run per piece, the reduce side combines the pieces' results
_COMBINER_OPS = frozenset({"reduce_local", "aggregate_local", "group_local", "distinct_local", "count_local"})


# per-key operators: a sub-partition holding every record of its keys gives those keys' results
_PER_KEY_OPS = frozenset({"reduce_local", "aggregate_local", "group_local", "group_concat", "distinct_local"})


def _needs_whole_partition(st: Stage, keyed: list[str]) -> str | None:
    """The first operator of a keyed stage whose result per sub-partition (a spilled task runs the
    stage once per sub-partition, its records routed by the exchange's key) could differ from its
    result over the whole partition; None if there is none. Allowed: per-key operators first, while
    the records are still partitioned by the routed key (distinct on any key, the others only on a
    pair's key: a record's own key, "self", does not group by its first element); then per-record
    operators; then, last, a shuffle's map-side combiner (the next stage combines the results)."""
    chain = st.chain
    i = 0
    while i < len(chain) and chain[i]["op"] in _PER_KEY_OPS:
        if chain[i]["op"] != "distinct_local" and any(k != "pair" for k in keyed):
            return str(chain[i]["op"])
        i += 1
    while i < len(chain) and chain[i]["op"] in _PER_RECORD_OPS:
        i += 1
    if i == len(chain) - 1 and chain[i]["op"] in _COMBINER_OPS and st.output.kind != "sink":
        return None
    return str(chain[i]["op"]) if i < len(chain) else None


def _framed(records: list[Any]) -> bytes:
    """Encoded records as one frame of the driver's input."""
    frame = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode()
    return driver.FRAME.pack(len(frame)) + frame


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
        self.pending: dict[int, list[Any]] = {b: [] for b in job.plan.expected_buckets(st.id, partition)}
        self.seq = dict.fromkeys(self.pending, 0)
        self.counts = dict.fromkeys(self.pending, 0)
        self.cache: dict[str, int] = {}
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
            fname = sink_file_names(name, partition)
            self.sink = _SinkFile(job.plan.recipients, Path(out_dir) / fname, meta)
            self.sink_name = fname

    def add(self, out: bytes) -> None:
        items = _parse_output(
            out, keyed=self.kind if self.kind in ("hash", "range") else None, where=self.where
        )
        self.records += len(items)
        budget = self.enclave.memory_budget
        if budget is not None and items:  # batches of ~1/16 of the budget: the next task opens them
            mean = max(1, len(out) // len(items))
            self.limit = max(1, min(self.enclave.batch_records, budget // 16 // mean))
        if self.sink is not None:
            text = self.st.output.sink_format == "text"
            for x in items:
                if text:
                    if not isinstance(x, str):
                        raise FlowTaskError("a text sink got a non-text record", where=self.where)
                    self.sink.write((x + "\n").encode("utf-8"))
                else:
                    self.sink.write(
                        (json.dumps(x, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
                    )
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
                self._put(self.partition, rec)
            return
        if self.kind == "range":  # the routing stage's [bucket, (key, record)]
            n = self.st.output.buckets
            for b, rec in items:
                if type(b) is not int or not 0 <= b < n:
                    raise FlowTaskError("the sort's routing gave a bucket out of range", where=self.where)
                self._put(b, rec)
            return
        if self.kind == "hash":
            n = self.st.output.buckets
            for key, rec in items:
                b = self.cache.get(key)
                if b is None:
                    b = self.cache[key] = self.job.keys.bucket_of(key, n)
                self._put(b, rec)
        else:
            (only,) = self.pending
            for rec in items:
                self._put(only, rec)

    def _put(self, bucket: int, rec: Any) -> None:
        recs = self.pending[bucket]
        recs.append(rec)
        self.counts[bucket] += 1
        pad = self.st.output.pad
        if pad is None:
            if len(recs) >= self.limit:
                self._seal(bucket, self.enclave._payloads(recs))
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
                    else self.enclave._payloads(recs),
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
            return 1, _COUNT.pack(1) + body
        if any(len(k.encode()) > pad.record_bytes for k in keys):
            raise FlowTaskError(
                f"a sort key is over the job's padded record size ({pad.record_bytes} bytes encoded)",
                where=self.where,
            )
        size = 32 + self.st.output.sample * (pad.record_bytes + 1)
        return 1, _COUNT.pack(1) + body + b" " * (size - len(body))

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.discard()
            self.sink = None


class _SpillFiles:
    """The sealed temporary files of one task (a keyed stage's sub-partitions, a sort's runs) under a
    fresh key held only in the enclave. Each file is a slot (kind, index, parent) whose header binds
    job, stage, partition, kind and index, and parent, checked when it is read back: a file of
    another task (another key), slot or job is refused. remove() deletes them all."""

    def __init__(
        self,
        enclave: FlowEnclave,
        job: _Job,
        st: Stage,
        partition: int,
        where: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        import tempfile

        self.enclave, self.job, self.st, self.partition, self.where = enclave, job, st, partition, where
        self.key = os.urandom(KEY_LEN)
        self.chunk_size = chunk_size
        base = enclave.spill_dir
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="confide-spill-", dir=base))
        self.writers: dict[tuple[str, int, int], tuple[BinaryIO, SealedWriter]] = {}
        self.readers: dict[tuple[str, int, int], io.BufferedIOBase] = {}
        self.written = 0  # plaintext bytes written, all files together
        self.sizes: list[int] = []  # each sealed file's size on disk (what the host sees)

    def meta(self, slot: tuple[str, int, int]) -> dict[str, Any]:
        kind, index, parent = slot
        return {
            "confide_flow_spill": {
                "job": self.job.plan.job_id,
                "stage": self.st.id,
                "part": self.partition,
                kind: index,
                "parent": parent,
            }
        }

    def path(self, slot: tuple[str, int, int]) -> Path:
        kind, index, parent = slot
        return self.dir / f"{kind}-{index:05d}-{parent}.spill"

    def has(self, slot: tuple[str, int, int]) -> bool:
        return slot in self.writers

    def write(self, slot: tuple[str, int, int], data: bytes | bytearray) -> None:
        w = self.writers.get(slot)
        if w is None:
            fh = open(self.path(slot), "xb")  # noqa: SIM115 (closed in seal/remove)
            w = self.writers[slot] = (
                fh,
                SealedWriter(fh, data_key=self.key, metadata=self.meta(slot), chunk_size=self.chunk_size),
            )
        w[1].write(data)
        self.written += len(data)

    def seal(self, slot: tuple[str, int, int]) -> None:
        fh, writer = self.writers[slot]
        if not fh.closed:
            writer.close()
            self.sizes.append(fh.tell())
            fh.close()

    def seal_all(self) -> None:
        for slot in self.writers:
            self.seal(slot)

    def open(self, slot: tuple[str, int, int]) -> SealedReader:
        """A reader of the file written for `slot`, its header checked to be exactly that slot's."""
        path = self.path(slot)
        w = f"{self.where}: spill file {path.name}"
        try:
            fh = self.enclave._open_spill(path)
        except OSError as exc:
            raise FlowIntegrityError(f"spill file gone ({exc.strerror})", where=w) from None
        self.readers[slot] = fh
        reader = SealedReader(fh, where=w).unlock(data_key=self.key)
        if reader.header.metadata != self.meta(slot):
            raise FlowIntegrityError("spill file of another task, sub-partition or run (swapped)", where=w)
        return reader

    def discard(self, slot: tuple[str, int, int]) -> None:
        """Delete a file once it is read."""
        fh = self.readers.pop(slot, None)
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(OSError):
            self.path(slot).unlink()

    def remove(self) -> None:
        for fh in [w[0] for w in self.writers.values()] + list(self.readers.values()):
            with contextlib.suppress(OSError):
                fh.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class _Spill:
    """A keyed stage's spilled partition: n_sub sub-partitions x parents, routed by a fresh HMAC key."""

    FLUSH_BYTES = 1 << 18

    def __init__(
        self,
        enclave: FlowEnclave,
        job: _Job,
        st: Stage,
        partition: int,
        n_sub: int,
        n_parents: int,
        budget: int,
        where: str,
    ) -> None:
        self.where = where
        self.n_sub, self.n_parents = n_sub, n_parents
        self.route_key = os.urandom(32)
        self.files = _SpillFiles(enclave, job, st, partition, where)
        # buffered records per (sub, parent), flushed as frames: together at most ~a quarter budget
        self.flush = max(1 << 12, min(self.FLUSH_BYTES, budget // (4 * n_sub * n_parents)))
        self.buffers: dict[tuple[int, int], list[bytes]] = {}
        self.sizes: dict[tuple[int, int], int] = {}

    @property
    def written(self) -> int:
        return self.files.written

    def router(self, keyed: list[str]) -> Callable[[int, Header, bytes], None]:
        def route(parent: int, header: Header, payload: bytes) -> None:
            try:
                records = json.loads(payload)
            except (ValueError, RecursionError):
                raise FlowIntegrityError("a batch's records are not valid JSON", where=self.where) from None
            for rec in records:
                key = rec if keyed[parent] == "self" else (rec[0] if isinstance(rec, list) and rec else None)
                digest = hmac.new(self.route_key, driver.canonical_encoded(key).encode(), "sha256").digest()
                sub = int.from_bytes(digest[:8], "big") % self.n_sub
                self._add(sub, parent, json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode())

        return route

    def _add(self, sub: int, parent: int, rec: bytes) -> None:
        slot = (sub, parent)
        self.buffers.setdefault(slot, []).append(rec)
        self.sizes[slot] = self.sizes.get(slot, 0) + len(rec) + 1
        if self.sizes[slot] >= self.flush:
            self._flush(slot)

    def _flush(self, slot: tuple[int, int]) -> None:
        recs = self.buffers.pop(slot, [])
        self.sizes.pop(slot, None)
        if not recs:
            return
        frame = b"[" + b",".join(recs) + b"]"
        self.files.write(("sub", *slot), driver.FRAME.pack(len(frame)) + frame)

    def seal_all(self) -> None:
        for slot in list(self.buffers):
            self._flush(slot)
        self.files.seal_all()

    def read(self, sub: int) -> list[bytes]:
        """Sub-partition `sub`, one framed input per parent, each file checked to be the one written
        for exactly this (job, stage, partition, sub-partition, parent), deleted once read."""
        parts = []
        for parent in range(self.n_parents):
            slot = ("sub", sub, parent)
            if not self.files.has(slot):
                parts.append(b"")
                continue
            reader = self.files.open(slot)
            parts.append(b"".join(bytes(c) for c in reader.iter_chunks()))
            self.files.discard(slot)
        return parts

    def remove(self) -> None:
        self.files.remove()


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

    def add(self, parent: int, header: Header, payload: bytes) -> None:
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


def _parse_output(out: bytes, *, keyed: str | None, where: str) -> list[Any]:
    """The sandbox's output frames, parsed as hostile input: on a hash output [key_json, record]
    pairs, on a range output [bucket, record]."""
    items: list[Any] = []
    view = memoryview(out)
    off = 0
    while off < len(view):
        if off + 4 > len(view):
            raise FlowTaskError("the sandbox's output ends inside a frame header", where=where)
        (n,) = driver.FRAME.unpack_from(view, off)
        if n > driver.MAX_FRAME or off + 4 + n > len(view):
            raise FlowTaskError("the sandbox's output has a frame of bad length", where=where)
        try:
            frame = json.loads(bytes(view[off + 4 : off + 4 + n]))
        except (ValueError, RecursionError):
            raise FlowTaskError("the sandbox's output is not valid JSON", where=where) from None
        if not isinstance(frame, list):
            raise FlowTaskError("the sandbox's output frame is not a list", where=where)
        if keyed:
            first = str if keyed == "hash" else int
            for it in frame:
                if not (isinstance(it, list) and len(it) == 2 and type(it[0]) is first):
                    raise FlowTaskError("the sandbox's keyed output is malformed", where=where)
        items.extend(frame)
        off += 4 + n
    return items


def _grant_binding(job: str, worker: PublicIdentity, wrapped: bytes) -> bytes:
    """What a coordinator's evidence binds when it grants a job key: the job, the worker, the grant."""
    h = hashlib.sha256(b"confide-flow-grant-v1\0" + job.encode() + b"\0" + worker.to_line().encode() + b"\0")
    return h.digest() + hashlib.sha256(wrapped).digest()
