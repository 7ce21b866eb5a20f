"""A function owner's side of confidential code (PROTOCOL.md section 4): the function's source
sealed so that only the service's enclaves can read it. Run on the owner's machine, outside the TCB.

The HPKE purpose and the binding to the descriptor and service are those of
``confide.enclave.function_desc``, where the enclave opens the source (``open_function_source``).
"""

from __future__ import annotations

from confide.enclave import hpke_box
from confide.enclave.errors import FormatError
from confide.enclave.function_desc import FunctionDescriptor, check_function_source, source_binding
from confide.enclave.keys import PublicIdentity
from confide.enclave.task_fields import FUNCTION_SOURCE_PURPOSE


def seal_function_source(source: str, *, descriptor: FunctionDescriptor, service: PublicIdentity) -> bytes:
    """Owner side: the source sealed so that only the service's enclaves can read it."""
    check_function_source(descriptor, source)
    if not descriptor.owner:
        raise FormatError("a confidential function needs an owner", where=f"function {descriptor.name!r}")
    return hpke_box.seal(
        source.encode("utf-8"),
        service.kem_key,
        FUNCTION_SOURCE_PURPOSE,
        **source_binding(descriptor, service.fingerprint),
    )
