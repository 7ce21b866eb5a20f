"""Confidential dataflow, the enclave side (part of the TCB): sealed batches, the keyed bucket PRF,
job plans, task execution with user functions in the sandbox, and the completeness verification.

The engine that schedules tasks and moves batches (confide.flow) is outside the TCB.
"""

from confide.enclave.flow.batch import Header, JobKeys, parse_header
from confide.enclave.flow.emitter import sink_file_names
from confide.enclave.flow.errors import FlowFormatError, FlowIntegrityError, FlowTaskError
from confide.enclave.flow.task import FlowEnclave, manifest_name

__all__ = [
    "FlowEnclave",
    "FlowFormatError",
    "FlowIntegrityError",
    "FlowTaskError",
    "Header",
    "JobKeys",
    "manifest_name",
    "parse_header",
    "sink_file_names",
]
