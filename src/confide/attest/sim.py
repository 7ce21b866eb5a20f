"""Verifier for the Confide sim backend's evidence. Authentic means: signed by a platform key whose
certificate chains to a trusted simulated vendor root, valid at the time checked. It is still
simulated: the policy rejects it unless it explicitly allows simulation."""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide.enclave.backend import SIM_EVIDENCE_FORMAT, parse_sim_body
from confide.enclave.encoding import b64d, check_fields, get_typed, parse_json_object
from confide.enclave.errors import EvidenceError

from .anchors import chain_cert, check_signature_algorithm, check_validity, parse_der_certificate, window
from .claims import Claims, TrustAnchors, VerifierBase

W = "sim evidence"
_ED25519_ALGID = bytes.fromhex("300506032b6570")  # AlgorithmIdentifier { id-Ed25519 }
_FORMAT_RE = re.compile(rb'"format"\s*:\s*"' + re.escape(SIM_EVIDENCE_FORMAT.encode()) + rb'"')


def _verify_cert(cert: x509.Certificate, issuer: x509.Certificate, *, at: int, what: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise EvidenceError(f"{what}: issuer key is not Ed25519", where=W)
    if check_signature_algorithm(cert, what, where=W) != _ED25519_ALGID:
        raise EvidenceError(f"{what}: certificate is not signed with Ed25519", where=W)
    if cert.issuer != issuer.subject:
        raise EvidenceError(f"{what}: issuer does not match the trusted root's subject", where=W)
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        raise EvidenceError(
            f"{what}: certificate signature does not verify under the trusted root", where=W
        ) from None
    check_validity(cert, at, what, where=W)


class SimVerifier(VerifierBase):
    name = "sim"
    where = W

    def sniff(self, evidence: bytes) -> bool:
        return evidence.lstrip()[:1] == b"{" and _FORMAT_RE.search(evidence) is not None

    def _verify(self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None) -> Claims:
        outer = parse_json_object(evidence, where=W)
        check_fields(outer, required=("format", "body", "signature", "certificates"), where=W)
        if outer["format"] != SIM_EVIDENCE_FORMAT:
            raise EvidenceError(f"unknown format {outer['format']!r}", where=W)
        body = b64d(outer["body"], field="body", where=W)
        signature = b64d(outer["signature"], field="signature", where=W, length=64)
        certs = get_typed(outer, "certificates", list, where=W)
        if len(certs) != 1:
            raise EvidenceError("expected exactly one platform certificate", where=W)
        pak = parse_der_certificate(
            b64d(certs[0], field="certificates[0]", where=W), "platform certificate", where=W
        )
        if not anchors.sim_roots:
            raise EvidenceError(
                "no simulated vendor root is trusted (no sim root in the trust anchors)", where=W
            )
        errors = []
        for der in anchors.sim_roots:
            try:
                root = parse_der_certificate(der, "simulated vendor root", where="trust anchors")
                _verify_cert(pak, root, at=at, what="platform")
                chain = (
                    chain_cert(pak, "platform key (simulated)"),
                    chain_cert(root, "vendor root (simulated)"),
                )
                break
            except EvidenceError as exc:
                errors.append(exc.message)
        else:
            raise EvidenceError("; ".join(errors), where=W)
        pak_key = pak.public_key()
        if not isinstance(pak_key, Ed25519PublicKey):
            raise EvidenceError("platform key is not Ed25519", where=W)
        try:
            pak_key.verify(signature, SIM_EVIDENCE_FORMAT.encode() + b"\0" + body)
        except InvalidSignature:
            raise EvidenceError(
                "evidence signature does not verify under the platform key", where=W
            ) from None
        parsed = parse_sim_body(body, where=f"{W} body")
        ident = parsed.identity
        measurement, signer = ident.measurement, ident.signer
        valid_from, valid_until = window(chain)
        return Claims(
            backend="sim",
            measurement=measurement,
            signer=signer,
            product_id=ident.product_id,
            security_version=ident.security_version,
            debug=ident.debug,
            report_data=parsed.report_data,
            simulated=True,
            issued_at=parsed.time,
            extra={"notice": parsed.notice, **parsed.extra},
            measurements={"measurement": measurement, "signer": signer},
            signing_chain=chain,
            valid_from=valid_from,
            valid_until=valid_until,
        )
