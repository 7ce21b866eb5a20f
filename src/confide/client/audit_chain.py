"""The audit chain's hashes (PROTOCOL.md section 7), one implementation for the host (which appends
events) and the clients (which check them).

``body_sha256 = H(canonical_json({time, task_id, actor, kind, detail}))``;
``sha256 = H(canonical_json({"format": "confide-audit-v2", seq, prev_sha256, body_sha256}))``;
``prev_sha256`` is the previous event's ``sha256`` (64 zeros before event 1). A link
``{seq, prev_sha256, body_sha256, sha256}`` shows where an event sits in the chain without its
content, so a party can check the chain across events it may not see.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from confide.enclave.encoding import canonical_json

GENESIS = "0" * 64
CHAIN_FORMAT = "confide-audit-v2"
BODY_FIELDS = ("time", "task_id", "actor", "kind", "detail")
MAX_LINKS = 10_000  # per answer of GET /v1/audit/links


def body_hash(event: Mapping[str, Any]) -> str:
    """H(the event's content): what a link shows of an event instead of the event."""
    return hashlib.sha256(canonical_json({k: event[k] for k in BODY_FIELDS})).hexdigest()


def link_hash(seq: int, prev_sha256: str, body_sha256: str) -> str:
    return hashlib.sha256(
        canonical_json(
            {"format": CHAIN_FORMAT, "seq": seq, "prev_sha256": prev_sha256, "body_sha256": body_sha256}
        )
    ).hexdigest()


def event_hash(event: Mapping[str, Any]) -> str:
    """The event's chain hash (its ``sha256``), from its fields (any ``sha256`` in it is ignored)."""
    return link_hash(int(event["seq"]), str(event["prev_sha256"]), body_hash(event))
