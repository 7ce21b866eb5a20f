"""What every evidence verifier returns: the verified claims of one piece of evidence.

A verifier checks authenticity only (signatures, certificate chains, collateral validity at a
given time). Whether the claims are acceptable is the policy's job (confide.client.policy).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

from confide.enclave.errors import EvidenceError, FormatError


@dataclass(frozen=True)
class ChainCert:
    """One certificate of the chain that vouches for the evidence's signing key (leaf first)."""

    role: str  # e.g. "PCK leaf", "ASK", "root"
    subject: str  # RFC 4514 text
    sha256: str  # SHA-256 of the DER, hex
    not_before: int  # unix seconds
    not_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "subject": self.subject,
            "sha256": self.sha256,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


@dataclass(frozen=True)
class Claims:
    """The verified claims of one piece of evidence, the same model for every format.

    `measurement` is the format's primary code identity; `measurements` names every measurement
    register the format has (SGX: mrenclave, mrsigner; TDX: mrtd, rtmr0..3, mrconfigid, ...; SEV-SNP:
    measurement, host_data, id_key_digest, author_key_digest, chip_id, ...; Nitro: pcr0..pcrN), all
    lowercase hex. `signing_chain` is the certificate chain of the key that signed the evidence, leaf
    first; [`valid_from`, `valid_until`] is the window in which every certificate and every piece of
    collateral used is valid: the evidence verifies at any time inside it and at none outside it.
    """

    backend: str  # "sim" | "sgx" | "tdx" | "sev-snp" | "nitro"
    measurement: str  # hex: MRENCLAVE / MRTD / SNP measurement / Nitro PCR0 / sim measurement
    signer: str  # hex: MRSIGNER, sim signer; "" where the format has none
    product_id: int
    security_version: int
    debug: bool
    report_data: bytes  # 64 bytes chosen by the enclave (zero-padded where the format has fewer)
    simulated: bool
    issued_at: int | None = None  # unix seconds, when the evidence carries a time
    tcb_status: str = ""  # e.g. "UpToDate", "SWHardeningNeeded" (DCAP); "" where not applicable
    advisories: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (PCRs, enclave keys, ...)
    measurements: dict[str, str] = field(default_factory=dict)  # named registers -> lowercase hex
    signing_chain: tuple[ChainCert, ...] = ()  # leaf first, the trusted root last
    valid_from: int | None = None  # unix seconds; None where the format has no window
    valid_until: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "simulated": self.simulated,
            "measurement": self.measurement,
            "signer": self.signer,
            "product_id": self.product_id,
            "security_version": self.security_version,
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "issued_at": self.issued_at,
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "measurements": dict(self.measurements),
            "signing_chain": [c.to_json() for c in self.signing_chain],
            "valid_from": self.valid_from,
            "valid_until": self.valid_until,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> Claims:
        """The inverse of `to_json` (for claims this party verified earlier and stored signed, see
        confide.client.attest_cache); FormatError on anything else."""
        if not isinstance(data, dict):
            raise FormatError("claims must be an object", where="claims")
        try:
            chain = tuple(ChainCert(**c) for c in data["signing_chain"])
            claims = cls(
                backend=str(data["backend"]),
                measurement=str(data["measurement"]),
                signer=str(data["signer"]),
                product_id=int(data["product_id"]),
                security_version=int(data["security_version"]),
                debug=bool(data["debug"]),
                report_data=bytes.fromhex(data["report_data"]),
                simulated=bool(data["simulated"]),
                issued_at=None if data["issued_at"] is None else int(data["issued_at"]),
                tcb_status=str(data["tcb_status"]),
                advisories=tuple(str(a) for a in data["advisories"]),
                extra=dict(data["extra"]),
                measurements={str(k): str(v) for k, v in dict(data["measurements"]).items()},
                signing_chain=chain,
                valid_from=None if data["valid_from"] is None else int(data["valid_from"]),
                valid_until=None if data["valid_until"] is None else int(data["valid_until"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"malformed claims ({type(exc).__name__}: {exc})", where="claims") from None
        if len(claims.report_data) != 64:
            raise FormatError("claims' report data must be 64 bytes", where="claims")
        return claims


@dataclass(frozen=True)
class TrustAnchors:
    """Roots a verifier may chain to. Paths/PEM/DER bytes are loaded by the caller."""

    sim_roots: tuple[bytes, ...] = ()  # DER certificates of simulated vendor roots
    intel_sgx_roots: tuple[bytes, ...] = ()  # DER
    amd_ark_chains: tuple[bytes, ...] = ()  # PEM bundles (ASK/ASVK + ARK)
    nitro_roots: tuple[bytes, ...] = ()  # PEM

    def digest(self) -> str:
        """SHA-256 over every anchor, by kind and in order: equal digests, equal anchors."""
        h = hashlib.sha256(b"confide-trust-anchors-v1\0")
        for kind in ("sim_roots", "intel_sgx_roots", "amd_ark_chains", "nitro_roots"):
            items: tuple[bytes, ...] = getattr(self, kind)
            h.update(f"{kind}:{len(items)}\0".encode())
            for item in items:
                h.update(len(item).to_bytes(8, "big") + item)
        return h.hexdigest()


class Verifier(Protocol):
    """One evidence format. Registered in confide.attest.VERIFIERS."""

    name: str

    def sniff(self, evidence: bytes) -> bool:
        """Cheap check: does this look like my format? Never raises."""
        ...

    def verify(
        self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None = None
    ) -> Claims:
        """Verify authenticity at unix time `at`; raise EvidenceError naming what failed."""
        ...


class VerifierBase(ABC):
    """Shared front door of every verifier: checks argument types and turns any exception a library
    parser raises on hostile input into an EvidenceError naming the format. Subclasses implement
    `_verify(evidence: bytes, ...)` and may raise FormatError or EvidenceError."""

    name: str = ""
    where: str = "evidence"

    def verify(
        self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None = None
    ) -> Claims:
        if not isinstance(evidence, bytes | bytearray | memoryview):
            raise EvidenceError(f"evidence must be bytes, got {type(evidence).__name__}", where=self.where)
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < 1 << 63:
            raise EvidenceError(
                f"verification time must be a non-negative integer of unix seconds, got {at!r}",
                where=self.where,
            )
        try:
            return self._verify(bytes(evidence), at=at, anchors=anchors, collateral=collateral)
        except EvidenceError:
            raise
        except FormatError as exc:
            raise EvidenceError(exc.message, where=exc.where or self.where) from None
        except Exception as exc:  # a parser deep in a library choked on hostile input
            raise EvidenceError(
                f"malformed input (unexpected {type(exc).__name__}: {exc})", where=self.where
            ) from exc

    @abstractmethod
    def _verify(self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None) -> Claims:
        """Verify `evidence` (already bytes) at `at`; raise EvidenceError or FormatError naming the fault."""
