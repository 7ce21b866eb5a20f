"""The few fixed-offset fields a provider reads from its own hardware's output.

A provider does not verify its evidence (the verifier does that, with dcap-qvl or pyca); it only
reads its identity (measurement, signer, debug flag, security version) and checks that the evidence
the interface returned binds the report data it wrote, so a stale or mixed-up answer is caught at
the source. Offsets: Intel SGX SDK `sgx_report_body_t`, Intel TDX DCAP quote v4/v5 (TD report body),
AMD SEV-SNP firmware ABI `ATTESTATION_REPORT`. Every read is bounds-checked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from confide.enclave.errors import ConfideError

DCAP_HEADER_LEN = 48
SGX_REPORT_BODY_LEN = 384
TD_REPORT_BODY_MIN_LEN = 584
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
SNP_REPORT_LEN = 0x4A0
SNP_DEBUG_BIT = 19


@dataclass(frozen=True)
class HardwareIdentity:
    backend: str  # "sgx" | "tdx" | "sev-snp"
    measurement: bytes  # MRENCLAVE / MRTD / SNP MEASUREMENT
    signer: bytes  # MRSIGNER; SNP ID key digest (zeros when none); empty for TDX
    product_id: int
    security_version: int
    debug: bool
    report_data: bytes  # 64 bytes
    vmpl: int = 0  # SEV-SNP only


def _need(data: bytes, end: int, what: str, where: str) -> None:
    if len(data) < end:
        raise ConfideError(f"{what} is {len(data)} bytes, too short (needs {end})", where=where)


def sgx_report_body(body: bytes, *, where: str) -> HardwareIdentity:
    """Fields of an SGX REPORT body (sgx_report_body_t, 384 bytes)."""
    _need(body, SGX_REPORT_BODY_LEN, "SGX report body", where)
    flags = int.from_bytes(body[48:56], "little")
    isv_prod_id, isv_svn = struct.unpack_from("<HH", body, 256)
    return HardwareIdentity(
        backend="sgx",
        measurement=body[64:96],
        signer=body[128:160],
        product_id=isv_prod_id,
        security_version=isv_svn,
        debug=bool(flags & 0x2),  # ATTRIBUTES.DEBUG
        report_data=body[320:384],
    )


def dcap_quote(quote: bytes, *, where: str) -> HardwareIdentity:
    """The report body of an SGX (v3/v4/v5) or TDX (v4/v5) DCAP quote."""
    _need(quote, DCAP_HEADER_LEN, "quote", where)
    version, _, tee_type = struct.unpack_from("<HHI", quote, 0)
    if version not in (3, 4, 5):
        raise ConfideError(f"quote version {version} is not a DCAP quote (3, 4 or 5)", where=where)
    offset = DCAP_HEADER_LEN + (6 if version == 5 else 0)  # v5: body type (u16) + body size (u32)
    if tee_type == TEE_SGX:
        _need(quote, offset + SGX_REPORT_BODY_LEN, "SGX quote", where)
        return sgx_report_body(quote[offset : offset + SGX_REPORT_BODY_LEN], where=where)
    if tee_type != TEE_TDX:
        raise ConfideError(f"quote has unknown TEE type 0x{tee_type:08x}", where=where)
    _need(quote, offset + TD_REPORT_BODY_MIN_LEN, "TDX quote", where)
    body = quote[offset : offset + TD_REPORT_BODY_MIN_LEN]
    return HardwareIdentity(
        backend="tdx",
        measurement=body[136:184],  # MRTD
        signer=b"",
        product_id=0,
        security_version=body[0],  # TEE_TCB_SVN[0]: the TDX module's SVN
        debug=bool(body[120] & 0x1),  # TD_ATTRIBUTES.DEBUG
        report_data=body[520:584],
    )


def snp_report(report: bytes, *, where: str) -> HardwareIdentity:
    """Fields of an SEV-SNP ATTESTATION_REPORT (1184 bytes)."""
    if len(report) != SNP_REPORT_LEN:
        raise ConfideError(f"SEV-SNP report is {len(report)} bytes, expected {SNP_REPORT_LEN}", where=where)
    _, guest_svn, policy = struct.unpack_from("<IIQ", report, 0)
    (vmpl,) = struct.unpack_from("<I", report, 0x30)
    return HardwareIdentity(
        backend="sev-snp",
        measurement=report[0x90:0xC0],
        signer=report[0xE0:0x110],  # ID_KEY_DIGEST (zeros when the guest was launched without one)
        product_id=0,
        security_version=guest_svn,
        debug=bool(policy >> SNP_DEBUG_BIT & 1),
        report_data=report[0x50:0x90],
        vmpl=vmpl,
    )
