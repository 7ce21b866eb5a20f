"""Built-in flow v1: a confidential dataflow job (confide.flow) as a platform task.

The job (its function module, the functions' SHA-256 and its stages, in ``params.job``, readable by
every participant and approved with the manifest) runs in the enclave itself, not as one sandboxed
function: the task runner (task_runner.py) hands it to confide.enclave.flow.in_enclave, whose
FlowEnclave runs each task of each stage in the sandbox (the fixed driver, flow/driver.py, with the
job's module), verifies that every partition was consumed exactly once, and returns each sink's
records; each becomes the task output of that name (JSON lines in the flow record encoding, or text
lines), sealed to its recipients. This file exists so that the built-in has a source digest like
the others; running it in a sandbox is a mistake, and it says so.
"""

from typing import Any


def run(ctx: Any) -> None:
    raise RuntimeError("the flow built-in is run by the enclave's task runner, not as a sandboxed function")
