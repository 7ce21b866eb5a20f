"""The words an approver reads about a `flow` task (a dataflow job, confide.flow.platform): each
stage, what it reads, the operators and functions it applies, where its output goes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confide.enclave.manifest import Manifest


def _op(op: Any) -> str:
    if not isinstance(op, dict):
        return repr(op)
    fn = f"({op['fn']})" if "fn" in op else ""
    return f"{op.get('op')}{fn}"


def describe(m: Manifest, clean: Callable[[str], str] = str) -> list[str]:
    fn = m.function
    if fn.kind != "builtin" or fn.name != "flow":
        return []
    job = m.params.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("stages"), list):
        return ["Dataflow job: malformed (the enclave will refuse the task)"]
    stages: list[Any] = job["stages"]
    inputs = job.get("inputs") if isinstance(job.get("inputs"), dict) else {}
    lines = [
        f"Dataflow job ({len(stages)} stages; every record stays inside the enclave, the functions are "
        "those of params.job.module, run in its sandbox):"
    ]
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            lines.append(f"  stage {i}: malformed")
            continue
        src = st.get("source")
        if src is not None:
            spec = inputs.get(src, {}) if isinstance(inputs, dict) else {}
            reads = f"input {clean(str(src))} ({clean(str(spec.get('format')))})"
        else:
            how = " (join)" if st.get("combine") == "join" else ""
            reads = "stages " + ", ".join(str(p) for p in st.get("parents", [])) + how
        chain = " -> ".join(_op(o) for o in st.get("chain", [])) or "(no operator)"
        out = st.get("output", {}) if isinstance(st.get("output"), dict) else {}
        if out.get("kind") == "sink":
            goes = f"output {clean(str(out.get('name')))}"
        elif out.get("kind") == "hash":
            goes = f"{out.get('buckets')} partitions by key"
        else:
            goes = str(out.get("kind"))
        lines.append(f"  stage {i}: reads {reads}; {clean(chain)}; then {goes}")
    lines.append(
        "  the host sees the job's shape (stages, partitions), the number and size of the sealed batches "
        "between stages, and timing; the receipt signs the records and batches each stage produced"
    )
    return lines
