"""TEE backends: what the hardware gives an enclave, behind one interface.

Every backend offers the same three things (DESIGN.md, "TEE backends"):
  * evidence binding 64 bytes of report data chosen by the enclave,
  * an identity (measurement, signer, product id, security version, debug flag),
  * sealing keys bound to that identity.
The enclave runtime only sees ``TeeBackend``. ``SimBackend`` is the one implemented here; Gramine-SGX
(/dev/attestation), configfs-tsm (SEV-SNP/TDX) and Nitro (NSM device) providers implement the same
three methods; their evidence is checked by the verifiers in ``confide.attest``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .config import EnclaveConfig
from .encoding import b64d, b64e, canonical_json, check_fields, get_typed, hexd, parse_json_object
from .errors import ConfideError, EnclaveError, EvidenceError
from .measurement import measure
from .report_data import REPORT_DATA_LEN
from .sim_platform import SimPlatform

SIM_EVIDENCE_FORMAT = "confide-sim-evidence-v1"
SIM_NOTICE = (
    "SIMULATED TEE: produced by the Confide sim backend. It gives NO protection against the host: "
    "anyone with the platform directory can forge this evidence and read enclave memory."
)
# The simulated signer (MRSIGNER): constant across releases so per-signer sealing survives upgrades.
SIM_SIGNER = hashlib.sha256(b"confide-sim-signer-v1:confide-dev-release-key").hexdigest()

SealPolicy = Literal["measurement", "signer"]


@dataclass(frozen=True)
class EnclaveIdentity:
    backend: str
    measurement: str
    signer: str
    product_id: int
    security_version: int
    debug: bool


class TeeBackend(Protocol):
    simulated: bool  # True only for the sim backend: it protects nothing against the host

    @property
    def identity(self) -> EnclaveIdentity: ...

    def evidence(self, report_data: bytes, *, extra: dict[str, str]) -> bytes:
        """Evidence binding `report_data` (64 bytes); `extra` is carried unsigned-by-hardware but
        covered where the format allows (the enclave's public keys)."""
        ...

    def sealing_key(self, policy: SealPolicy, label: bytes) -> bytes: ...

    def verify_peer(self, evidence: bytes) -> tuple[EnclaveIdentity, bytes]:
        """Mutual attestation (PROTOCOL.md section 6): check, inside this enclave, that `evidence` is
        authentic evidence of an enclave on the same kind of TEE; returns its identity and its 64
        bytes of report data. The caller decides whether that identity is acceptable."""
        peer_verification_unsupported(self.identity.backend)


def peer_verification_unsupported(backend: str) -> NoReturn:
    """For providers that cannot yet verify another enclave's evidence from inside the enclave."""
    raise EnclaveError(
        f"mutual attestation not supported by backend {backend!r} in this build "
        "(the service key cannot be provisioned to or from this worker)",
        where="verify_peer",
    )


MAX_PEER_EVIDENCE = 64 << 10
SIM_BODY_FIELDS = (
    "backend",
    "simulated",
    "notice",
    "measurement",
    "signer",
    "product_id",
    "security_version",
    "debug",
    "report_data",
    "time",
    "extra",
)


class SimBackend:
    """The simulated TEE: evidence signed by the installation's simulated platform key."""

    simulated = True

    def __init__(self, platform: SimPlatform, identity: EnclaveIdentity) -> None:
        self._platform = platform
        self._identity = identity

    @property
    def identity(self) -> EnclaveIdentity:
        return self._identity

    def evidence(self, report_data: bytes, *, extra: dict[str, str]) -> bytes:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report data must be {REPORT_DATA_LEN} bytes")
        ident = self._identity
        body = canonical_json(
            {
                "backend": "sim",
                "simulated": True,
                "notice": SIM_NOTICE,
                "measurement": ident.measurement,
                "signer": ident.signer,
                "product_id": ident.product_id,
                "security_version": ident.security_version,
                "debug": ident.debug,
                "report_data": report_data.hex(),
                "time": int(time.time()),
                "extra": extra,
            }
        )
        signature = self._platform.pak_key.sign(SIM_EVIDENCE_FORMAT.encode() + b"\0" + body)
        return canonical_json(
            {
                "format": SIM_EVIDENCE_FORMAT,
                "body": b64e(body),
                "signature": b64e(signature),
                "certificates": [b64e(self._platform.pak_der)],
            }
        )

    def sealing_key(self, policy: SealPolicy, label: bytes) -> bytes:
        ident = self._identity
        bound = ident.measurement if policy == "measurement" else f"{ident.signer}/{ident.product_id}"
        info = b"confide-seal-v1\0" + policy.encode() + b"\0" + bound.encode() + b"\0" + label
        return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(self._platform.secret)

    def verify_peer(self, evidence: bytes) -> tuple[EnclaveIdentity, bytes]:
        """Sim evidence signed by this simulated platform's attestation key (same installation)."""
        w = "peer evidence"
        if len(evidence) > MAX_PEER_EVIDENCE:
            raise EvidenceError(f"longer than {MAX_PEER_EVIDENCE} bytes", where=w)
        outer = parse_json_object(evidence, where=w)
        check_fields(outer, required=("format", "body", "signature", "certificates"), where=w)
        if outer["format"] != SIM_EVIDENCE_FORMAT:
            raise EvidenceError(f"not sim evidence (format {str(outer['format'])[:60]!r})", where=w)
        certs = get_typed(outer, "certificates", list, where=w)
        if len(certs) != 1 or b64d(certs[0], field="certificates[0]", where=w) != self._platform.pak_der:
            raise EvidenceError(
                "not certified by this simulated platform's attestation key (another platform?)", where=w
            )
        body = b64d(outer["body"], field="body", where=w)
        signature = b64d(outer["signature"], field="signature", where=w, length=64)
        try:
            self._platform.pak_key.public_key().verify(signature, SIM_EVIDENCE_FORMAT.encode() + b"\0" + body)
        except InvalidSignature:
            raise EvidenceError(
                "signature does not verify under the platform attestation key", where=w
            ) from None
        parsed = parse_sim_body(body, where=f"{w} body")
        return parsed.identity, parsed.report_data


@dataclass(frozen=True)
class SimEvidenceBody:
    identity: EnclaveIdentity
    report_data: bytes
    time: int
    notice: str
    extra: dict[str, Any]


def parse_sim_body(body: bytes, *, where: str) -> SimEvidenceBody:
    """Strictly parse the signed body of sim evidence (after its signature was checked). Shared by
    the enclave (`verify_peer`) and the client's verifier (`confide.attest.sim`)."""
    claims = parse_json_object(body, where=where)
    check_fields(claims, required=SIM_BODY_FIELDS, where=where)
    if claims["backend"] != "sim" or claims["simulated"] is not True:
        raise EvidenceError("sim evidence must declare backend 'sim' and simulated true", where=where)
    return SimEvidenceBody(
        identity=EnclaveIdentity(
            backend="sim",
            measurement=hexd(claims["measurement"], field="measurement", where=where, length=32).hex(),
            signer=hexd(claims["signer"], field="signer", where=where, length=32).hex(),
            product_id=get_typed(claims, "product_id", int, where=where),
            security_version=get_typed(claims, "security_version", int, where=where),
            debug=get_typed(claims, "debug", bool, where=where),
        ),
        report_data=hexd(claims["report_data"], field="report_data", where=where, length=REPORT_DATA_LEN),
        time=get_typed(claims, "time", int, where=where),
        notice=get_typed(claims, "notice", str, where=where),
        extra=get_typed(claims, "extra", dict, where=where),
    )


def _sim(platform_dir: Path, config: EnclaveConfig) -> TeeBackend:
    # the simulated CPU measures the enclave, as a real one would at load time
    identity = EnclaveIdentity(
        backend="sim",
        measurement=measure(config).value,
        signer=SIM_SIGNER,
        product_id=config.product_id,
        security_version=config.security_version,
        debug=config.debug,
    )
    return SimBackend(SimPlatform.load(platform_dir), identity)


def _gramine_sgx(platform_dir: Path, config: EnclaveConfig) -> TeeBackend:
    from .providers.gramine_sgx import GramineSgxBackend  # imported here: providers import this module

    return GramineSgxBackend(config)  # /dev/attestation; the simulated platform directory is unused


def _tsm(platform_dir: Path, config: EnclaveConfig) -> TeeBackend:
    from .providers.tsm import TsmBackend

    return TsmBackend(config)  # /sys/kernel/config/tsm/report


# Evidence providers by name; the enclave runtime only ever sees the TeeBackend interface.
BACKENDS: dict[str, Callable[[Path, EnclaveConfig], TeeBackend]] = {
    "sim": _sim,
    "gramine-sgx": _gramine_sgx,
    "tsm": _tsm,
}


def create_backend(name: str, *, platform_dir: Path, config: EnclaveConfig) -> TeeBackend:
    factory = BACKENDS.get(name)
    if factory is None:
        raise ConfideError(
            f"unknown TEE backend {name!r} (this build provides: {', '.join(BACKENDS)})", where="--backend"
        )
    return factory(platform_dir, config)
