"""A dataflow job run whole inside the platform's enclave: the `flow` built-in of a platform task.

The task runner (task_runner.py) has checked every approval and holds the inputs' data keys; this
module builds the job description from the task (the approved job in its parameters, the inputs'
data keys, the task id as job id, the service key as the only recipient), schedules every task of
every stage on this enclave's own FlowEnclave, one after the other, runs the same completeness
verification as on an untrusted engine (the batches still cross host memory and disk: the work
directory is the host's), and opens each output through its sealed manifest. The records come back
to the task runner, which seals them to the task's recipients like any function's outputs, with the
per-stage counts of the verification in the receipt.

On the platform's engine (``confide serve --flow-engine spark``) the job is split in two enclave
calls: the task call checks everything as above and opens the job (``open_job``), grants its key to
the node agents the host named once their evidence is checked (``grant_agents``: FlowEnclave.grant,
enclave/peer.py), and keeps the job (key, plan, task) in memory, a few at most (``remember``); the
host runs the stages on its engine; ``flow_finish`` takes the job back (``take``) and runs ``finish``,
the same verification and opening of results as the local run.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import TeeBackend
from ..encoding import b64d, b64e
from ..errors import EnclaveError, FormatError
from ..keys import Identity
from ..sandbox import SandboxLimits, Zygote
from .plan import FORMAT
from .results import open_result
from .task import FlowEnclave

JOB_FIELDS = ("module", "functions", "inputs", "stages")


def description_for(
    job: Any, *, task_id: str, input_paths: dict[str, str], data_keys: dict[str, bytes], service: Identity
) -> dict[str, Any]:
    """The full job description of a platform flow task (parse_plan checks it all, as hostile)."""
    where = "params.job"
    if not isinstance(job, dict) or sorted(job) != sorted(JOB_FIELDS):
        raise FormatError(f"a flow task's params.job needs exactly {', '.join(JOB_FIELDS)}", where=where)
    inputs = job["inputs"]
    if not isinstance(inputs, dict) or sorted(inputs) != sorted(input_paths):
        raise FormatError(
            f"the job reads inputs {sorted(inputs) if isinstance(inputs, dict) else inputs!r}, the task has "
            f"{sorted(input_paths)}",
            where=where,
        )
    full: dict[str, Any] = {}
    for name, spec in inputs.items():
        if not isinstance(spec, dict):
            raise FormatError("an input must be an object", where=f"{where}: input {name!r}")
        from ..sealed_file import SealedReader

        with open(input_paths[name], "rb", buffering=0) as fh:
            digest = SealedReader(fh, where=f"input {name!r}").header.digest.hex()
        full[name] = {**spec, "header_sha256": digest, "data_key": base64.b64encode(data_keys[name]).decode()}
    module = job["module"]
    source = module if isinstance(module, str) else ""
    return {
        "format": FORMAT,
        "job_id": task_id,
        "module": {"source": source, "sha256": hashlib.sha256(source.encode("utf-8")).hexdigest()},
        "functions": job["functions"],
        "inputs": full,
        "stages": job["stages"],
        "recipients": [service.public.to_line()],
    }


def sink_names(job: Any) -> list[str]:
    """The outputs a job writes (its sinks), as its stages name them; [] for a malformed job (which
    parse_plan then refuses with its reason)."""
    stages = job.get("stages") if isinstance(job, dict) else None
    names = []
    for st in stages if isinstance(stages, list) else []:
        out = st.get("output") if isinstance(st, dict) else None
        if isinstance(out, dict) and out.get("kind") == "sink" and isinstance(out.get("name"), str):
            names.append(out["name"])
    return names


def open_job(
    description: dict[str, Any],
    input_paths: dict[str, str],
    *,
    service: Identity,
    zygote: Zygote,
    backend: TeeBackend,
    limits: SandboxLimits,
    memory_budget: int | None,
    spill_dir: Path | None,
) -> tuple[FlowEnclave, bytes, dict[str, Any]]:
    """The job opened on a FlowEnclave of its own (the service key as its identity): (enclave, sealed
    ticket, public job graph)."""
    enclave = FlowEnclave(
        service, zygote, backend=backend, limits=limits, memory_budget=memory_budget, spill_dir=spill_dir
    )
    ticket, graph = enclave.start_plan(description, input_paths)
    return enclave, ticket, graph


def run_job(
    description: dict[str, Any],
    input_paths: dict[str, str],
    work_dir: Path,
    *,
    service: Identity,
    zygote: Zygote,
    backend: TeeBackend,
    limits: SandboxLimits,
    memory_budget: int | None,
) -> tuple[dict[str, tuple[str, list[Any]]], dict[str, Any]]:
    """Run the job; returns (output name -> (format, records), the verification's summary). Raises
    the FlowTaskError / FlowIntegrityError that fails it, naming stage and partition."""
    enclave, ticket, graph = open_job(
        description,
        input_paths,
        service=service,
        zygote=zygote,
        backend=backend,
        limits=limits,
        memory_budget=memory_budget,
        spill_dir=work_dir / "spill",
    )
    store: dict[int, dict[int, list[bytes]]] = defaultdict(lambda: defaultdict(list))
    reports: list[bytes] = []
    out_dir = work_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    for st in graph["stages"]:
        sid = int(st["stage"])
        for p in range(int(st["partitions"])):
            batches = [b for k in st["parents"] for b in store[int(k)][p]]
            outputs, report = enclave.run_task(
                ticket,
                sid,
                p,
                batches,
                source_path=input_paths[st["source"]] if st["source"] else None,
                out_dir=str(out_dir) if st["sink"] else None,
            )
            for bucket, blob in outputs:
                store[sid][bucket].append(blob)
            reports.append(report)
        for k in st["parents"]:
            store.pop(int(k), None)
    return finish(enclave, ticket, description, reports, out_dir, service)


def finish(
    enclave: FlowEnclave,
    ticket: bytes,
    description: dict[str, Any],
    reports: Sequence[bytes],
    out_dir: str | Path,
    service: Identity,
) -> tuple[dict[str, tuple[str, list[Any]]], dict[str, Any]]:
    """The completeness verification over every task report (FlowEnclave.finish_job), then each sink
    opened through the sealed manifest it wrote: (output name -> (format, records), summary)."""
    summary = enclave.finish_job(ticket, reports, str(out_dir))
    results: dict[str, tuple[str, list[Any]]] = {}
    for st in description["stages"]:  # parsed by start_plan: a sink has a name and a format
        out = st["output"]
        if out["kind"] == "sink":
            results[out["name"]] = (out["format"], open_result(out_dir, out["name"], service))
    return results, summary


# ---- a job run on the platform's engine: started by the task call, finished by flow_finish -----------

MAX_AGENTS = 16  # node agents one job's key may be granted to
MAX_EVIDENCE_B64 = 256 << 10
MAX_PENDING = 4  # jobs an enclave worker keeps open between the two calls (its host runs one at a time)
MAX_REPORTS_BYTES = 64 << 20
_FRAME = struct.Struct(">I")


@dataclass
class EngineJob:
    """A job waiting for its stages to run on the engine: what flow_finish needs, in enclave memory
    only (a restart of the enclave loses it: that run of the task fails and the task can run again)."""

    enclave: FlowEnclave
    ticket: bytes
    description: dict[str, Any]
    context: Any  # the task runner's: the manifest, output paths and receipt fields of the run


def parse_agents(value: Any) -> list[tuple[str, bytes]]:
    """The host's `flow_agents`: [[public line, evidence (base64)], ...], 1 to MAX_AGENTS of them."""
    where = "flow_agents"
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_AGENTS:
        raise FormatError(f"must list 1 to {MAX_AGENTS} node agents as [public line, evidence]", where=where)
    agents = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise FormatError("a node agent is [public line, evidence (base64)]", where=w)
        if len(item[0]) > 4096 or len(item[1]) > MAX_EVIDENCE_B64:
            raise FormatError("public line or evidence too long", where=w)
        agents.append((item[0], b64d(item[1], field="evidence", where=w)))
    return agents


def grant_agents(enclave: FlowEnclave, ticket: bytes, agents: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """The job key for each node agent, as the Spark stub forwards it (public line -> "key.evidence",
    both base64): each granted only once that agent's evidence shows this same build holding that
    line's keys (FlowEnclave.grant, enclave/peer.py); the first refusal ends the start."""
    grants = {}
    for line, evidence in agents:
        wrapped, vouch = enclave.grant(ticket, line, evidence)
        grants[line] = f"{b64e(wrapped)}.{b64e(vouch)}"
    return grants


def remember(pending: dict[str, EngineJob], task_id: str, job: EngineJob) -> None:
    """Keep `job` until flow_finish; a task started again replaces its earlier start, and beyond
    MAX_PENDING the oldest is dropped (its flow_finish is then refused): a host cannot fill the
    enclave's memory with jobs it never finishes."""
    pending.pop(task_id, None)
    pending[task_id] = job
    while len(pending) > MAX_PENDING:
        del pending[next(iter(pending))]


def take(pending: dict[str, EngineJob], task_id: Any) -> EngineJob:
    job = pending.pop(task_id, None) if isinstance(task_id, str) else None
    if job is None:
        raise EnclaveError(
            f"no dataflow job of task {str(task_id)[:64]!r} is waiting to finish in this enclave worker "
            "(never started here, already finished, dropped for newer jobs, or the worker restarted: run "
            "the task again)",
            where="flow_finish",
        )
    return job


def read_reports(path: str) -> list[bytes]:
    """The sealed task reports the host collected from the engine: a file of (u32 big-endian length,
    report) frames. Their contents are checked by the verification; here only the framing."""
    where = "flow_finish: reports"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_REPORTS_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"cannot read the reports file ({exc.strerror})", where=where) from None
    if len(data) > MAX_REPORTS_BYTES:
        raise FormatError(f"reports file larger than {MAX_REPORTS_BYTES >> 20} MiB", where=where)
    reports: list[bytes] = []
    off = 0
    while off < len(data):
        if off + _FRAME.size > len(data):
            raise FormatError("truncated frame header", where=where)
        (n,) = _FRAME.unpack_from(data, off)
        off += _FRAME.size
        if off + n > len(data):
            raise FormatError(f"report {len(reports)} is truncated", where=where)
        reports.append(data[off : off + n])
        off += n
    return reports


def write_reports(path: str | Path, reports: Sequence[bytes]) -> None:
    """The host's side of read_reports (kept here so the two framings cannot drift apart)."""
    with open(path, "wb") as fh:
        for r in reports:
            fh.write(_FRAME.pack(len(r)) + r)


def engine_failure(text: Any) -> str:
    """The host's account of a failure on the engine (a node agent's refusal, a lost Spark stage), as
    the receipt states it: marked as the host's word, printable, cut short."""
    if not isinstance(text, str):
        raise FormatError("engine_error must be text", where="flow_finish")
    clean = "".join(c if c.isprintable() else "?" for c in text[:1000])
    return f"the dataflow job failed on the engine (as the host reports it): {clean}"[:512]
