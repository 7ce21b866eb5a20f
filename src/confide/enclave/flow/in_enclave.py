"""A dataflow job run whole inside the platform's enclave: the `flow` built-in of a platform task.

The task runner (task_runner.py) has checked every approval and holds the inputs' data keys; this
module builds the job description from the task (the approved job in its parameters, the inputs'
data keys, the task id as job id, the service key as the only recipient), schedules every task of
every stage on this enclave's own FlowEnclave, one after the other, runs the same completeness
verification as on an untrusted engine (the batches still cross host memory and disk: the work
directory is the host's), and opens each output through its sealed manifest. The records come back
to the task runner, which seals them to the task's recipients like any function's outputs, with the
per-stage counts of the verification in the receipt.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..backend import TeeBackend
from ..errors import FormatError
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
    enclave = FlowEnclave(
        service,
        zygote,
        backend=backend,
        limits=limits,
        memory_budget=memory_budget,
        spill_dir=work_dir / "spill",
    )
    ticket, graph = enclave.start_plan(description, input_paths)
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
    summary = enclave.finish_job(ticket, reports, str(out_dir))
    results: dict[str, tuple[str, list[Any]]] = {}
    for st in description["stages"]:  # parsed by start_plan: a sink has a name and a format
        out = st["output"]
        if out["kind"] == "sink":
            results[out["name"]] = (out["format"], open_result(out_dir, out["name"], service))
    return results, summary
