"""A dataflow job as a platform task: the `flow` built-in (every input owner approves the job).

    flow = Flow(functions_source)
    counts = flow.task_input("text").flat_map("words").map("one").reduce_by_key("add")
    task = flow_task(client, flow, counts.save("wc"), inputs={"text": ref}, outputs={"wc": [fp]})

The job (the function module, each function's SHA-256, the stages) goes in the manifest's params,
readable by every participant; the enclave adds each input's data key and header digest itself,
runs the job inside, verifies it, and seals each output (JSON lines of the flow record encoding, or
text lines) to its recipients. The receipt signs the per-stage counts the verification accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError
from confide.flow.api import Dataset, Flow

if TYPE_CHECKING:
    from confide.client.sdk import Client


def job_params(flow: Flow, actions: Sequence[Dataset], client_line: Any) -> dict[str, Any]:
    """The `job` parameter of a flow task for these actions (all sources must be task inputs)."""
    files = [n for n, v in flow._inputs.items() if v["path"] is not None]
    if files:
        raise ConfideError(
            "a platform flow task reads only task inputs (flow.task_input), not local files",
            where="flow task",
        )
    description = flow.describe(actions, [client_line])
    return {
        "module": description["module"]["source"],
        "functions": description["functions"],
        "inputs": description["inputs"],
        "stages": description["stages"],
    }


def flow_task(
    client: Client,
    flow: Flow,
    *actions: Dataset,
    inputs: Mapping[str, str],
    outputs: Mapping[str, Sequence[str]],
    **task: Any,
) -> str:
    """Create a `flow` task: `inputs` maps each task_input name to a dataset reference, `outputs`
    each saved name to its recipients' fingerprints. Returns the task id."""
    params = {"job": job_params(flow, actions, client.identity.public)}
    if sorted(inputs) != sorted(params["job"]["inputs"]):
        raise ConfideError(
            f"the job reads inputs {sorted(params['job']['inputs'])}, given {sorted(inputs)}",
            where="flow task",
        )
    return client.create_task(
        function="flow", inputs=dict(inputs), outputs=dict(outputs), params=params, **task
    )


def read_records(path: Any) -> list[Any]:
    """The records of a flow task's output file (as decrypted by Client.results): JSON lines of the
    flow record encoding (tuples, lists, bytes and dicts come back as they were)."""
    import json
    from pathlib import Path

    from confide.enclave.flow.driver import dec

    text = Path(path).read_text(encoding="utf-8")
    return [dec(json.loads(line)) for line in text.splitlines() if line]
