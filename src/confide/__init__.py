"""Confide: confidential computing among parties who do not trust each other.

`confide.Client` is the SDK entry point. It is imported lazily so that the enclave package
(`confide.enclave`, the TCB) never pulls the HTTP client in.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Client":
        from confide.client import Client

        return Client
    raise AttributeError(f"module 'confide' has no attribute {name!r}")
