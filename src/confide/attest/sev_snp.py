"""AMD SEV-SNP attestation reports (as read from /dev/sev-guest or configfs-tsm), verified with pyca.

Evidence: the 1184-byte ATTESTATION_REPORT (SEV-SNP firmware ABI spec, table "ATTESTATION_REPORT
Structure"), report versions 2 and 3 (and the later 4 and 5, whose signed layout is the same).

Collateral: the certificate of the key that signed it, the chip's VCEK or the cloud provider's VLEK
as served by AMD's KDS, given as
  - one DER certificate, or a PEM bundle (the VCEK/VLEK, optionally followed by ASK/ASVK and ARK), or
  - the certificate table the hypervisor returns with an extended report (configfs-tsm's `auxblob`,
    GHCB specification "MSG_REPORT_REQ" / SNP_GET_EXT_REPORT): entries of a 16-byte GUID, a 32-bit
    offset and a 32-bit length, ended by an all-zero entry; offsets count from the table's start.
Certificates that come with the evidence are never trusted by themselves: an ASK/ASVK or ARK among
them must be the same certificate as one of the trusted AMD chains (TrustAnchors.amd_ark_chains:
PEM bundles of ASK or ASVK followed by ARK, one per product).

Checks: report layout and signature algorithm; ECDSA P-384/SHA-384 signature (r and s stored as
72-byte little-endian numbers, the rest of the signature field zero) over bytes 0x000..0x29F with the
VCEK/VLEK public key; VCEK <- ASK <- ARK or VLEK <- ASVK <- ARK, each an RSA-PSS SHA-384 signature
with a 48-byte salt, ARK self-signed, every certificate valid at the time checked; the product of the
chain matches the report's CPUID (report version 3 and later); the certificate's TCB extensions equal
the report's REPORTED_TCB and (VCEK) its hardware ID equals the report's CHIP_ID.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from confide.attest.anchors import (
    cert_name,
    chain_cert,
    check_signature_algorithm,
    check_validity,
    name_text,
    parse_der_certificate,
    parse_pem_certificates,
    public_key,
    window,
)
from confide.attest.claims import Claims, TrustAnchors, VerifierBase
from confide.enclave.errors import EvidenceError

__all__ = [
    "CERT_TABLE_GUIDS",
    "SevSnpVerifier",
    "build_cert_table",
    "looks_like_cert_table",
    "parse_cert_table",
]

REPORT_LEN = 0x4A0  # 1184
SIGNED_LEN = 0x2A0  # the signature covers bytes 0x000..0x29F
SIG_OFFSET = 0x2A0
SIG_COMPONENT_LEN = 72  # r and s: little-endian, zero-extended to 72 bytes
SIG_ALGO_ECDSA_P384_SHA384 = 1
POLICY_DEBUG_BIT = 19
SUPPORTED_VERSIONS = (2, 3, 4, 5)
SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}
TURIN_FAMILY = 0x1A

# AMD KDS certificate extensions (VCEK/VLEK specification)
OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
OID_HWID = "1.3.6.1.4.1.3704.1.4"

# GHCB specification, certificate table GUIDs (RFC 4122 byte order, as the hypervisor writes them).
CERT_TABLE_GUIDS: dict[str, bytes] = {
    "vcek": uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes,
    "vlek": uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes,
    "ask": uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes,
    "ark": uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes,
}
_GUID_NAMES = {v: k for k, v in CERT_TABLE_GUIDS.items()}
CERT_TABLE_ENTRY_LEN = 24
MAX_CERT_TABLE_ENTRIES = 64
MAX_COLLATERAL_LEN = 1 << 20

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_WHERE = "sev-snp report"
_TABLE_WHERE = "sev-snp certificate table"


def _fail(message: str, where: str = _WHERE) -> EvidenceError:
    return EvidenceError(message, where=where)


# ----------------------------------------------------------------------------------------------
# the certificate table (configfs-tsm auxblob, SNP_GET_EXT_REPORT)


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """The certificates in a GHCB certificate table, by name ("vcek", "vlek", "ask", "ark"; unknown
    GUIDs as "guid:<uuid>"). Raises EvidenceError naming the entry for any inconsistency."""
    data = bytes(blob)
    entries: list[tuple[bytes, int, int]] = []
    pos = 0
    while True:
        if pos + CERT_TABLE_ENTRY_LEN > len(data):
            raise _fail(
                f"table is not terminated by an all-zero entry (ran out of data at offset {pos})",
                _TABLE_WHERE,
            )
        guid = data[pos : pos + 16]
        offset, length = struct.unpack_from("<II", data, pos + 16)
        pos += CERT_TABLE_ENTRY_LEN
        if not any(guid) and offset == 0 and length == 0:
            break
        if len(entries) == MAX_CERT_TABLE_ENTRIES:
            raise _fail(f"table has more than {MAX_CERT_TABLE_ENTRIES} entries", _TABLE_WHERE)
        entries.append((guid, offset, length))
    if not entries:
        raise _fail(
            "table is empty (the host supplied no certificates): pass the VCEK/VLEK certificate instead",
            _TABLE_WHERE,
        )
    table_end = pos
    out: dict[str, bytes] = {}
    for i, (guid, offset, length) in enumerate(entries):
        name = _GUID_NAMES.get(guid, f"guid:{uuid.UUID(bytes=guid)}")
        if name in out:
            raise _fail(f"entry {i} repeats the {name.upper()} GUID", _TABLE_WHERE)
        if length == 0:
            raise _fail(f"entry {i} ({name}) has length 0", _TABLE_WHERE)
        if offset < table_end or offset + length > len(data):
            raise _fail(
                f"entry {i} ({name}) points at bytes {offset}..{offset + length}, outside the "
                f"certificate area {table_end}..{len(data)}",
                _TABLE_WHERE,
            )
        out[name] = data[offset : offset + length]
    return out


def build_cert_table(certs: Mapping[str, bytes], *, pad_to: int = 0) -> bytes:
    """A GHCB certificate table holding DER certificates by name ("vcek", "vlek", "ask", "ark"),
    zero-padded to `pad_to` bytes (the kernel returns whole pages)."""
    header_len = (len(certs) + 1) * CERT_TABLE_ENTRY_LEN
    header = b""
    body = b""
    for name, der in certs.items():
        header += CERT_TABLE_GUIDS[name] + struct.pack("<II", header_len + len(body), len(der))
        body += der
    blob = header + bytes(CERT_TABLE_ENTRY_LEN) + body
    return blob + bytes(max(0, pad_to - len(blob)))


@dataclass(frozen=True)
class _Supplied:
    """Certificates that came with the evidence: the signing key's, and optionally ASK/ASVK and ARK."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    source: str  # "DER certificate", "PEM bundle", "certificate table"


