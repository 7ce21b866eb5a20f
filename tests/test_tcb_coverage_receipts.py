"""confide.enclave.manifest task receipts: a receipt signed by the service key but malformed (another
format, an ok status with an error, an unknown status or error check, a bad audit head, another
service named inside) is refused by the verifier, as is an unsigned edit; make_task_receipt refuses
an unknown error check."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from confide.client.receipts import verify_task_receipt
from confide.enclave.encoding import b64e, canonical_json
from confide.enclave.errors import ConfideError, FormatError, IntegrityError
from confide.enclave.keys import Identity
from confide.enclave.manifest import RECEIPT_CHECKS, RECEIPT_FIELDS, make_task_receipt

SERVICE, OTHER = Identity.generate("service"), Identity.generate("other")
H = "ab" * 32


def receipt(**kw: Any) -> bytes:
    args: dict[str, Any] = {
        "task_id": "t1",
        "manifest_sha256": H,
        "function_digest": H,
        "inputs": [{"name": "a", "dataset_id": "d", "ciphertext_sha256": H}],
        "outputs": [{"name": "o", "sha256": H, "size": 3}],
        "measurement": H,
        "backend": "sim",
        "simulated": True,
        "evidence_sha256": H,
        "started_at": 1,
        "ended_at": 2,
        "run": 1,
        "max_runs": 1,
        **kw,
    }
    return make_task_receipt(SERVICE, **args)


def resigned(change: Callable[[dict[str, Any]], None], signer: Identity = SERVICE) -> bytes:
    body = json.loads(receipt())["body"]
    change(body)
    return canonical_json({"body": body, "signature": b64e(signer.sign(canonical_json(body)))})


def test_a_good_receipt_verifies_with_and_without_error_and_audit_head() -> None:
    assert verify_task_receipt(receipt(), SERVICE.public)["status"] == "ok"
    err = receipt(error={"check": RECEIPT_CHECKS[0], "message": "m"}, audit_head={"seq": 3, "sha256": H})
    body = verify_task_receipt(err, SERVICE.public)
    assert body["status"] == "error" and body["audit_head"] == {"seq": 3, "sha256": H}


def test_the_signed_body_has_exactly_the_fields_the_client_requires() -> None:
    """RECEIPT_FIELDS (enclave) is the one list of fields: make_task_receipt signs those, and the
    client's verify_task_receipt refuses a body with one missing or one more."""
    for data in (receipt(), receipt(error={"check": RECEIPT_CHECKS[0], "message": "m"})):
        assert sorted(json.loads(data)["body"]) == sorted(RECEIPT_FIELDS)
    with pytest.raises(FormatError, match="audit_head"):
        verify_task_receipt(resigned(lambda b: b.pop("audit_head")), SERVICE.public)
    with pytest.raises(FormatError, match="extra"):
        verify_task_receipt(resigned(lambda b: b.update(extra=1)), SERVICE.public)


def test_make_receipt_refuses_an_unknown_check() -> None:
    with pytest.raises(ValueError, match="error check must be one of"):
        receipt(error={"check": "vibes", "message": "m"})


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda b: b.update(format="confide-receipt-v0"), FormatError, "unknown receipt format"),
        (
            lambda b: b.update(error={"check": RECEIPT_CHECKS[0], "message": "m"}),
            FormatError,
            "status ok with an error",
        ),
        (lambda b: b.update(run=2), IntegrityError, "receipt of run 2 beyond the 1 run(s) approved"),
        (lambda b: b.update(status="maybe"), FormatError, "unknown status 'maybe'"),
        (
            lambda b: b.update(status="error", error={"check": "vibes", "message": "m"}),
            FormatError,
            "unknown error check 'vibes'",
        ),
        (lambda b: b.update(audit_head={"seq": -1, "sha256": H}), FormatError, "audit_head"),
        (lambda b: b.update(audit_head={"seq": 1, "sha256": "zz"}), FormatError, "audit_head"),
        (lambda b: b.update(service=OTHER.public.to_line()), IntegrityError, "names another service key"),
        (lambda b: b.update(inputs=["a"]), FormatError, "inputs"),
    ],
)
def test_malformed_signed_receipts_are_refused(
    change: Callable[[dict[str, Any]], None], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        verify_task_receipt(resigned(change), SERVICE.public)
    assert message in str(info.value) and "task receipt" in str(info.value)


def test_an_edit_without_the_service_key_is_refused() -> None:
    with pytest.raises(ConfideError):
        verify_task_receipt(resigned(lambda b: b.update(run=1), signer=OTHER), SERVICE.public)
