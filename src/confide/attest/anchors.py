"""Trust anchors for real TEE evidence: load them from files and folders, and small certificate helpers.

A verifier only trusts the roots it is given in a `TrustAnchors`. This module builds one:

- `load_trust_anchors(intel_sgx=..., amd=..., nitro=..., sim=...)`: each argument is a list of files or
  folders (every *.pem, *.der, *.crt, *.cer in a folder), each file one certificate or a PEM bundle.
- `anchors_from_directory(path)`: sorts every certificate file in a folder by who issued it
  (Intel SGX Root CA, an AMD ASK/ASVK + ARK bundle, the AWS Nitro Enclaves root).
- `default_anchors()`: the vendor roots shipped inside the package (confide/attest/roots/), every
  certificate checked against the SHA-256 fingerprint pinned in `PACKAGED_ROOTS`. Used by default.
- `default_test_anchors(testvectors_dir)`: the roots shipped with the shared test vectors, each checked
  against the SHA-256 fingerprint pinned below (the vendors' published roots).

Loading problems (missing file, not a certificate, unknown issuer) raise `FormatError` naming the file.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from confide.attest.claims import ChainCert, TrustAnchors
from confide.enclave.errors import EvidenceError, FormatError

__all__ = [
    "AMD_ARK_SHA256",
    "AWS_NITRO_ROOT_SHA256",
    "INTEL_SGX_ROOT_CA_SHA256",
    "PACKAGED_ROOTS",
    "anchors_from_directory",
    "cert_fingerprint",
    "cert_name",
    "chain_cert",
    "check_signature_algorithm",
    "check_validity",
    "default_anchors",
    "default_test_anchors",
    "load_certificates",
    "load_packaged_roots",
    "load_trust_anchors",
    "merge_anchors",
    "name_text",
    "parse_der_certificate",
    "parse_pem_certificates",
    "public_key",
    "utc_iso",
    "window",
]

# SHA-256 over the DER of the vendors' root certificates.
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
AWS_NITRO_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
AMD_ARK_SHA256 = {
    "ARK-Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "ARK-Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "ARK-Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}

# The roots shipped in confide/attest/roots/: file -> (kind, SHA-256 of each certificate's DER, in order).
# A shipped file whose certificates differ from these (edited, replaced, reordered) is refused.
PACKAGED_ROOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "intel_sgx_root_ca.pem": ("intel_sgx", (INTEL_SGX_ROOT_CA_SHA256,)),
    "amd_milan_ask_ark.pem": (
        "amd",
        ("67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b", AMD_ARK_SHA256["ARK-Milan"]),
    ),
    "amd_milan_asvk_ark.pem": (
        "amd",
        ("c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5", AMD_ARK_SHA256["ARK-Milan"]),
    ),
    "amd_genoa_ask_ark.pem": (
        "amd",
        ("5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521", AMD_ARK_SHA256["ARK-Genoa"]),
    ),
    "amd_genoa_asvk_ark.pem": (
        "amd",
        ("197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372", AMD_ARK_SHA256["ARK-Genoa"]),
    ),
    "amd_turin_ask_ark.pem": (
        "amd",
        ("5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185", AMD_ARK_SHA256["ARK-Turin"]),
    ),
    "amd_turin_asvk_ark.pem": (
        "amd",
        ("104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c", AMD_ARK_SHA256["ARK-Turin"]),
    ),
    "aws_nitro_root.pem": ("nitro", (AWS_NITRO_ROOT_SHA256,)),
}

_CERT_SUFFIXES = {".pem", ".der", ".crt", ".cer"}


# ----------------------------------------------------------------------------------------------
# certificate helpers shared by the verifiers


def utc_iso(ts: float) -> str:
    """Unix seconds as '2025-07-19T10:01:18Z' (or the raw number if out of range)."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix {ts}"


def cert_name(cert: x509.Certificate) -> str:
    """A short human name for a certificate: its subject's CN, else the whole subject."""
    try:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if cns:
            return str(cns[0].value)
        return cert.subject.rfc4514_string() or "(empty subject)"
    except Exception:  # names are parsed lazily; a malformed one must not hide the real error
        return "(unreadable subject)"