# ----------------------------------------------------------------------------------------------
# helpers


def _decode_tcb(raw: int, turin: bool) -> dict[str, int]:
    """TCB_VERSION (8 bytes, little-endian). Milan/Genoa: BL, TEE, 4 reserved, SNP, microcode;
    Turin: FMC, BL, TEE, SNP, 3 reserved, microcode."""
    b = raw.to_bytes(8, "little")
    if turin:
        return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


def _der_small_uint(value: bytes, what: str) -> int:
    """A KDS TCB extension value: a DER INTEGER (tag 0x02, short length, non-negative)."""
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 9 or value[2] & 0x80:
        raise _fail(f"{what} is not a small non-negative DER INTEGER ({value[:12].hex()})")
    return int.from_bytes(value[2:], "big")


def _ext(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:
        raise _fail(f"{cert_name(cert)} certificate has malformed extensions ({e})") from e
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        return child.issuer == parent.subject
    except Exception:  # names are parsed lazily; a malformed name matches nothing
        return False


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _verify_pss(child: x509.Certificate, parent: x509.Certificate, what: str) -> None:
    key = public_key(parent, what, where=_WHERE)
    if not isinstance(key, rsa.RSAPublicKey):
        raise _fail(f"{what}: issuer {cert_name(parent)!r} does not hold an RSA key")
    try:
        pss_sha384 = child.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS and isinstance(
            child.signature_hash_algorithm, hashes.SHA384
        )
    except Exception:  # unknown or malformed algorithm parameters
        pss_sha384 = False
    if not pss_sha384:
        raise _fail(f"{what}: certificate {cert_name(child)!r} is not signed with RSASSA-PSS SHA-384")
    # The outer algorithm identifier is not signed: it must equal the signed one. (The signature check
    # below uses fixed parameters, MGF1 SHA-384 and a 48-byte salt, whatever the certificate says.)
    check_signature_algorithm(child, what, where=_WHERE)
    if not _issued_by(child, parent):
        raise _fail(
            f"{what}: certificate {cert_name(child)!r} names issuer {name_text(child)!r}, "
            f"not {name_text(parent, 'subject')!r}"
        )
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise _fail(
            f"{what}: RSA-PSS SHA-384 signature on {cert_name(child)!r} does not verify "
            f"with the key of {cert_name(parent)!r}"
        ) from None


def _product_of_cpuid(family: int, model: int) -> str | None:
    """The AMD product whose VCEK/ARK applies to a CPU (report v3+ CPUID fields); None if unknown."""
    if family == 0x19 and model <= 0x0F:
        return "Milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "Genoa"  # Genoa, Bergamo and Siena share Genoa's keys
    if family == TURIN_FAMILY:
        return "Turin"
    return None


class SevSnpVerifier(VerifierBase):
    """AMD SEV-SNP attestation report signed by a VCEK (or VLEK), chained to AMD's ARK."""

    name = "sev-snp"
    where = _WHERE
    backends: tuple[str, ...] = ("sev-snp",)

    def sniff(self, evidence: bytes) -> bool:
        try:
            if len(evidence) != REPORT_LEN:
                return False
            (version,) = struct.unpack_from("<I", evidence, 0x00)
            (algo,) = struct.unpack_from("<I", evidence, 0x34)
            return version in SUPPORTED_VERSIONS and algo == SIG_ALGO_ECDSA_P384_SHA384
        except (TypeError, struct.error):
            return False

    def _verify(self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None) -> Claims:
        r = evidence
        if len(r) != REPORT_LEN:
            raise _fail(f"report is {len(r)} bytes; an SEV-SNP ATTESTATION_REPORT is exactly {REPORT_LEN}")
        f = self._parse(r)

        if f["signature_algo"] != SIG_ALGO_ECDSA_P384_SHA384:
            raise _fail(
                f"SIGNATURE_ALGO (offset 0x34) is {f['signature_algo']}, expected 1 (ECDSA P-384 with SHA-384)"
            )
        if f["signing_key"] not in ("vcek", "vlek"):
            raise _fail(f"report was not signed by a VCEK or VLEK (SIGNING_KEY field = {f['signing_key']})")

        supplied = self._supplied(collateral, f["signing_key"])
        self._check_report_signature(r, supplied.leaf)
        ask, ark = self._check_chain(supplied, f, at, anchors)
        self._check_leaf_matches_report(supplied.leaf, f)
        chain = (
            chain_cert(supplied.leaf, f["signing_key"].upper()),
            chain_cert(ask, "ASVK" if f["signing_key"] == "vlek" else "ASK"),
            chain_cert(ark, "ARK (root)"),
        )
        return self._claims(f, chain, supplied.source)

    # -- parsing ---------------------------------------------------------------------------------

    @staticmethod
    def _parse(r: bytes) -> dict[str, Any]:
        version, guest_svn, policy = struct.unpack_from("<IIQ", r, 0x00)
        if version not in SUPPORTED_VERSIONS:
            raise _fail(f"unsupported report VERSION {version} (offset 0x00; supported {SUPPORTED_VERSIONS})")
        vmpl, signature_algo, current_tcb, platform_info, key_info = struct.unpack_from("<IIQQI", r, 0x30)
        (reported_tcb,) = struct.unpack_from("<Q", r, 0x180)
        cpuid_fam, cpuid_mod, cpuid_step = r[0x188], r[0x189], r[0x18A]
        (committed_tcb,) = struct.unpack_from("<Q", r, 0x1E0)
        cur_build, cur_minor, cur_major = r[0x1E8], r[0x1E9], r[0x1EA]
        com_build, com_minor, com_major = r[0x1EC], r[0x1ED], r[0x1EE]
        (launch_tcb,) = struct.unpack_from("<Q", r, 0x1F0)
        # CPUID fields exist from report version 3; Turin (family 0x1A) lays TCB_VERSION out differently.
        turin = version >= 3 and cpuid_fam == TURIN_FAMILY
        return {
            "version": version,
            "guest_svn": guest_svn,
            "policy": policy,
            "family_id": r[0x10:0x20],
            "image_id": r[0x20:0x30],
            "vmpl": vmpl,
            "signature_algo": signature_algo,
            "current_tcb": current_tcb,
            "platform_info": platform_info,
            "author_key_en": bool(key_info & 0x1),
            "mask_chip_key": bool(key_info & 0x2),
            "signing_key": SIGNING_KEYS.get((key_info >> 2) & 0x7, f"reserved ({(key_info >> 2) & 0x7})"),
            "report_data": r[0x50:0x90],
            "measurement": r[0x90:0xC0],
            "host_data": r[0xC0:0xE0],
            "id_key_digest": r[0xE0:0x110],
            "author_key_digest": r[0x110:0x140],
            "report_id": r[0x140:0x160],
            "report_id_ma": r[0x160:0x180],
            "reported_tcb": reported_tcb,
            "cpuid": (cpuid_fam, cpuid_mod, cpuid_step) if version >= 3 else None,
            "chip_id": r[0x1A0:0x1E0],
            "committed_tcb": committed_tcb,
            "current_fw": f"{cur_major}.{cur_minor}.{cur_build}",
            "committed_fw": f"{com_major}.{com_minor}.{com_build}",
            "launch_tcb": launch_tcb,
            "turin": turin,
            "signature": r[SIG_OFFSET:REPORT_LEN],
        }

    @staticmethod
    def _supplied(collateral: bytes | None, signing_key: str) -> _Supplied:
        label = signing_key.upper()
        if collateral is None:
            raise _fail(
                f"SEV-SNP verification needs the {label} certificate as collateral (DER, PEM, or the "
                "certificate table of an extended report / configfs-tsm auxblob)"
            )
        if not isinstance(collateral, bytes | bytearray | memoryview):
            raise _fail(f"collateral must be the {label} certificate bytes, got {type(collateral).__name__}")
        data = bytes(collateral)
        if len(data) > MAX_COLLATERAL_LEN:
            raise _fail(f"collateral is {len(data)} bytes, more than {MAX_COLLATERAL_LEN}")
        certs: list[x509.Certificate]
        if b"-----BEGIN" in data:
            certs = parse_pem_certificates(data, f"{label} collateral", where=_WHERE)
            source = "PEM bundle"
        elif not looks_like_cert_table(data):
            certs = [parse_der_certificate(data, f"{label} collateral", where=_WHERE)]
            source = "DER certificate"
        else:
            table = parse_cert_table(data)
            if signing_key not in table:
                other = "vlek" if signing_key == "vcek" else "vcek"
                hint = (
                    f" (it holds a {other.upper()}: collateral for another report?)" if other in table else ""
                )
                raise _fail(
                    f"report is signed by the {label} but the certificate table has no {label} entry{hint}",
                    _TABLE_WHERE,
                )
            certs = [parse_der_certificate(table[signing_key], f"{label} entry", where=_TABLE_WHERE)]
            for name in ("ask", "ark"):
                if name in table:
                    certs.append(
                        parse_der_certificate(table[name], f"{name.upper()} entry", where=_TABLE_WHERE)
                    )
            source = "certificate table"
        expected_cn = "SEV-VCEK" if signing_key == "vcek" else "SEV-VLEK"
        leaves = [c for c in certs if cert_name(c) == expected_cn]
        if not leaves:
            found = ", ".join(repr(cert_name(c)) for c in certs)
            raise _fail(
                f"report says it is signed by the {label} but the collateral holds {found}, not {expected_cn!r}"
            )
        if len(leaves) > 1:
            raise _fail(f"collateral holds {len(leaves)} {expected_cn} certificates; expected one")
        rest = tuple(c for c in certs if c is not leaves[0])
        return _Supplied(leaf=leaves[0], intermediates=rest, source=source)

    # -- checks ----------------------------------------------------------------------------------

    @staticmethod
    def _check_report_signature(r: bytes, leaf: x509.Certificate) -> None:
        key = public_key(leaf, "signing key", where=_WHERE)
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise _fail(f"{cert_name(leaf)} certificate does not hold an ECDSA P-384 public key")
        sig = r[SIG_OFFSET:REPORT_LEN]
        rr = int.from_bytes(sig[0:SIG_COMPONENT_LEN], "little")
        ss = int.from_bytes(sig[SIG_COMPONENT_LEN : 2 * SIG_COMPONENT_LEN], "little")
        if any(sig[2 * SIG_COMPONENT_LEN :]):
            raise _fail("reserved bytes after the signature's R and S (offset 0x330..0x49F) are not zero")
        if rr == 0 or ss == 0:
            raise _fail("report signature has a zero R or S component (offset 0x2A0)")
        try:
            key.verify(encode_dss_signature(rr, ss), r[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise _fail(
                f"ECDSA P-384 signature over report bytes 0x000..0x29F does not verify with the "
                f"{cert_name(leaf)} public key (report altered, or collateral is another chip's/TCB's key)"
            ) from None

    @staticmethod
    def _check_chain(
        supplied: _Supplied, f: dict[str, Any], at: int, anchors: TrustAnchors
    ) -> tuple[x509.Certificate, x509.Certificate]:
        leaf = supplied.leaf
        vlek = f["signing_key"] == "vlek"
        if not anchors.amd_ark_chains:
            raise _fail("no AMD ASK/ARK chain in the trust anchors (TrustAnchors.amd_ark_chains is empty)")
        tried: list[str] = []
        errors: list[EvidenceError] = []
        for i, bundle in enumerate(anchors.amd_ark_chains):
            certs = parse_pem_certificates(bundle, f"AMD trust anchor #{i + 1}", where="trust anchors")
            if len(certs) != 2:
                raise EvidenceError(
                    f"AMD trust anchor #{i + 1} holds {len(certs)} certificates, expected ASK (or ASVK) + ARK",
                    where="trust anchors",
                )
            ask, ark = certs
            tried.append(cert_name(ask))
            if not _issued_by(leaf, ask):
                continue
            try:
                is_asvk = cert_name(ask).startswith("SEV-VLEK-")
                if vlek != is_asvk:
                    raise _fail(
                        f"a {'VLEK' if vlek else 'VCEK'} must be issued by an "
                        f"{'ASVK' if vlek else 'ASK'}, but {cert_name(leaf)!r} is issued by {cert_name(ask)!r}"
                    )
                _verify_pss(leaf, ask, f"{cert_name(leaf)} <- {cert_name(ask)}")
                _verify_pss(ask, ark, f"{cert_name(ask)} <- {cert_name(ark)}")
                _verify_pss(ark, ark, f"{cert_name(ark)} self-signature")
                for cert, role in (
                    (leaf, "signing key (VCEK/VLEK)"),
                    (ask, "AMD ASK/ASVK"),
                    (ark, "AMD ARK"),
                ):
                    check_validity(cert, at, role, where=_WHERE)
            except EvidenceError as e:
                errors.append(e)
                continue
            SevSnpVerifier._check_supplied_chain(supplied, ask, ark)
            SevSnpVerifier._check_product(f, ark)
            return ask, ark
        if errors:
            raise errors[0] if len(errors) == 1 else _fail("; ".join(str(e.message) for e in errors))
        raise _fail(
            f"{cert_name(leaf)} certificate was issued by {name_text(leaf)!r}, which is not "
            f"the ASK/ASVK of any trusted AMD chain (trusted: {', '.join(tried)})"
        )

    @staticmethod
    def _check_supplied_chain(supplied: _Supplied, ask: x509.Certificate, ark: x509.Certificate) -> None:
        """An ASK/ASVK or ARK that came with the evidence must be the trusted one, byte for byte."""
        for cert in supplied.intermediates:
            der = _der(cert)
            if der == _der(ask) or der == _der(ark):
                continue
            role = "root (ARK)" if cert.subject == cert.issuer else "intermediate (ASK/ASVK)"
            raise _fail(
                f"the {supplied.source} carries a {role} certificate {cert_name(cert)!r} that is not the "
                f"trusted AMD chain's {cert_name(ark if cert.subject == cert.issuer else ask)!r} (wrong root)"
            )

    @staticmethod
    def _check_product(f: dict[str, Any], ark: x509.Certificate) -> None:
        if f["cpuid"] is None:
            return
        family, model, _ = f["cpuid"]
        product = _product_of_cpuid(family, model)
        chain_product = cert_name(ark).removeprefix("ARK-")
        if product is not None and product != chain_product:
            raise _fail(
                f"report's CPUID (family 0x{family:02x}, model 0x{model:02x}) is an AMD {product} but "
                f"its signing key chains to {cert_name(ark)!r}"
            )

    @staticmethod
    def _check_leaf_matches_report(leaf: x509.Certificate, f: dict[str, Any]) -> None:
        name = cert_name(leaf)
        chip_id: bytes = f["chip_id"]
        if f["signing_key"] == "vcek":
            hwid = _ext(leaf, OID_HWID)
            if hwid is None:
                raise _fail(f"{name} certificate has no hardware ID extension ({OID_HWID})")
            if not hwid:
                raise _fail(f"{name} certificate has an empty hardware ID extension ({OID_HWID})")
            # A platform configured with MASK_CHIP_ID reports zeros; the signature still binds the VCEK.
            if any(chip_id) and chip_id[: len(hwid)] != hwid:
                raise _fail(
                    f"{name} hardware ID {hwid.hex()[:16]}… does not match the report's CHIP_ID "
                    f"{chip_id.hex()[:16]}… (certificate of another chip)"
                )
        tcb = _decode_tcb(f["reported_tcb"], f["turin"])
        oids = {"bootloader": OID_BL_SPL, "tee": OID_TEE_SPL, "snp": OID_SNP_SPL, "microcode": OID_UCODE_SPL}
        if f["turin"]:
            oids["fmc"] = OID_FMC_SPL
        for part, oid in oids.items():
            value = _ext(leaf, oid)
            if value is None:
                raise _fail(f"{name} certificate has no {part} SPL extension ({oid})")
            spl = _der_small_uint(value, f"{name} extension {oid}")
            if spl != tcb[part]:
                raise _fail(
                    f"{name} is for {part} SPL {spl} but the report's REPORTED_TCB has "
                    f"{part} {tcb[part]} (collateral is for another TCB version)"
                )

    # -- claims ----------------------------------------------------------------------------------

    @staticmethod
    def _claims(f: dict[str, Any], chain: tuple[Any, ...], source: str) -> Claims:
        turin = f["turin"]
        extra: dict[str, Any] = {
            "report_version": f["version"],
            "policy": f["policy"],
            "policy_hex": f"0x{f['policy']:016x}",
            "vmpl": f["vmpl"],
            "signing_key": f["signing_key"],
            "certificates_from": source,
            "reported_tcb": _decode_tcb(f["reported_tcb"], turin),
            "reported_tcb_raw": f"0x{f['reported_tcb']:016x}",
            "current_tcb": _decode_tcb(f["current_tcb"], turin),
            "committed_tcb": _decode_tcb(f["committed_tcb"], turin),
            "launch_tcb": _decode_tcb(f["launch_tcb"], turin),
            "current_firmware": f["current_fw"],
            "committed_firmware": f["committed_fw"],
            "platform_info": f["platform_info"],
            "family_id": f["family_id"].hex(),
            "image_id": f["image_id"].hex(),
            "host_data": f["host_data"].hex(),
            "report_id": f["report_id"].hex(),
            "report_id_ma": f["report_id_ma"].hex(),
            "chip_id": f["chip_id"].hex(),
        }
        if f["cpuid"] is not None:
            extra["cpuid_family"], extra["cpuid_model"], extra["cpuid_stepping"] = f["cpuid"]
        measurements = {
            "measurement": f["measurement"].hex(),
            "host_data": f["host_data"].hex(),
            "family_id": f["family_id"].hex(),
            "image_id": f["image_id"].hex(),
            "chip_id": f["chip_id"].hex(),
        }
        if any(f["id_key_digest"]):
            extra["id_key_digest"] = measurements["id_key_digest"] = f["id_key_digest"].hex()
        if f["author_key_en"]:
            extra["author_key_digest"] = measurements["author_key_digest"] = f["author_key_digest"].hex()
        valid_from, valid_until = window(chain)
        return Claims(
            backend="sev-snp",
            measurement=f["measurement"].hex(),
            signer="",  # SNP has no signer measurement; the ID/author key digests (if any) are in measurements
            product_id=0,
            security_version=f["guest_svn"],
            debug=bool(f["policy"] >> POLICY_DEBUG_BIT & 1),
            report_data=f["report_data"],
            simulated=False,
            extra=extra,
            measurements=measurements,
            signing_chain=chain,
            valid_from=valid_from,
            valid_until=valid_until,
        )


def looks_like_cert_table(data: bytes) -> bool:
    """A certificate table starts with a known GUID (or is empty: its terminator comes first); a DER
    certificate starts with a SEQUENCE (0x30)."""
    return data[:16] in _GUID_NAMES or (
        len(data) >= CERT_TABLE_ENTRY_LEN and not any(data[:CERT_TABLE_ENTRY_LEN])
    )
