"""The evidence envelope real providers return: hardware evidence plus what travels beside it.

    {"format": "confide-evidence-v1",
     "kind": "dcap-quote" | "sev-snp-report",
     "provider": "gramine-sgx" | "tsm",
     "evidence": base64 of the hardware's evidence (quote or report) as it came from the interface,
     "certificates": base64 of the SEV-SNP certificate table (configfs-tsm auxblob) or null,
     "extra": {"enclave": "<the enclave's public identity line>", ...}}

Only `evidence` is signed by the hardware. `extra` is bound through the report data (the first 32
bytes are SHA-256 over the enclave's public keys, see report_data.report_data_for), so a verifier that
checks report data against the keys it is given learns they are the attested enclave's. The
certificates are checked up to a pinned AMD root like any others. The verifier side is
confide.attest.envelope.
"""

from __future__ import annotations

from confide.enclave.encoding import b64e, canonical_json

EVIDENCE_ENVELOPE_FORMAT = "confide-evidence-v1"
KINDS = ("dcap-quote", "sev-snp-report")


def wrap_evidence(
    *, kind: str, provider: str, evidence: bytes, extra: dict[str, str], certificates: bytes | None = None
) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown evidence kind {kind!r}")
    return canonical_json(
        {
            "format": EVIDENCE_ENVELOPE_FORMAT,
            "kind": kind,
            "provider": provider,
            "evidence": b64e(evidence),
            "certificates": b64e(certificates) if certificates else None,
            "extra": dict(extra),
        }
    )
