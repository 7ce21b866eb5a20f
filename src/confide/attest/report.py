"""Helpers for tools that verify evidence: certificate files as collateral, and claims as text."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from confide.enclave.errors import FormatError

from .anchors import utc_iso
from .claims import Claims
from .sev_snp import looks_like_cert_table

__all__ = ["certificate_collateral", "claims_lines"]


def certificate_collateral(files: Sequence[tuple[str, bytes]]) -> bytes:
    """Turn certificate files given on the command line into SEV-SNP collateral.

    One file is passed as it is: a DER or PEM certificate (or PEM bundle), or a certificate table
    (configfs-tsm auxblob). Several files (e.g. the VCEK, then ASK and ARK) become one PEM bundle;
    a certificate table must then come alone."""
    if len(files) == 1:
        return files[0][1]
    pems: list[bytes] = []
    for name, data in files:
        if looks_like_cert_table(data):
            raise FormatError("a certificate table (auxblob) must be the only --cert given", where=name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # AMD's VCEK has serial number 0
                certs = (
                    x509.load_pem_x509_certificates(data)
                    if b"-----BEGIN" in data
                    else [x509.load_der_x509_certificate(data)]
                )
        except ValueError as exc:
            raise FormatError(f"not a PEM or DER certificate ({exc})", where=name) from None
        pems.extend(c.public_bytes(Encoding.PEM) for c in certs)
    return b"".join(pems)


def _window(claims: Claims) -> str:
    if claims.valid_from is None or claims.valid_until is None:
        return "(no validity window)"
    return f"{utc_iso(claims.valid_from)} … {utc_iso(claims.valid_until)}"


def claims_lines(claims: Claims) -> list[str]:
    """Claims as indented lines for a terminal: identity, measurements, TCB, chain, window."""
    lines = [
        f"backend: {claims.backend}{' (SIMULATED)' if claims.simulated else ''}",
        f"measurement: {claims.measurement}",
    ]
    if claims.signer:
        lines.append(f"signer: {claims.signer}")
    lines += [
        f"product_id: {claims.product_id}",
        f"security_version: {claims.security_version}",
        f"debug: {str(claims.debug).lower()}",
        f"report_data: {claims.report_data.hex()}",
    ]
    if claims.issued_at is not None:
        lines.append(f"issued_at: {utc_iso(claims.issued_at)}")
    if claims.tcb_status:
        lines.append(f"tcb_status: {claims.tcb_status}")
        lines.append(f"advisories: {', '.join(claims.advisories) or 'none'}")
    if claims.measurements:
        lines.append("measurements:")
        lines += [f"  {name}: {value}" for name, value in claims.measurements.items()]
    if claims.signing_chain:
        lines.append("signing_chain (leaf first):")
        lines += [
            f"  {c.role}: {c.subject} (sha256 {c.sha256[:16]}…, valid {utc_iso(c.not_before)} … "
            f"{utc_iso(c.not_after)})"
            for c in claims.signing_chain
        ]
    lines.append(f"valid: {_window(claims)}")
    shown = {"enclave", "provider", "bound_by_report_data"}
    extra: dict[str, Any] = {k: v for k, v in claims.extra.items() if k in shown}
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    return lines
