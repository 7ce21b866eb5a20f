"""Intel SGX under Gramine: evidence, identity and sealing keys through /dev/attestation.

Gramine's pseudo-filesystem (Gramine docs, "Attestation and Secret Provisioning"):
  attestation_type   "dcap" when the manifest sets sgx.remote_attestation = "dcap"
  user_report_data   write 64 bytes; the next report/quote carries them as REPORTDATA
  my_target_info     this enclave's 512-byte TARGETINFO
  target_info        write a TARGETINFO; the next `report` is an EREPORT addressed to it
  report             the SGX REPORT (384-byte body, key id, MAC)
  quote              an ECDSA (DCAP) quote from the Quoting Enclave for the last user_report_data
  keys/_sgx_mrenclave, keys/_sgx_mrsigner   16-byte EGETKEY sealing keys (MRENCLAVE / MRSIGNER policy)

Identity comes from the hardware: an EREPORT addressed to this enclave itself gives MRENCLAVE,
MRSIGNER, ISVPRODID, ISVSVN and ATTRIBUTES.DEBUG. The verifier obtains the expected MRENCLAVE from
`gramine-sgx-sign` (it prints it when it signs the manifest), see docs/backends/sgx.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confide.enclave.backend import (
    EnclaveIdentity,
    SealPolicy,
    peer_verification_unsupported,
)
from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import ConfideError
from confide.enclave.report_data import REPORT_DATA_LEN

from . import read_attribute, write_attribute
from .envelope import wrap_evidence
from .layout import SGX_REPORT_BODY_LEN, HardwareIdentity, dcap_quote, sgx_report_body

DEFAULT_ATTESTATION_DIR = Path("/dev/attestation")
TARGET_INFO_LEN = 512
SGX_KEY_LEN = 16
MAX_QUOTE_LEN = 64 * 1024
_SEAL_KEY_FILES: dict[str, str] = {"measurement": "_sgx_mrenclave", "signer": "_sgx_mrsigner"}


class GramineSgxBackend:
    """The `gramine-sgx` TEE backend."""

    simulated = False
    name = "gramine-sgx"

    def __init__(self, config: EnclaveConfig, *, base: Path = DEFAULT_ATTESTATION_DIR) -> None:
        self._base = Path(base)
        self._where = str(self._base)
        kind = read_attribute(self._base / "attestation_type", "Gramine attestation type", limit=64)
        kind_text = kind.decode("ascii", "replace").strip("\0\n ")
        if kind_text != "dcap":
            raise ConfideError(
                f"Gramine attestation type is {kind_text!r}; Confide needs DCAP quotes "
                '(set sgx.remote_attestation = "dcap" in the manifest)',
                where=str(self._base / "attestation_type"),
            )
        hw = self._own_report()
        if hw.debug and not config.debug:
            raise ConfideError(
                "the enclave runs in SGX DEBUG mode (ATTRIBUTES.DEBUG set: the host can read its memory) "
                "but its configuration says debug = false; sign the manifest with sgx.debug = false",
                where=self._where,
            )
        self._hw = hw
        self._identity = EnclaveIdentity(
            backend="sgx",
            measurement=hw.measurement.hex(),
            signer=hw.signer.hex(),
            product_id=hw.product_id,
            security_version=hw.security_version,
            debug=hw.debug,
        )

    @property
    def identity(self) -> EnclaveIdentity:
        return self._identity

    def _own_report(self) -> HardwareIdentity:
        """EREPORT addressed to this enclave itself: the hardware's statement of its identity."""
        target = read_attribute(self._base / "my_target_info", "my_target_info", limit=4096)
        if len(target) != TARGET_INFO_LEN:
            raise ConfideError(
                f"my_target_info is {len(target)} bytes, expected {TARGET_INFO_LEN}", where=self._where
            )
        write_attribute(self._base / "target_info", target, "target_info")
        write_attribute(self._base / "user_report_data", bytes(REPORT_DATA_LEN), "user_report_data")
        report = read_attribute(self._base / "report", "SGX report", limit=4096)
        if len(report) < SGX_REPORT_BODY_LEN:
            raise ConfideError(
                f"SGX report is {len(report)} bytes, shorter than its {SGX_REPORT_BODY_LEN}-byte body",
                where=str(self._base / "report"),
            )
        return sgx_report_body(report[:SGX_REPORT_BODY_LEN], where=str(self._base / "report"))

    def evidence(self, report_data: bytes, *, extra: dict[str, str]) -> bytes:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report data must be {REPORT_DATA_LEN} bytes")
        write_attribute(self._base / "user_report_data", report_data, "user_report_data")
        quote = read_attribute(self._base / "quote", "SGX quote", limit=MAX_QUOTE_LEN)
        where = str(self._base / "quote")
        got = dcap_quote(quote, where=where)
        if got.backend != "sgx":
            raise ConfideError(f"Gramine returned a {got.backend} quote, expected SGX", where=where)
        if got.report_data != report_data:
            raise ConfideError(
                "the quote does not carry the report data just written to user_report_data "
                f"(quote has {got.report_data[:8].hex()}…, wrote {report_data[:8].hex()}…)",
                where=where,
            )
        if got.measurement != self._hw.measurement or got.signer != self._hw.signer:
            raise ConfideError(
                f"the quote is for MRENCLAVE {got.measurement.hex()[:16]}…, not this enclave's "
                f"{self._hw.measurement.hex()[:16]}…",
                where=where,
            )
        return wrap_evidence(kind="dcap-quote", provider=self.name, evidence=quote, extra=extra)

    def sealing_key(self, policy: SealPolicy, label: bytes) -> bytes:
        name = _SEAL_KEY_FILES.get(policy)
        if name is None:
            raise ValueError(f"unknown sealing policy {policy!r}")
        raw = read_attribute(self._base / "keys" / name, f"SGX sealing key {name}", limit=64)
        if len(raw) != SGX_KEY_LEN:
            raise ConfideError(
                f"SGX sealing key {name} is {len(raw)} bytes, expected {SGX_KEY_LEN}",
                where=str(self._base / "keys" / name),
            )
        # The EGETKEY key is used only as HKDF input keying material, never directly (Gramine warns
        # against using the same key for an encrypted mount and the application's own crypto).
        info = b"confide-seal-v1\0gramine-sgx\0" + policy.encode() + b"\0" + label
        return HKDF(
            hashes.SHA256(), 32, salt=hashlib.sha256(b"confide-gramine-sgx").digest(), info=info
        ).derive(raw)

    def verify_peer(self, evidence: bytes) -> tuple[EnclaveIdentity, bytes]:
        peer_verification_unsupported(self.identity.backend)
