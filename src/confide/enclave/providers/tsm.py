"""SEV-SNP and TDX confidential VMs: evidence through Linux configfs-tsm, for running the whole host
and enclave inside a CVM.

configfs-tsm (Documentation/ABI/testing/configfs-tsm-report), one directory per report request:
  /sys/kernel/config/tsm/report/<name>/   created by mkdir
    inblob           write up to 64 bytes of report data
    outblob          read: the report (provider "sev_guest": the 1184-byte SNP ATTESTATION_REPORT;
                     "tdx_guest": a TDX DCAP quote)
    auxblob          read (SEV-SNP): the host's certificate table (VCEK/VLEK, ASK, ARK), may be empty
    provider         "sev_guest" or "tdx_guest"
    generation       incremented by every write; read before and after to detect another writer
    privlevel, privlevel_floor   (SEV-SNP) VMPL of the report

This backend uses its own report directory (the ABI's way to avoid conflicts), checks that the
generation did not change between writing inblob and reading outblob, and checks that the report
it got carries the report data it wrote. Identity comes from the hardware report (SNP MEASUREMENT,
TDX MRTD); a verifier obtains the expected value with `sev-snp-measure` (SNP) or from the TD's
build (MRTD/RTMRs), see docs/backends/sev-snp.md and tdx.md.

Sealing keys: SEV-SNP derives them in firmware (MSG_KEY_REQ through /dev/sev-guest's
SNP_GET_DERIVED_KEY ioctl, mixing in the launch measurement, or for the "signer" policy the family
and image ids, and the guest policy). TDX has no sealing key; this backend refuses to make one
rather than fall back to something weaker (docs/backends/tdx.md).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from .layout import HardwareIdentity, dcap_quote, snp_report

DEFAULT_TSM_DIR = Path("/sys/kernel/config/tsm/report")
DEFAULT_SEV_GUEST_DEVICE = Path("/dev/sev-guest")
PROVIDERS = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}
MAX_OUTBLOB = 32 * 1024  # TSM_OUTBLOB_MAX
MAX_AUXBLOB = 64 * 1024

# <linux/sev-guest.h>
SNP_GUEST_REQ_IOC_TYPE = ord("S")
MSG_KEY_RSP_STATUS_OFFSET = 0x00
MSG_KEY_RSP_KEY_OFFSET = 0x20
GUEST_FIELD_POLICY = 1 << 0
GUEST_FIELD_IMAGE_ID = 1 << 1
GUEST_FIELD_FAMILY_ID = 1 << 2
GUEST_FIELD_MEASUREMENT = 1 << 3
SNP_FIELDS: dict[str, int] = {
    "measurement": GUEST_FIELD_MEASUREMENT | GUEST_FIELD_POLICY,
    "signer": GUEST_FIELD_FAMILY_ID | GUEST_FIELD_IMAGE_ID | GUEST_FIELD_POLICY,
}


class SnpDerivedKeyReq(ctypes.Structure):
    _fields_ = (
        ("root_key_select", ctypes.c_uint32),  # 0: VCEK, 1: VMRK
        ("rsvd", ctypes.c_uint32),
        ("guest_field_select", ctypes.c_uint64),
        ("vmpl", ctypes.c_uint32),
        ("guest_svn", ctypes.c_uint32),
        ("tcb_version", ctypes.c_uint64),
    )


class SnpDerivedKeyResp(ctypes.Structure):
    _fields_ = (("data", ctypes.c_uint8 * 64),)


class SnpGuestRequestIoctl(ctypes.Structure):
    _fields_ = (
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    )


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (SNP_GUEST_REQ_IOC_TYPE << 8) | nr


SNP_GET_DERIVED_KEY = _iowr(0x1, ctypes.sizeof(SnpGuestRequestIoctl))

IoctlFn = Callable[[int, int, Any], Any]


def snp_derived_key(device: Path, *, fields: int, vmpl: int, ioctl: IoctlFn = fcntl.ioctl) -> bytes:
    """A 32-byte key the SEV-SNP firmware derives from the VCEK and the selected guest fields."""
    req = SnpDerivedKeyReq(
        root_key_select=0, rsvd=0, guest_field_select=fields, vmpl=vmpl, guest_svn=0, tcb_version=0
    )
    resp = SnpDerivedKeyResp()
    arg = SnpGuestRequestIoctl(
        msg_version=1, req_data=ctypes.addressof(req), resp_data=ctypes.addressof(resp), exitinfo2=0
    )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfideError(
            f"cannot open the SEV-SNP guest device for a derived sealing key ({exc.strerror or exc})",
            where=str(device),
        ) from None
    try:
        ioctl(fd, SNP_GET_DERIVED_KEY, arg)
    except OSError as exc:
        raise ConfideError(
            f"SNP_GET_DERIVED_KEY failed ({exc.strerror or exc}; firmware/VMM error 0x{arg.exitinfo2:016x})",
            where=str(device),
        ) from None
    finally:
        os.close(fd)
    data = bytes(resp.data)
    status = int.from_bytes(data[MSG_KEY_RSP_STATUS_OFFSET : MSG_KEY_RSP_STATUS_OFFSET + 4], "little")
    if status != 0:
        raise ConfideError(
            f"SEV-SNP firmware refused the key request (status 0x{status:x})", where=str(device)
        )
    key = data[MSG_KEY_RSP_KEY_OFFSET : MSG_KEY_RSP_KEY_OFFSET + 32]
    if not any(key):
        raise ConfideError("SEV-SNP firmware returned an all-zero derived key", where=str(device))
    return key


class TsmBackend:
    """The `tsm` TEE backend: SEV-SNP or TDX through configfs-tsm."""

    simulated = False
    name = "tsm"

    def __init__(
        self,
        config: EnclaveConfig,
        *,
        base: Path = DEFAULT_TSM_DIR,
        entry: str | None = None,
        sev_guest_device: Path = DEFAULT_SEV_GUEST_DEVICE,
        ioctl: IoctlFn = fcntl.ioctl,
    ) -> None:
        self._dir = Path(base) / (entry or f"confide-{os.getpid()}-{secrets.token_hex(4)}")
        self._device = Path(sev_guest_device)
        self._ioctl = ioctl
        try:
            self._dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfideError(
                f"cannot create a configfs-tsm report entry ({exc.strerror or exc}); is configfs mounted "
                "and is this a confidential VM with the sev-guest or tdx-guest driver?",
                where=str(self._dir),
            ) from None
        provider = read_attribute(self._dir / "provider", "TSM provider", limit=64).decode("ascii", "replace")
        provider = provider.strip("\0\n ")
        if provider not in PROVIDERS:
            raise ConfideError(
                f"unknown configfs-tsm provider {provider!r} (supported: {', '.join(PROVIDERS)})",
                where=str(self._dir / "provider"),
            )
        self._provider = provider
        self._backend = PROVIDERS[provider]
        # Identity from the hardware: a report for all-zero report data (its binding is not needed
        # here; every evidence() call checks its own binding and that the measurement is unchanged).
        hw, _, _ = self._report(bytes(REPORT_DATA_LEN), check_binding=False)
        if hw.debug and not config.debug:
            raise ConfideError(
                f"the {self._backend} guest runs with DEBUG allowed by its launch policy (the host can read "
                "its memory) but the enclave configuration says debug = false",
                where=str(self._dir),
            )
        self._hw = hw
        self._identity = EnclaveIdentity(
            backend=self._backend,
            measurement=hw.measurement.hex(),
            signer=hw.signer.hex() if any(hw.signer) else "",
            product_id=hw.product_id,
            security_version=hw.security_version,
            debug=hw.debug,
        )

    @property
    def identity(self) -> EnclaveIdentity:
        return self._identity

    @property
    def report_dir(self) -> Path:
        return self._dir

    def _generation(self) -> int:
        raw = read_attribute(self._dir / "generation", "generation", limit=64).decode("ascii", "replace")
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfideError(
                f"generation is not a number: {raw!r}", where=str(self._dir / "generation")
            ) from None

    def _report(
        self, report_data: bytes, *, check_binding: bool = True
    ) -> tuple[HardwareIdentity, bytes, bytes]:
        """Write inblob, read outblob (and auxblob); returns (identity read, outblob, auxblob)."""
        floor_path = self._dir / "privlevel_floor"
        if floor_path.exists():
            floor = read_attribute(floor_path, "privlevel_floor", limit=64).decode("ascii", "replace").strip()
            if floor not in ("", "0"):
                write_attribute(self._dir / "privlevel", floor.encode() + b"\n", "privlevel")
        write_attribute(self._dir / "inblob", report_data, "inblob")
        before = self._generation()
        outblob = read_attribute(self._dir / "outblob", "outblob", limit=MAX_OUTBLOB)
        aux_path = self._dir / "auxblob"
        auxblob = read_attribute(aux_path, "auxblob", limit=MAX_AUXBLOB) if aux_path.exists() else b""
        after = self._generation()
        if after != before:
            raise ConfideError(
                f"another writer used this report entry while the report was generated (generation "
                f"{before} -> {after}); retry",
                where=str(self._dir),
            )
        where = str(self._dir / "outblob")
        if self._backend == "sev-snp":
            hw = snp_report(outblob, where=where)
        else:
            hw = dcap_quote(outblob, where=where)
            if hw.backend != "tdx":
                raise ConfideError(f"tdx_guest returned a {hw.backend} quote", where=where)
        if check_binding and hw.report_data != report_data:
            raise ConfideError(
                "the report does not carry the report data written to inblob "
                f"(report has {hw.report_data[:8].hex()}…, wrote {report_data[:8].hex()}…)",
                where=where,
            )
        return hw, outblob, auxblob if self._backend == "sev-snp" else b""

    def evidence(self, report_data: bytes, *, extra: dict[str, str]) -> bytes:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report data must be {REPORT_DATA_LEN} bytes")
        hw, outblob, auxblob = self._report(report_data)
        if hw.measurement != self._hw.measurement:
            raise ConfideError(
                f"the report's measurement {hw.measurement.hex()[:16]}… differs from this guest's "
                f"{self._hw.measurement.hex()[:16]}…",
                where=str(self._dir / "outblob"),
            )
        certificates = auxblob if any(auxblob) else None
        kind = "sev-snp-report" if self._backend == "sev-snp" else "dcap-quote"
        return wrap_evidence(
            kind=kind, provider=self.name, evidence=outblob, extra=extra, certificates=certificates
        )

    def sealing_key(self, policy: SealPolicy, label: bytes) -> bytes:
        if policy not in SNP_FIELDS:
            raise ValueError(f"unknown sealing policy {policy!r}")
        if self._backend != "sev-snp":
            raise ConfideError(
                "TDX gives a guest no sealing key: sealed enclave state needs a key broker that releases "
                "a key after verifying this TD's quote (not built in); the tsm backend refuses to invent one",
                where="tsm sealing key",
            )
        key = snp_derived_key(self._device, fields=SNP_FIELDS[policy], vmpl=self._hw.vmpl, ioctl=self._ioctl)
        info = b"confide-seal-v1\0tsm-sev-snp\0" + policy.encode() + b"\0" + label
        return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(key)

    def verify_peer(self, evidence: bytes) -> tuple[EnclaveIdentity, bytes]:
        peer_verification_unsupported(self.identity.backend)