def name_text(cert: x509.Certificate, which: str = "issuer") -> str:
    """The certificate's issuer (or subject) as RFC 4514 text, for messages; never raises."""
    try:
        return (cert.issuer if which == "issuer" else cert.subject).rfc4514_string()
    except Exception:
        return f"(unreadable {which})"


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def chain_cert(cert: x509.Certificate, role: str) -> ChainCert:
    """A certificate as it appears in `Claims.signing_chain`."""
    return ChainCert(
        role=role,
        subject=name_text(cert, "subject"),
        sha256=cert_fingerprint(cert),
        not_before=int(cert.not_valid_before_utc.timestamp()),
        not_after=int(cert.not_valid_after_utc.timestamp()),
    )


def window(
    chain: Iterable[ChainCert], *others: tuple[float | int, float | int]
) -> tuple[int | None, int | None]:
    """The window in which every certificate of `chain` and every other (start, end) window hold."""
    certs = list(chain)
    starts = [c.not_before for c in certs]
    ends = [c.not_after for c in certs]
    starts += [int(s) for s, _ in others]
    ends += [int(e) for _, e in others]
    return (max(starts) if starts else None, min(ends) if ends else None)


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, element end) of the DER element at `pos`; ValueError when it does not fit."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER element")
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        start, length = pos + 2, first
    else:
        n = first & 0x7F
        if not 1 <= n <= 4 or pos + 2 + n > len(data):
            raise ValueError("bad DER length")
        start, length = pos + 2 + n, int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
    if start + length > len(data):
        raise ValueError("DER element overruns its container")
    return tag, start, start + length


def check_signature_algorithm(cert: x509.Certificate, what: str, *, where: str) -> bytes:
    """RFC 5280 4.1.1.2: the certificate's outer signatureAlgorithm must be byte-identical to
    tbsCertificate.signature (the outer one is not covered by the signature, so a mismatch means the
    certificate was altered after signing). Returns the AlgorithmIdentifier's DER."""
    der = cert.public_bytes(Encoding.DER)
    try:
        _, body, _ = _tlv(der, 0)  # Certificate
        _, tbs_body, tbs_end = _tlv(der, body)  # tbsCertificate
        pos = tbs_body
        tag, _, end = _tlv(der, pos)
        if tag == 0xA0:  # [0] version
            pos = end
            tag, _, end = _tlv(der, pos)
        if tag != 0x02:
            raise ValueError("no serial number")
        inner_tag, _, inner_end = _tlv(der, end)  # tbsCertificate.signature
        outer_tag, _, outer_end = _tlv(der, tbs_end)  # signatureAlgorithm
        inner, outer = der[end:inner_end], der[tbs_end:outer_end]
    except ValueError as e:
        raise EvidenceError(
            f"{what} certificate {cert_name(cert)!r} is malformed DER ({e})", where=where
        ) from None
    if inner_tag != 0x30 or outer_tag != 0x30 or inner != outer:
        raise EvidenceError(
            f"{what} certificate {cert_name(cert)!r}: its signatureAlgorithm ({outer.hex()}) differs from the "
            f"signed tbsCertificate.signature ({inner.hex()}): altered after signing",
            where=where,
        )
    return outer


def check_validity(cert: x509.Certificate, at: int, what: str, *, where: str) -> None:
    """Raise EvidenceError unless `at` (unix seconds) is inside the certificate's validity window."""
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    if at < start or at > end:
        state = "not yet valid" if at < start else "expired"
        raise EvidenceError(
            f"{what} certificate {cert_name(cert)!r} {state}: valid {utc_iso(start)} … {utc_iso(end)}, "
            f"checked at {utc_iso(at)}",
            where=where,
        )


def parse_der_certificate(der: bytes, what: str, *, where: str) -> x509.Certificate:
    """Parse one DER certificate from untrusted input; EvidenceError when it is not one."""
    try:
        with warnings.catch_warnings():
            # AMD and some vendor certificates use serial numbers that RFC 5280 disallows.
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(bytes(der))
    except Exception as e:  # ValueError, InvalidVersion, ...: any parse failure of untrusted bytes
        raise EvidenceError(f"{what} is not a valid DER X.509 certificate ({e})", where=where) from e
    _check_signature_encoding(cert, bytes(der), what, where=where)
    return cert


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _check_signature_encoding(cert: x509.Certificate, der: bytes, what: str, *, where: str) -> None:
    """The signature BIT STRING must be the one DER encoding of the signature bytes: no unused bits.

    The parser accepts a non-zero unused-bits count when those bits are zero, which gives one signed
    certificate several encodings (and several fingerprints); found by the evidence fuzz test."""
    sig = cert.signature
    if not der.endswith(b"\x03" + _der_length(len(sig) + 1) + b"\x00" + sig):
        raise EvidenceError(
            f"{what} is not canonical DER (its signature BIT STRING has unused bits)", where=where
        )


