"""SEV-SNP beyond the real Milan vector: report v3, VLEK-signed reports, the certificate's TCB and
hardware-ID extensions, the CPUID/product check, and certificate tables (configfs-tsm auxblob).

The real vector (v2, VCEK, Milan) is verified in test_attest_real.py. What no captured vector covers
is exercised with a lab chain built here the way AMD builds its own (RSA-PSS SHA-384 ARK -> ASK/ASVK
-> P-384 VCEK/VLEK with AMD's KDS extensions) and reports signed the way the firmware signs them;
the lab roots are trusted only in these tests. The certificate-table tests use the real VCEK and
AMD chain.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from confide.attest.anchors import default_anchors
from confide.attest.claims import TrustAnchors
from confide.attest.sev_snp import (
    CERT_TABLE_GUIDS,
    OID_BL_SPL,
    OID_FMC_SPL,
    OID_HWID,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    SevSnpVerifier,
    build_cert_table,
    parse_cert_table,
)
from confide.enclave.errors import EvidenceError

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"
AT = 1750377600
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
MILAN_TCB = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
TURIN_TCB = {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 5}
CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Confide test lab"),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2045, 1, 1, tzinfo=dt.UTC))
    )


def _ca(subject: x509.Name, issuer: x509.Name, key: Any, signer: Any) -> x509.Certificate:
    b = _builder(subject, issuer, key).add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)


@dataclass
class Lab:
    product: str
    ark: x509.Certificate
    ask: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    asvk: x509.Certificate
    asvk_key: rsa.RSAPrivateKey

    @property
    def anchors(self) -> TrustAnchors:
        pem = self.ark.public_bytes(Encoding.PEM)
        return TrustAnchors(
            amd_ark_chains=(
                self.ask.public_bytes(Encoding.PEM) + pem,
                self.asvk.public_bytes(Encoding.PEM) + pem,
            )
        )


def make_lab(product: str) -> Lab:
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    asvk_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark_name = _name(f"ARK-{product}")
    ark = _ca(ark_name, ark_name, ark_key.public_key(), ark_key)
    ask = _ca(_name(f"SEV-{product}"), ark_name, ask_key.public_key(), ark_key)
    asvk = _ca(_name(f"SEV-VLEK-{product}"), ark_name, asvk_key.public_key(), ark_key)
    return Lab(product, ark, ask, ask_key, asvk, asvk_key)


@pytest.fixture(scope="module")
def labs() -> dict[str, Lab]:
    return {p: make_lab(p) for p in ("Milan", "Turin")}


def _spl(value: int) -> bytes:
    return b"\x02\x01" + bytes([value])


def make_leaf(
    lab: Lab,
    kind: str = "vcek",
    *,
    tcb: dict[str, int] | None = None,
    hwid: bytes | None = None,
    omit: tuple[str, ...] = (),
    issuer: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    tcb = dict(tcb or (TURIN_TCB if lab.product == "Turin" else MILAN_TCB))
    via = issuer or ("asvk" if kind == "vlek" else "ask")
    parent, parent_key = (lab.asvk, lab.asvk_key) if via == "asvk" else (lab.ask, lab.ask_key)
    b = _builder(_name("SEV-VLEK" if kind == "vlek" else "SEV-VCEK"), parent.subject, key.public_key())
    oids = {
        "bootloader": OID_BL_SPL,
        "tee": OID_TEE_SPL,
        "snp": OID_SNP_SPL,
        "microcode": OID_UCODE_SPL,
        "fmc": OID_FMC_SPL,
    }
    for part, value in tcb.items():
        if part not in omit:
            b = b.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(oids[part]), _spl(value)), False
            )
    if kind == "vcek" and "hwid" not in omit:
        b = b.add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(OID_HWID), hwid if hwid is not None else CHIP_ID
            ),
            False,
        )
    return b.sign(parent_key, hashes.SHA384(), rsa_padding=PSS), key


CHIP_ID = bytes(range(64))


def _tcb_raw(tcb: dict[str, int], turin: bool) -> int:
    if turin:
        b = [tcb["fmc"], tcb["bootloader"], tcb["tee"], tcb["snp"], 0, 0, 0, tcb["microcode"]]
    else:
        b = [tcb["bootloader"], tcb["tee"], 0, 0, 0, 0, tcb["snp"], tcb["microcode"]]
    return int.from_bytes(bytes(b), "little")


def make_report(
    key: ec.EllipticCurvePrivateKey,
    *,
    version: int = 3,
    signing_key: str = "vcek",
    product: str = "Milan",
    cpuid: tuple[int, int, int] | None = None,
    tcb: dict[str, int] | None = None,
    chip_id: bytes = CHIP_ID,
    policy: int = 0x30000,
    report_data: bytes = b"\x42" * 64,
    measurement: bytes = b"\x07" * 48,
    host_data: bytes = b"\x11" * 32,
) -> bytes:
    """An ATTESTATION_REPORT laid out and signed as the SEV-SNP firmware does."""
    turin = product == "Turin"
    raw_tcb = _tcb_raw(tcb or (TURIN_TCB if turin else MILAN_TCB), turin)
    r = bytearray(0x4A0)
    key_sel = {"vcek": 0, "vlek": 1}[signing_key]
    struct.pack_into("<IIQ", r, 0, version, 2, policy)
    struct.pack_into("<IIQQI", r, 0x30, 0, 1, raw_tcb, 0x3, key_sel << 2)
    r[0x50:0x90] = report_data
    r[0x90:0xC0] = measurement
    r[0xC0:0xE0] = host_data
    struct.pack_into("<Q", r, 0x180, raw_tcb)
    if version >= 3:
        r[0x188:0x18B] = bytes(cpuid or CPUID[product])
    r[0x1A0:0x1E0] = chip_id
    struct.pack_into("<Q", r, 0x1E0, raw_tcb)
    struct.pack_into("<Q", r, 0x1F0, raw_tcb)
    der = key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    rr, ss = decode_dss_signature(der)
    r[0x2A0 : 0x2A0 + 72] = rr.to_bytes(72, "little")
    r[0x2A0 + 72 : 0x2A0 + 144] = ss.to_bytes(72, "little")
    return bytes(r)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _fails(fn: Any, *words: str) -> EvidenceError:
    with pytest.raises(EvidenceError) as info:
        fn()
    text = str(info.value).lower()
    for w in words:
        assert w.lower() in text, f"expected {w!r} in: {info.value}"
    return info.value


# ---- report versions and signing keys ------------------------------------------------------------


def test_v3_vcek_report_verifies_with_claims(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab)
    report = make_report(key)
    v = SevSnpVerifier()
    assert v.sniff(report)
    c = v.verify(report, at=AT, anchors=lab.anchors, collateral=_der(leaf))
    assert c.backend == "sev-snp" and c.debug is False
    assert c.extra["report_version"] == 3 and c.extra["signing_key"] == "vcek"
    assert (c.extra["cpuid_family"], c.extra["cpuid_model"]) == (0x19, 0x01)
    assert c.extra["reported_tcb"] == MILAN_TCB
    assert c.measurements["measurement"] == "07" * 48 and c.measurements["host_data"] == "11" * 32
    assert c.measurements["chip_id"] == CHIP_ID.hex()
    assert [x.role for x in c.signing_chain] == ["VCEK", "ASK", "ARK (root)"]
    assert c.valid_from == int(dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp())
    assert c.valid_until == int(dt.datetime(2045, 1, 1, tzinfo=dt.UTC).timestamp())


def test_v2_report_has_no_cpuid_and_verifies(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab)
    c = SevSnpVerifier().verify(
        make_report(key, version=2), at=AT, anchors=lab.anchors, collateral=_der(leaf)
    )
    assert c.extra["report_version"] == 2 and "cpuid_family" not in c.extra


def test_vlek_report_chains_through_the_asvk(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab, "vlek")
    c = SevSnpVerifier().verify(
        make_report(key, signing_key="vlek", chip_id=bytes(64)),
        at=AT,
        anchors=lab.anchors,
        collateral=_der(leaf),
    )
    assert c.extra["signing_key"] == "vlek"
    assert [x.role for x in c.signing_chain] == ["VLEK", "ASVK", "ARK (root)"]


def test_vlek_issued_by_an_ask_is_refused(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab, "vlek", issuer="ask")
    _fails(
        lambda: SevSnpVerifier().verify(
            make_report(key, signing_key="vlek"), at=AT, anchors=lab.anchors, collateral=_der(leaf)
        ),
        "vlek must be issued by an asvk",
    )
    vcek, vkey = make_leaf(lab, "vcek", issuer="asvk")
    _fails(
        lambda: SevSnpVerifier().verify(make_report(vkey), at=AT, anchors=lab.anchors, collateral=_der(vcek)),
        "vcek must be issued by an ask",
    )


def test_report_signed_by_vlek_with_a_vcek_as_collateral_is_refused(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    vcek, key = make_leaf(lab)
    _fails(
        lambda: SevSnpVerifier().verify(
            make_report(key, signing_key="vlek"), at=AT, anchors=lab.anchors, collateral=_der(vcek)
        ),
        "signed by the vlek",
        "sev-vcek",
    )


def test_turin_report_uses_the_turin_tcb_layout(labs: dict[str, Lab]) -> None:
    lab = labs["Turin"]
    leaf, key = make_leaf(lab, hwid=CHIP_ID[:8])  # Turin's hardware ID is 8 bytes
    c = SevSnpVerifier().verify(
        make_report(key, product="Turin"), at=AT, anchors=lab.anchors, collateral=_der(leaf)
    )
    assert c.extra["reported_tcb"] == TURIN_TCB
    assert c.extra["cpuid_family"] == 0x1A


def test_cpuid_of_another_product_is_refused(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab)
    _fails(
        lambda: SevSnpVerifier().verify(
            make_report(key, cpuid=CPUID["Genoa"]), at=AT, anchors=lab.anchors, collateral=_der(leaf)
        ),
        "amd genoa",
        "ark-milan",
    )


# ---- certificate extensions against the report -----------------------------------------------------


@pytest.mark.parametrize("part", ["bootloader", "tee", "snp", "microcode"])
def test_tcb_extension_must_equal_reported_tcb(labs: dict[str, Lab], part: str) -> None:
    lab = labs["Milan"]
    cert_tcb = {**MILAN_TCB, part: MILAN_TCB[part] + 1}
    leaf, key = make_leaf(lab, tcb=cert_tcb)
    _fails(
        lambda: SevSnpVerifier().verify(make_report(key), at=AT, anchors=lab.anchors, collateral=_der(leaf)),
        f"{part} spl {cert_tcb[part]}",
        "another tcb version",
    )


@pytest.mark.parametrize("missing", ["snp", "hwid"])
def test_vcek_without_a_required_extension_is_refused(labs: dict[str, Lab], missing: str) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab, omit=(missing,))
    _fails(
        lambda: SevSnpVerifier().verify(make_report(key), at=AT, anchors=lab.anchors, collateral=_der(leaf)),
        "has no",
    )


def test_hwid_must_equal_chip_id(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab, hwid=b"\xee" * 64)
    _fails(
        lambda: SevSnpVerifier().verify(make_report(key), at=AT, anchors=lab.anchors, collateral=_der(leaf)),
        "hardware id",
        "another chip",
    )
    # a platform that masks CHIP_ID reports zeros: nothing to compare, the signature still binds the VCEK
    c = SevSnpVerifier().verify(
        make_report(key, chip_id=bytes(64)), at=AT, anchors=lab.anchors, collateral=_der(leaf)
    )
    assert c.measurements["chip_id"] == "00" * 64


def test_debug_policy_bit_is_reported(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab)
    c = SevSnpVerifier().verify(
        make_report(key, policy=0xB0000), at=AT, anchors=lab.anchors, collateral=_der(leaf)
    )
    assert c.debug is True


def test_lab_chain_is_not_trusted_by_default(labs: dict[str, Lab]) -> None:
    lab = labs["Milan"]
    leaf, key = make_leaf(lab)
    _fails(
        lambda: SevSnpVerifier().verify(
            make_report(key), at=AT, anchors=default_anchors(), collateral=_der(leaf)
        ),
        "not the ask/asvk of any trusted amd chain",
    )


# ---- certificate tables (configfs-tsm auxblob) with the real VCEK and AMD chain ---------------------


def _real() -> tuple[bytes, bytes, x509.Certificate, x509.Certificate]:
    report = (TV / "snp/snp_report_milan.bin").read_bytes()
    vcek = (TV / "snp/snp_vcek_milan.der").read_bytes()
    ask, ark = x509.load_pem_x509_certificates((TV / "roots/amd_ask_ark_milan.pem").read_bytes())
    return report, vcek, ask, ark


def test_auxblob_with_vcek_verifies_the_real_report() -> None:
    report, vcek, ask, ark = _real()
    for certs in ({"vcek": vcek}, {"vcek": vcek, "ask": _der(ask), "ark": _der(ark)}):
        table = build_cert_table(certs, pad_to=4096)  # the kernel hands back whole pages
        c = SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=table)
        assert c.extra["certificates_from"] == "certificate table"
        assert c.measurement.startswith("b07af9620f3b839b")


def test_pem_bundle_with_the_chain_verifies() -> None:
    report, vcek, ask, ark = _real()
    bundle = x509.load_der_x509_certificate(vcek).public_bytes(Encoding.PEM)
    bundle += ask.public_bytes(Encoding.PEM) + ark.public_bytes(Encoding.PEM)
    c = SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=bundle)
    assert c.extra["certificates_from"] == "PEM bundle"


def test_auxblob_carrying_a_foreign_root_is_refused(labs: dict[str, Lab]) -> None:
    report, vcek, ask, _ = _real()
    table = build_cert_table({"vcek": vcek, "ask": _der(ask), "ark": _der(labs["Milan"].ark)})
    _fails(
        lambda: SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=table),
        "wrong root",
        "ark-milan",
    )
    genoa_ask = x509.load_pem_x509_certificates((TV / "roots/amd_ask_ark_genoa.pem").read_bytes())[0]
    table = build_cert_table({"vcek": vcek, "ask": _der(genoa_ask)})
    _fails(
        lambda: SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=table),
        "intermediate",
        "not the trusted",
    )


def test_auxblob_without_the_signing_key_is_refused() -> None:
    report, _, ask, ark = _real()
    table = build_cert_table({"ask": _der(ask), "ark": _der(ark)})
    _fails(
        lambda: SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=table),
        "no vcek entry",
    )
    _fails(
        lambda: SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=bytes(4096)),
        "host supplied no certificates",
    )


def test_parse_cert_table_round_trip_and_guids() -> None:
    _, vcek, ask, ark = _real()
    table = build_cert_table({"vcek": vcek, "ask": _der(ask), "ark": _der(ark)}, pad_to=8192)
    assert len(table) == 8192
    assert table[:16] == bytes.fromhex("63da758de6644564adc5f4b93be8accd")  # RFC 4122 byte order
    parsed = parse_cert_table(table)
    assert parsed == {"vcek": vcek, "ask": _der(ask), "ark": _der(ark)}
    assert set(CERT_TABLE_GUIDS) == {"vcek", "vlek", "ask", "ark"}


def _entry(guid: bytes, offset: int, length: int) -> bytes:
    return guid + struct.pack("<II", offset, length)


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (_entry(CERT_TABLE_GUIDS["vcek"], 48, 10), "not terminated"),
        (_entry(CERT_TABLE_GUIDS["vcek"], 48, 100) + bytes(24) + bytes(10), "outside the certificate area"),
        (_entry(CERT_TABLE_GUIDS["vcek"], 0, 10) + bytes(24) + bytes(10), "outside the certificate area"),
        (_entry(CERT_TABLE_GUIDS["vcek"], 48, 0) + bytes(24), "length 0"),
        (
            _entry(CERT_TABLE_GUIDS["vcek"], 72, 4)
            + _entry(CERT_TABLE_GUIDS["vcek"], 72, 4)
            + bytes(24)
            + b"abcd",
            "repeats",
        ),
        (_entry(CERT_TABLE_GUIDS["vcek"], 0xFFFFFFFF, 0xFFFFFFFF) + bytes(24), "outside"),
        (bytes(24), "empty"),
    ],
)
def test_malformed_cert_tables_are_refused(blob: bytes, words: str) -> None:
    _fails(lambda: parse_cert_table(blob), words)
    report, _, _, _ = _real()
    with pytest.raises(EvidenceError):
        SevSnpVerifier().verify(report, at=AT, anchors=default_anchors(), collateral=blob)


def test_unknown_guids_are_kept_apart() -> None:
    _, vcek, _, _ = _real()
    other = bytes.fromhex("00112233445566778899aabbccddeeff")
    header = 3 * 24
    blob = (
        _entry(other, header, 3)
        + _entry(CERT_TABLE_GUIDS["vcek"], header + 3, len(vcek))
        + bytes(24)
        + b"xyz"
        + vcek
    )
    parsed = parse_cert_table(blob)
    assert parsed["vcek"] == vcek and parsed["guid:00112233-4455-6677-8899-aabbccddeeff"] == b"xyz"
