"""Evidence verification, pure software, run by clients (never trusted to the host).

``verify_evidence`` picks the verifier whose format matches and checks authenticity at a given
time; ``confide.policy`` then decides whether the verified claims are acceptable.
"""

from __future__ import annotations

import importlib
from functools import cache

from confide.enclave.errors import EvidenceError

from .claims import Claims, TrustAnchors, Verifier

# (module, class): one entry per evidence format. Order matters only for sniffing.
_REGISTRY: tuple[tuple[str, str], ...] = (
    ("confide.attest.sim", "SimVerifier"),
    ("confide.attest.sgx_dcap", "DcapVerifier"),  # SGX and TDX quotes
    ("confide.attest.sev_snp", "SevSnpVerifier"),
    ("confide.attest.nitro", "NitroVerifier"),
)


@cache
def verifiers() -> tuple[Verifier, ...]:
    return tuple(getattr(importlib.import_module(mod), cls)() for mod, cls in _REGISTRY)


def verify_evidence(
    evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None = None
) -> Claims:
    for verifier in verifiers():
        if verifier.sniff(evidence):
            return verifier.verify(evidence, at=at, anchors=anchors, collateral=collateral)
    known = ", ".join(v.name for v in verifiers())
    raise EvidenceError(f"unrecognised evidence format (this build verifies: {known})", where="evidence")


__all__ = ["Claims", "TrustAnchors", "Verifier", "verifiers", "verify_evidence"]