def public_key(cert: x509.Certificate, what: str, *, where: str) -> PublicKeyTypes:
    """The certificate's public key; EvidenceError when it cannot be decoded."""
    try:
        return cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # key parsed lazily, on first use
        raise EvidenceError(
            f"{what} certificate {cert_name(cert)!r} has an unusable public key ({e})", where=where
        ) from e


def parse_pem_certificates(pem: bytes, what: str, *, where: str) -> list[x509.Certificate]:
    """Parse a PEM bundle (one or more certificates); EvidenceError when it holds none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certs = x509.load_pem_x509_certificates(bytes(pem))
    except Exception as e:  # ValueError, InvalidVersion, ...: any parse failure
        raise EvidenceError(f"{what} is not a PEM certificate bundle ({e})", where=where) from e
    if not certs:
        raise EvidenceError(f"{what} holds no certificate", where=where)
    for cert in certs:
        _check_signature_encoding(cert, cert.public_bytes(Encoding.DER), what, where=where)
    return certs


# ----------------------------------------------------------------------------------------------
# loading anchors from files


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """All certificates in one file (PEM bundle or a single DER certificate)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read trust anchor file: {e.strerror or e}", where=str(p)) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
    except Exception as e:  # ValueError, InvalidVersion, ...
        raise FormatError(f"not a PEM or DER X.509 certificate file ({e})", where=str(p)) from e
    if not certs:
        raise FormatError("no certificate in file", where=str(p))
    return certs


