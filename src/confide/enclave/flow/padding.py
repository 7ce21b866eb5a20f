"""Padded exchanges: what a task sends to each bucket, and its report, in sizes that do not depend
on its data.

With a padded exchange (plan.Pad) every task sends every bucket exactly ``pad.batches`` data
batches, each with a payload of exactly ``pad.payload_bytes``: the bucket's real records fill the
first batches' record slots, the rest of each payload is spaces (after the JSON array, so the
reader's JSON parser skips it) and the remaining batches hold no record: dummies, sealed like the
others and indistinguishable from them to the engine. The record count in each payload and the end
batch's batch and record counts are under the AEAD like everything else, so a dropped dummy fails
the stream's sequence and count checks like a dropped real batch. End batches and task reports carry
counts: their JSON is padded to the length it would have with every count at its widest, so their
sizes depend only on the job's public graph.
"""

from __future__ import annotations

import struct
from typing import Any

from ..encoding import canonical_json
from .errors import FlowTaskError
from .plan import Pad

COUNT = struct.Struct(">I")
WIDEST = 10**15  # no count in an end batch or a report is larger


def _widest(x: Any) -> Any:
    if isinstance(x, bool) or not isinstance(x, int | dict | list | tuple):
        return x
    if isinstance(x, int):
        if not 0 <= x <= WIDEST:
            raise ValueError(f"count {x} out of the padded range")
        return WIDEST
    if isinstance(x, dict):
        return {k: _widest(v) for k, v in x.items()}
    return [_widest(v) for v in x]


def fixed_size_json(obj: dict[str, Any]) -> bytes:
    """Canonical JSON of `obj` with a field "pad" of spaces, as long as it would be with every
    integer in it at 16 digits: its length depends on its structure, not on its counts."""
    target = len(canonical_json({**_widest(obj), "pad": ""}))
    body = len(canonical_json({**obj, "pad": ""}))
    return canonical_json({**obj, "pad": " " * (target - body)})


def padded_payload(encoded: list[bytes], pad: Pad, where: str) -> tuple[int, bytes]:
    """(record count, payload) of one padded data batch holding up to `pad.batch_records` records
    (each already encoded as compact JSON)."""
    if any(len(e) > pad.record_bytes for e in encoded):
        raise FlowTaskError(
            f"a record is over the job's padded record size ({pad.record_bytes} bytes encoded)",
            where=where,
        )
    body = COUNT.pack(len(encoded)) + b"[" + b",".join(encoded) + b"]"
    return len(encoded), body + b" " * (pad.payload_bytes - len(body))


def check_bound(records: int, pad: Pad, where: str) -> None:
    """Fails once a task has more records for one bucket than the padded shuffle allows."""
    if records > pad.records:
        raise FlowTaskError(
            f"more records for one bucket than the job's padded shuffle allows ({pad.records} per task "
            "and bucket): the job needs a larger bound",
            where=where,
        )


def padded_payloads(records: list[bytes], pad: Pad, where: str, *, sent: int = 0) -> list[tuple[int, bytes]]:
    """The (record count, payload) of the data batches of one stream after the `sent` full ones
    already sealed: `records` (the rest) in the next, dummies up to `pad.batches` in all."""
    check_bound(sent * pad.batch_records + len(records), pad, where)
    k = pad.batch_records
    return [padded_payload(records[i * k : (i + 1) * k], pad, where) for i in range(pad.batches - sent)]
