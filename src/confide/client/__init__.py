"""A party's side of Confide, on the party's own machine: the SDK (`Client`), the attestation checks,
the verification policy, request signing and the single-machine run (`local`).

Names are imported lazily so that `import confide.client.policy` (or the CLI's fast paths) does not
pull in the HTTP client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confide.client.sdk import Client, DatasetRef, ServiceKey, TaskResult, check_audit_chain
    from confide.client.transport import ApiError

__all__ = ["ApiError", "Client", "DatasetRef", "ServiceKey", "TaskResult", "check_audit_chain"]

_SDK = {"Client", "DatasetRef", "ServiceKey", "TaskResult", "check_audit_chain"}


def __getattr__(name: str) -> Any:
    if name in _SDK:
        from confide.client import sdk

        return getattr(sdk, name)
    if name == "ApiError":
        from confide.client.transport import ApiError

        return ApiError
    raise AttributeError(f"module 'confide.client' has no attribute {name!r}")
