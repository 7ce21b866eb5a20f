"""Checking the receipts an enclave signs: the task receipt of the multi-party platform
(PROTOCOL.md section 5) and the receipt of a single-client run (``confide run``). Run on a party's
machine, outside the TCB.

The receipts are made by the enclave (``confide.enclave.manifest.make_task_receipt``,
``confide.enclave.request.make_receipt``); their formats and fields are defined there and imported
here.
"""

from __future__ import annotations

from typing import Any

from confide.enclave import request
from confide.enclave.encoding import b64d, canonical_json, check_fields, get_typed, parse_json_object
from confide.enclave.errors import FormatError, IntegrityError
from confide.enclave.keys import PublicIdentity
from confide.enclave.manifest import RECEIPT_FIELDS, RECEIPT_OPTIONAL_FIELDS, parse_audit_head
from confide.enclave.task_fields import (
    MAX_RECEIPT_BYTES,
    MAX_RUNS,
    RECEIPT_CHECKS,
    RECEIPT_FORMAT,
    as_object,
    int_field,
    load_object,
)


def verify_task_receipt(
    data: str | bytes, service_public: PublicIdentity, *, where: str = "task receipt"
) -> dict[str, Any]:
    """Check the service's signature over a task receipt and its shape; returns the body."""
    w = where
    obj = load_object(data, MAX_RECEIPT_BYTES, w)
    check_fields(obj, required=("body", "signature"), where=w)
    body = as_object(obj["body"], f"{w}: body")
    signature = b64d(obj["signature"], field="signature", where=w, length=64)
    service_public.verify(signature, canonical_json(body), what=w)
    check_fields(body, required=RECEIPT_FIELDS, optional=RECEIPT_OPTIONAL_FIELDS, where=w)
    if body["format"] != RECEIPT_FORMAT:
        raise FormatError(f"unknown receipt format {str(body['format'])[:80]!r}", where=w)
    named = PublicIdentity.from_line(get_typed(body, "service", str, where=w), where=w)
    if (named.sign_pub, named.kem_pub) != (service_public.sign_pub, service_public.kem_pub):
        raise IntegrityError("receipt names another service key than the one that signed it", where=w)
    for key in ("inputs", "outputs"):
        for entry in get_typed(body, key, list, where=w):
            as_object(entry, f"{w}: {key}")
    for key in ("run", "max_runs"):
        int_field(body, key, w, low=0, high=MAX_RUNS)
    status = get_typed(body, "status", str, where=w)
    error = body["error"]
    if status == "ok":
        if error is not None:
            raise FormatError("status ok with an error", where=w)
        if not 1 <= body["run"] <= body["max_runs"]:
            raise IntegrityError(
                f"receipt of run {body['run']} beyond the {body['max_runs']} run(s) approved", where=w
            )
    elif status == "error":
        err = as_object(error, f"{w}: error")
        check_fields(err, required=("check", "message"), where=f"{w}: error")
        if err["check"] not in RECEIPT_CHECKS:
            raise FormatError(f"unknown error check {str(err['check'])[:40]!r}", where=w)
    else:
        raise FormatError(f"unknown status {status[:40]!r}", where=w)
    if body["audit_head"] is not None:
        parse_audit_head(body["audit_head"], f"{w}: audit_head")
    return body


def verify_receipt(data: bytes, enclave: PublicIdentity, *, where: str) -> dict[str, Any]:
    """A single-client run's receipt: check the enclave's signature; returns the receipt body."""
    obj = parse_json_object(data, where=where)
    check_fields(obj, required=("body", "signature"), where=where)
    body = get_typed(obj, "body", dict, where=where)
    sig = b64d(obj["signature"], field="signature", where=where, length=64)
    enclave.verify(sig, canonical_json(body), what=where)
    if body.get("format") != request.RECEIPT_FORMAT:
        raise FormatError(f"unknown receipt format {body.get('format')!r}", where=where)
    return body
