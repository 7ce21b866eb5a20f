"""The enclave service identity and its provisioning by mutual attestation (PROTOCOL.md sections 2, 6).

A pool of workers shares one service identity. The first worker creates it (``service_init``);
every later worker gets it from a provisioned one, enclave to enclave, each checking the other's
evidence from inside the enclave:

    new worker  provision_offer   -> fresh ephemeral key E, evidence binding E
    old worker  provision_grant   <- checks the new worker's evidence (same platform, same
                                     measurement, not debug unless itself debug, binds E);
                                     -> HPKE(service private key -> E), evidence binding the
                                        service key and nonce H(E line)
    new worker  provision_accept  <- checks the old worker's evidence the same way and that it binds
                                     nonce H(E line) of its *current* offer (no replayed or stale
                                     grant), opens the grant, checks the key is the attested one

Each worker keeps the service key sealed to its own measurement in its state directory and unseals
it at start. Its boot evidence (service key, no nonce) is what task receipts name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import hpke_box
from .backend import TeeBackend
from .encoding import b64d, b64e, hexd
from .errors import EnclaveError, EvidenceError, IntegrityError
from .keys import Identity, PublicIdentity
from .peer import check_peer
from .report_data import keys_binding, nonce_binding, report_data_for
from .state import seal_identity, state_path, unseal_identity

GRANT_PURPOSE = "service-key-grant"
SEAL_LABEL = b"service-identity"
MAX_NONCE_LEN = 64


class ServiceState:
    """This worker's view of the service identity: held (sealed on disk) or not, and a pending offer."""

    def __init__(self, backend: TeeBackend, state_dir: Path) -> None:
        self.backend = backend
        self.path = state_path(backend, state_dir, "service")
        self.identity: Identity | None = None
        self.boot_evidence: bytes | None = None
        self._offer: Identity | None = None
        if self.path.exists():
            self._hold(unseal_identity(backend, self.path, SEAL_LABEL, "service key"))

    # -- helpers ------------------------------------------------------------------------------------
    def _hold(self, identity: Identity) -> None:
        self.identity = identity
        self.boot_evidence = self._evidence(identity, None)

    def _evidence(self, identity: Identity, nonce: bytes | None) -> bytes:
        return self.backend.evidence(
            report_data_for(identity.public, nonce), extra={"service": identity.public.to_line()}
        )

    def require(self) -> Identity:
        if self.identity is None:
            raise EnclaveError(
                "this worker holds no service key yet (service_init on the first worker, "
                "or provision it from one that has it)",
                where="enclave service",
            )
        return self.identity

    @property
    def evidence_sha256(self) -> str:
        self.require()
        assert self.boot_evidence is not None
        return hashlib.sha256(self.boot_evidence).hexdigest()

    def _check_peer(self, evidence_b64: str, what: str) -> bytes:
        """The peer's evidence verified by the backend, from this same build; returns its report data."""
        return check_peer(self.backend, b64d(evidence_b64, field="evidence", where=what), what)

    # -- calls --------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        if self.identity is None:
            return {"provisioned": False, "service": None, "fingerprint": None, "evidence_sha256": None}
        return {
            "provisioned": True,
            "service": self.identity.public.to_line(),
            "fingerprint": self.identity.fingerprint,
            "evidence_sha256": self.evidence_sha256,
        }

    def init(self) -> dict[str, Any]:
        if self.identity is not None:
            raise EnclaveError(
                f"this worker already holds service key {self.identity.fingerprint}", where="service_init"
            )
        identity = Identity.generate("confide-service")
        seal_identity(self.backend, self.path, SEAL_LABEL, identity)
        self._hold(identity)
        return self.info()

    def evidence(self, nonce_hex: str) -> dict[str, Any]:
        identity = self.require()
        nonce = hexd(nonce_hex, field="nonce", where="service_evidence")
        if len(nonce) > MAX_NONCE_LEN:
            raise EnclaveError(f"nonce longer than {MAX_NONCE_LEN} bytes", where="service_evidence")
        evidence = self.boot_evidence if not nonce else self._evidence(identity, nonce)
        assert evidence is not None
        return {"evidence": b64e(evidence), "service": identity.public.to_line()}

    def offer(self) -> dict[str, Any]:
        if self.identity is not None:
            raise EnclaveError(
                f"this worker already holds service key {self.identity.fingerprint}", where="provision_offer"
            )
        self._offer = Identity.generate("confide-provision-offer")  # replaces any earlier offer
        line = self._offer.public.to_line()
        evidence = self.backend.evidence(report_data_for(self._offer.public, None), extra={"offer": line})
        return {"offer": line, "evidence": b64e(evidence)}

    def grant(self, offer_line: str, evidence_b64: str) -> dict[str, Any]:
        w = "provision_grant: the new worker's evidence"
        service = self.require()
        offer = PublicIdentity.from_line(offer_line, where="provision_grant: offer")
        report_data = self._check_peer(evidence_b64, w)
        if report_data != report_data_for(offer, None):
            raise EvidenceError("does not bind the offered key (report data mismatch): refused", where=w)
        nonce = _offer_nonce(offer)
        grant = hpke_box.seal(
            service.private_bytes(),
            offer.kem_key,
            GRANT_PURPOSE,
            offer=nonce.hex(),
            measurement=self.backend.identity.measurement,
        )
        return {"grant": b64e(grant), "evidence": b64e(self._evidence(service, nonce))}

    def accept(self, grant_b64: str, evidence_b64: str) -> dict[str, Any]:
        w = "provision_accept: the granting worker's evidence"
        if self.identity is not None:
            raise EnclaveError(
                f"this worker already holds service key {self.identity.fingerprint}", where="provision_accept"
            )
        if self._offer is None:
            raise EnclaveError(
                "no provisioning offer is pending (make an offer first; each offer is used once)",
                where="provision_accept",
            )
        report_data = self._check_peer(evidence_b64, w)
        nonce = _offer_nonce(self._offer.public)
        if report_data[32:] != nonce_binding(nonce):
            raise EvidenceError(
                "does not bind this worker's current offer (a stale or replayed grant): refused", where=w
            )
        sealed = b64d(grant_b64, field="grant", where="provision_accept")
        plain = hpke_box.open_sealed(
            sealed,
            self._offer.kem_key,
            GRANT_PURPOSE,
            where="provision_accept: grant",
            offer=nonce.hex(),
            measurement=self.backend.identity.measurement,
        )
        service = Identity.from_private_bytes(plain, where="provision_accept: grant")
        if report_data[:32] != keys_binding(service.public):
            raise IntegrityError(
                "the granted key is not the service key the granter's evidence attests",
                where="provision_accept",
            )
        seal_identity(self.backend, self.path, SEAL_LABEL, service)
        self._offer = None
        self._hold(service)
        return self.info()


def _offer_nonce(offer: PublicIdentity) -> bytes:
    return hashlib.sha256(offer.to_line().encode()).digest()
