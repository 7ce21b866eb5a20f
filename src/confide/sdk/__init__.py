"""Client SDK: a party's side of the Confide platform (see `confide.sdk.client.Client`)."""

from confide.sdk.client import Client, DatasetRef, ServiceKey, TaskResult, check_audit_chain
from confide.sdk.transport import ApiError

__all__ = ["ApiError", "Client", "DatasetRef", "ServiceKey", "TaskResult", "check_audit_chain"]
