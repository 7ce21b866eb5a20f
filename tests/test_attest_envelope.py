"""The `confide-evidence-v1` envelope real providers wrap hardware evidence in: strict unwrapping,
the inner evidence verified by its own verifier, nothing outside it trusted."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from confide.attest import detect, verify_evidence
from confide.attest.anchors import default_anchors
from confide.attest.envelope import EnvelopeVerifier, unwrap
from confide.attest.sev_snp import build_cert_table
from confide.enclave.errors import EvidenceError
from confide.enclave.providers.envelope import wrap_evidence

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"
AT = 1750377600
SGX_QUOTE = (TV / "sgx/sgx_quote.bin").read_bytes()
SGX_COL = (TV / "sgx/sgx_quote_collateral.json").read_bytes()
SNP_REPORT = (TV / "snp/snp_report_milan.bin").read_bytes()
SNP_VCEK = (TV / "snp/snp_vcek_milan.der").read_bytes()


def _env(**over: Any) -> bytes:
    doc: dict[str, Any] = json.loads(
        wrap_evidence(kind="dcap-quote", provider="gramine-sgx", evidence=SGX_QUOTE, extra={"enclave": "k"})
    )
    doc.update(over)
    return json.dumps(doc).encode()


def test_envelope_is_detected_and_verified() -> None:
    ev = _env()
    assert detect(ev).name == "envelope" and EnvelopeVerifier().sniff(ev)
    c = EnvelopeVerifier().verify(ev, at=AT, anchors=default_anchors(), collateral=SGX_COL)
    assert c.backend == "sgx" and c.extra["enclave"] == "k" and c.extra["bound_by_report_data"] == ["enclave"]
    assert c == verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SGX_COL)


def test_unsigned_extra_never_overrides_verified_claims() -> None:
    ev = _env(extra={"quote_version": "99", "enclave": "k"})
    c = verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SGX_COL)
    assert c.extra["quote_version"] == 3


def test_tampered_inner_evidence_fails() -> None:
    q = bytearray(SGX_QUOTE)
    q[48 + 320] ^= 1  # report data
    ev = _env(evidence=base64.b64encode(bytes(q)).decode())
    with pytest.raises(EvidenceError, match="(?i)signature"):
        verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SGX_COL)


def test_snp_envelope_uses_its_certificates_unless_collateral_is_given() -> None:
    table = build_cert_table({"vcek": SNP_VCEK})
    ev = wrap_evidence(
        kind="sev-snp-report", provider="tsm", evidence=SNP_REPORT, extra={}, certificates=table
    )
    assert (
        verify_evidence(ev, at=AT, anchors=default_anchors()).extra["certificates_from"]
        == "certificate table"
    )
    c = verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SNP_VCEK)
    assert c.extra["certificates_from"] == "DER certificate"


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"format": "confide-evidence-v2"}, "unrecognised evidence format"),  # not ours, nor anyone's
        ({"kind": "tpm-quote"}, "unknown evidence kind"),
        ({"kind": "sev-snp-report"}, "not in that format"),
        ({"evidence": "not base64!"}, "base64"),
        ({"extra": {"enclave": 5}}, "must be text"),
        ({"extra": "k"}, "extra"),
        ({"certificates": 7}, "certificates"),
        ({"surprise": 1}, "unknown field"),
    ],
)
def test_malformed_envelopes_are_refused(over: dict[str, Any], words: str) -> None:
    ev = _env(**over)
    with pytest.raises(EvidenceError) as info:
        verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SGX_COL)
    assert words.lower() in str(info.value).lower()


def test_envelope_structure_errors() -> None:
    with pytest.raises(EvidenceError, match="duplicate"):
        unwrap(b'{"format":"confide-evidence-v1","format":"confide-evidence-v1"}')
    nested = wrap_evidence(kind="dcap-quote", provider="x", evidence=_env(), extra={})
    with pytest.raises(EvidenceError, match="another envelope"):
        unwrap(nested)
    missing = json.loads(_env())
    del missing["provider"]
    with pytest.raises(EvidenceError, match="provider"):
        unwrap(json.dumps(missing).encode())
    with pytest.raises(ValueError, match="unknown evidence kind"):
        wrap_evidence(kind="nitro", provider="x", evidence=b"", extra={})