def _files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _CERT_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise FormatError("trust anchor file or folder does not exist", where=str(p))
    return out


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _pem_bundle(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _is_self_signed_name(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _check_amd_bundle(certs: list[x509.Certificate], where: str) -> None:
    names = [cert_name(c) for c in certs]
    if len(certs) < 2 or not _is_self_signed_name(certs[-1]) or not names[-1].startswith("ARK-"):
        raise FormatError(
            f"an AMD trust anchor must be a PEM bundle of ASK (or ASVK) then ARK; found {names}", where=where
        )


def load_trust_anchors(
    *,
    intel_sgx: Iterable[str | Path] = (),
    amd: Iterable[str | Path] = (),
    nitro: Iterable[str | Path] = (),
    sim: Iterable[str | Path] = (),
) -> TrustAnchors:
    """Build TrustAnchors from files or folders, one argument per kind of root.

    intel_sgx: Intel SGX Root CA certificates (any encoding; stored as DER).
    amd: AMD ASK/ASVK + ARK PEM bundles (as AMD's KDS serves cert_chain), one chain per file.
    nitro: AWS Nitro Enclaves root certificates (stored as PEM).
    sim: simulated vendor roots (stored as DER).
    """
    intel_roots = tuple(_der(c) for f in _files(intel_sgx) for c in load_certificates(f))
    sim_roots = tuple(_der(c) for f in _files(sim) for c in load_certificates(f))
    nitro_roots = tuple(c.public_bytes(Encoding.PEM) for f in _files(nitro) for c in load_certificates(f))
    amd_chains: list[bytes] = []
    for f in _files(amd):
        certs = load_certificates(f)
        _check_amd_bundle(certs, str(f))
        amd_chains.append(_pem_bundle(certs))
    return TrustAnchors(
        sim_roots=sim_roots,
        intel_sgx_roots=intel_roots,
        amd_ark_chains=tuple(amd_chains),
        nitro_roots=nitro_roots,
    )


def _kind(certs: list[x509.Certificate]) -> str | None:
    names = [cert_name(c) for c in certs]
    if len(certs) >= 2 and names[-1].startswith("ARK-"):
        return "amd"
    if len(certs) == 1 and names[0] == "Intel SGX Root CA":
        return "intel_sgx"
    if len(certs) == 1 and names[0] == "aws.nitro-enclaves":
        return "nitro"
    return None


def anchors_from_directory(path: str | Path) -> TrustAnchors:
    """Sort every certificate file in a folder by kind of root (simulated roots are not recognised:
    pass those with `load_trust_anchors(sim=...)`)."""
    sorted_files: dict[str, list[Path]] = {"intel_sgx": [], "amd": [], "nitro": []}
    for f in _files([path]):
        kind = _kind(load_certificates(f))
        if kind is None:
            raise FormatError(
                "not a recognised root (Intel SGX Root CA, AMD ASK/ASVK+ARK bundle, AWS Nitro root); "
                "pass it to load_trust_anchors() under the right kind",
                where=str(f),
            )
        sorted_files[kind].append(f)
    return load_trust_anchors(**sorted_files)


def merge_anchors(*anchors: TrustAnchors) -> TrustAnchors:
    """The union of several TrustAnchors, in order, without duplicates."""

    def uniq(items: Iterable[bytes]) -> tuple[bytes, ...]:
        return tuple(dict.fromkeys(items))

    return TrustAnchors(
        sim_roots=uniq(r for a in anchors for r in a.sim_roots),
        intel_sgx_roots=uniq(r for a in anchors for r in a.intel_sgx_roots),
        amd_ark_chains=uniq(r for a in anchors for r in a.amd_ark_chains),
        nitro_roots=uniq(r for a in anchors for r in a.nitro_roots),
    )


def _pinned(path: Path, expected: str) -> None:
    for c in load_certificates(path):
        if cert_name(c).startswith(("Intel SGX Root CA", "aws.nitro-enclaves", "ARK-")):
            got = cert_fingerprint(c)
            if got != expected:
                raise FormatError(
                    f"root {cert_name(c)!r} has SHA-256 {got}, expected the vendor's {expected}",
                    where=str(path),
                )


def default_test_anchors(testvectors_dir: str | Path) -> TrustAnchors:
    """The real vendor roots shipped in the shared test vectors (roots/), fingerprints checked."""
    roots = Path(testvectors_dir) / "roots"
    intel = roots / "intel_sgx_root_ca.der"
    nitro = roots / "aws_nitro_root.pem"
    amd = {
        roots / "amd_ask_ark_milan.pem": AMD_ARK_SHA256["ARK-Milan"],
        roots / "amd_asvk_ark_milan.pem": AMD_ARK_SHA256["ARK-Milan"],
        roots / "amd_ask_ark_genoa.pem": AMD_ARK_SHA256["ARK-Genoa"],
    }
    _pinned(intel, INTEL_SGX_ROOT_CA_SHA256)
    _pinned(nitro, AWS_NITRO_ROOT_SHA256)
    for f, fp in amd.items():
        _pinned(f, fp)
    return load_trust_anchors(intel_sgx=[intel], amd=list(amd), nitro=[nitro])


# ----------------------------------------------------------------------------------------------
# the roots shipped inside the package


def load_packaged_roots(directory: Path | None = None) -> TrustAnchors:
    """Load the shipped roots from `directory` (default: confide/attest/roots/ in the package), each
    file checked against `PACKAGED_ROOTS`: the same certificates, in the same order, by SHA-256."""
    base = Path(str(resources.files("confide.attest") / "roots")) if directory is None else Path(directory)
    files: dict[str, list[Path]] = {"intel_sgx": [], "amd": [], "nitro": []}
    for name, (kind, pins) in PACKAGED_ROOTS.items():
        path = base / name
        if not path.is_file():
            raise FormatError("a shipped trust anchor is missing from the package", where=str(path))
        got = tuple(cert_fingerprint(c) for c in load_certificates(path))
        if got != pins:
            raise FormatError(
                f"shipped trust anchor does not match its pinned SHA-256 fingerprints: "
                f"found {', '.join(g[:16] for g in got)}, expected {', '.join(p[:16] for p in pins)}",
                where=str(path),
            )
        files[kind].append(path)
    return load_trust_anchors(**files)


@cache
def default_anchors() -> TrustAnchors:
    """The vendor roots shipped with Confide (Intel SGX Root CA, AMD ARK/ASK/ASVK, AWS Nitro root),
    fingerprints checked. What `confide verify` trusts unless told otherwise."""
    return load_packaged_roots()
