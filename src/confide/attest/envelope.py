"""The `confide-evidence-v1` envelope real providers return (confide.enclave.providers.envelope).

Unwrapping is strict (no duplicate or unknown fields, base64 checked, sizes capped); the inner
evidence is then verified by the verifier of its declared kind, which must also be the format it
sniffs as. The envelope's SEV-SNP certificate table is used as collateral unless the caller gives
collateral explicitly. Nothing in the envelope but the inner evidence is trusted: the enclave key in
`extra` is reported in the claims (extra["enclave"]) for the policy to check against report data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from confide.enclave.encoding import b64d, check_fields, get_typed, parse_json_object
from confide.enclave.errors import EvidenceError, FormatError
from confide.enclave.providers.envelope import EVIDENCE_ENVELOPE_FORMAT, KINDS

from .claims import Claims, TrustAnchors, VerifierBase

__all__ = ["Envelope", "EnvelopeVerifier", "unwrap"]

W = "evidence envelope"
MAX_ENVELOPE_LEN = 256 * 1024
MAX_EXTRA_VALUE_LEN = 4096
_FORMAT_RE = re.compile(rb'"format"\s*:\s*"' + re.escape(EVIDENCE_ENVELOPE_FORMAT.encode()) + rb'"')
# the verifier (by name) that handles each kind
KIND_VERIFIER = {"dcap-quote": "dcap", "sev-snp-report": "sev-snp"}


@dataclass(frozen=True)
class Envelope:
    kind: str
    provider: str
    evidence: bytes
    certificates: bytes | None
    extra: dict[str, str]

    def annotate(self, claims: Claims) -> Claims:
        """The inner evidence's claims, plus what the envelope carried beside it (unsigned: the enclave
        key is trusted only once the policy has matched it against report data)."""
        extra: dict[str, Any] = dict(claims.extra)
        for key, value in self.extra.items():
            extra.setdefault(key, value)
        extra["provider"] = self.provider
        extra["bound_by_report_data"] = sorted(self.extra)
        return replace(claims, extra=extra)


def sniff(evidence: bytes) -> bool:
    try:
        return evidence.lstrip()[:1] == b"{" and _FORMAT_RE.search(evidence[:MAX_ENVELOPE_LEN]) is not None
    except (TypeError, AttributeError):
        return False


def unwrap(evidence: bytes) -> Envelope:
    if len(evidence) > MAX_ENVELOPE_LEN:
        raise EvidenceError(f"envelope is {len(evidence)} bytes, more than {MAX_ENVELOPE_LEN}", where=W)
    try:
        obj = parse_json_object(evidence, where=W)
        check_fields(
            obj, required=("format", "kind", "provider", "evidence", "certificates", "extra"), where=W
        )
        if obj["format"] != EVIDENCE_ENVELOPE_FORMAT:
            raise FormatError(f"unknown envelope format {obj['format']!r}", where=W)
        kind = get_typed(obj, "kind", str, where=W)
        if kind not in KINDS:
            raise FormatError(f"unknown evidence kind {kind!r} (known: {', '.join(KINDS)})", where=W)
        provider = get_typed(obj, "provider", str, where=W)
        inner = b64d(obj["evidence"], field="evidence", where=W)
        certs = (
            None if obj["certificates"] is None else b64d(obj["certificates"], field="certificates", where=W)
        )
        extra = get_typed(obj, "extra", dict, where=W)
        for key, value in extra.items():
            if not isinstance(value, str) or len(value) > MAX_EXTRA_VALUE_LEN:
                raise FormatError(
                    f"extra field {key!r} must be text of at most {MAX_EXTRA_VALUE_LEN}", where=W
                )
    except FormatError as exc:
        raise EvidenceError(exc.message, where=exc.where or W) from None
    if sniff(inner):
        raise EvidenceError("an envelope may not contain another envelope", where=W)
    return Envelope(kind=kind, provider=provider, evidence=inner, certificates=certs, extra=dict(extra))


class EnvelopeVerifier(VerifierBase):
    """Verifies the hardware evidence inside a Confide evidence envelope."""

    name = "envelope"
    where = W

    def sniff(self, evidence: bytes) -> bool:
        return sniff(evidence)

    def _verify(self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None) -> Claims:
        env = unwrap(evidence)
        inner = inner_verifier(env)
        claims = inner.verify(
            env.evidence,
            at=at,
            anchors=anchors,
            collateral=collateral if collateral is not None else env.certificates,
        )
        return env.annotate(claims)


def inner_verifier(env: Envelope) -> Any:
    """The verifier for the envelope's declared kind, after checking the evidence really is that kind."""
    from . import verifiers  # the registry imports this module

    wanted = KIND_VERIFIER[env.kind]
    for v in verifiers():
        if v.name == wanted:
            if not v.sniff(env.evidence):
                raise EvidenceError(
                    f"envelope says {env.kind!r} but its evidence is not in that format", where=W
                )
            return v
    raise EvidenceError(f"no verifier for evidence kind {env.kind!r}", where=W)  # pragma: no cover
