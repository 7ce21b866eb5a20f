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
sub-partition (a keyed stage, spilled by key: spill.py), per merged piece (a sort, sorted
externally: external_sort.py) or per piece (a sort's routing, streamed: external_sort.py); each
run's output is bucketed and sealed as it comes (emitter.py). A long-lived sandboxed child fed a
stream of batches is a later step (issue 8).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import hpke_box
from ..backend import TeeBackend
from ..encoding import canonical_json, parse_json_object
from ..keys import Identity, PublicIdentity
from ..peer import check_peer
from ..report_data import nonce_binding, report_data_for
from ..sandbox import SandboxLimits, Zygote, make_input_memfd
from ..sealed_file import SealedReader
from . import driver
from .batch import KEY_LEN, Header, JobKeys, parse_header
from .emitter import _Emitter, _SinkFile, stray_part_files
from .errors import FlowFormatError, FlowIntegrityError, FlowTaskError
from .external_sort import run_routing_streamed, run_sort_spilled
from .padding import COUNT, fixed_size_json
from .plan import JobPlan, Stage, parse_plan
from .spill import run_spilled

BATCH_RECORDS = 4096
MAX_DESCRIPTION = 16 << 20
GRANT_PURPOSE = "confide-flow-job-key"
DRIVER_SOURCE = Path(driver.__file__).read_text(encoding="utf-8")
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


def _seal_for(recipients: Sequence[str], payload_lines: Any, path: Path, metadata: dict[str, Any]) -> str:
    """Write a sealed file to the recipients; returns the SHA-256 of what was written."""
    sink = _SinkFile(recipients, path, metadata)
    try:
        for chunk in payload_lines:
            sink.write(chunk)
        return sink.close()
    except BaseException:
        sink.discard()
        raise


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
        # larger spills to encrypted files in spill_dir (see spill.run_spilled); None: no limit
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
                        run = run_sort_spilled
                    elif any(plan.stages[k].output.kind == "sample" for k in st.parents):
                        run = run_routing_streamed
                    else:
                        run = run_spilled
                    outputs = run(self, job, st, partition, batches, report, out_dir, incoming, where)
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
                    spec_i: dict[str, Any] = {"name": f"in{i}", "kind": "frames"}
                    if samples is None:  # each parent's records, as the batches counted them
                        spec_i["records"] = sum(v[1] for v in consumed[str(st.parents[i])].values())
                    specs.append(spec_i)
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
        sink: Callable[[int, Header, bytes, int], None] | None = None,
        samples: list[bytes] | None = None,
    ) -> tuple[list[bytes], dict[str, dict[str, list[int]]], int]:
        """Open and check every batch; returns one framed input per parent, what was consumed, and the
        record count. Any missing, extra, duplicated, out-of-order, foreign or forged batch fails.
        With `sink`, each data batch's records go to sink(parent index, its authenticated header,
        payload, its authenticated record count) as it is opened and nothing is kept (the framed inputs come back empty). From a
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
                if header.last or len(payload) < COUNT.size:
                    raise FlowIntegrityError(f"{src}: malformed data batch", where=where)
                (count,) = COUNT.unpack_from(payload)
                s["records"] += count
                records = payload[COUNT.size :].rstrip(b" ")  # a padded batch's filler
                if sink is not None:
                    sink(st.parents.index(header.stage), header, records, count)
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
        for name, out in outputs.items():
            _seal_for(
                plan.recipients,
                [canonical_json({**manifest, "output": name})],
                Path(out_dir) / manifest_name(name),
                {"confide_flow": {"job": plan.job_id, "manifest": name}},
            )
            for stray in stray_part_files(out_dir, name, {f["file"] for f in out["files"]}):
                with contextlib.suppress(OSError):  # tidying only: no manifest names them
                    stray.unlink()
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


def _grant_binding(job: str, worker: PublicIdentity, wrapped: bytes) -> bytes:
    """What a coordinator's evidence binds when it grants a job key: the job, the worker, the grant."""
    h = hashlib.sha256(b"confide-flow-grant-v1\0" + job.encode() + b"\0" + worker.to_line().encode() + b"\0")
    return h.digest() + hashlib.sha256(wrapped).digest()
