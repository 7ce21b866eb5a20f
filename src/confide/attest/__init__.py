"""Evidence verification, pure software, run by clients (never trusted to the host).

``verify_evidence`` picks the verifier whose format matches and checks authenticity at a given
time; ``confide.client.policy`` then decides whether the verified claims are acceptable.

Formats: the sim backend's evidence, Intel SGX/TDX DCAP quotes, AMD SEV-SNP reports, AWS Nitro
attestation documents, and the `confide-evidence-v1` envelope real providers wrap them in. Every
verifier returns the same `Claims` and binds report data the same way: 64 bytes, the first 32 the
hash of the enclave's public keys, the last 32 the hash of the verifier's nonce.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from confide.enclave.errors import EvidenceError

from .claims import ChainCert, Claims, TrustAnchors, Verifier

if TYPE_CHECKING:
    from .pccs import PccsClient

# (module, class): one entry per evidence format. Order matters only for sniffing.
_REGISTRY: tuple[tuple[str, str], ...] = (
    ("confide.attest.envelope", "EnvelopeVerifier"),  # real providers' evidence + enclave key
    ("confide.attest.sim", "SimVerifier"),
    ("confide.attest.sgx_dcap", "DcapVerifier"),  # SGX and TDX quotes
    ("confide.attest.sev_snp", "SevSnpVerifier"),
    ("confide.attest.nitro", "NitroVerifier"),
)


@cache
def verifiers() -> tuple[Verifier, ...]:
    return tuple(getattr(importlib.import_module(mod), cls)() for mod, cls in _REGISTRY)


def detect(evidence: bytes) -> Verifier:
    """The verifier whose format `evidence` has; EvidenceError when none recognises it."""
    for verifier in verifiers():
        if verifier.sniff(evidence):
            return verifier
    known = ", ".join(v.name for v in verifiers())
    raise EvidenceError(f"unrecognised evidence format (this build verifies: {known})", where="evidence")


def detect_hardware(evidence: bytes) -> Verifier:
    """Like `detect`, but for a provider's envelope the verifier of the hardware evidence inside it."""
    verifier = detect(evidence)
    if verifier.name == "envelope":
        from .envelope import inner_verifier, unwrap

        return inner_verifier(unwrap(evidence))  # type: ignore[no-any-return]
    return verifier


def verify_evidence(
    evidence: bytes,
    *,
    at: int,
    anchors: TrustAnchors,
    collateral: bytes | None = None,
    pccs: PccsClient | None = None,
) -> Claims:
    """Verify `evidence` at unix time `at` against `anchors`. `collateral`: DCAP collateral JSON, or
    the SEV-SNP VCEK/VLEK (DER, PEM, or a certificate table); for a DCAP quote given no collateral,
    `pccs` (if any) fetches it. Raises EvidenceError naming what failed."""
    verifier = detect(evidence)
    if verifier.name == "envelope":
        from .envelope import inner_verifier, unwrap

        env = unwrap(evidence)
        inner = inner_verifier(env)
        col = collateral if collateral is not None else env.certificates
        if col is None and inner.name == "dcap" and pccs is not None:
            col = pccs.collateral(env.evidence, at=at)
        return env.annotate(inner.verify(env.evidence, at=at, anchors=anchors, collateral=col))
    if collateral is None and verifier.name == "dcap" and pccs is not None:
        collateral = pccs.collateral(evidence, at=at)
    return verifier.verify(evidence, at=at, anchors=anchors, collateral=collateral)


__all__ = [
    "ChainCert",
    "Claims",
    "TrustAnchors",
    "Verifier",
    "detect",
    "detect_hardware",
    "verifiers",
    "verify_evidence",
]
