"""AWS Nitro Enclaves attestation documents, verified with cbor2 and pyca/cryptography.

Evidence: the document as the Nitro Secure Module returns it, a COSE_Sign1 structure (RFC 9052),
untagged or with tag 18: [protected: bstr {1: -35 (ES384)}, unprotected: {}, payload: bstr, signature:
bstr r||s]. The payload is a CBOR map: module_id, digest ("SHA384"), timestamp (ms), pcrs, certificate
(the leaf, DER), cabundle (root first, DER), and optional public_key, user_data, nonce.

Checks (AWS "Verifying the root of trust"): strict CBOR (no duplicate keys, no indefinite lengths, no
trailing bytes), every field's type and size; ES384 signature over the Sig_structure
["Signature1", protected, b"", payload] with the leaf certificate's P-384 key; the cabundle's root is
one of the trusted AWS Nitro roots; the path leaf <- cabundle <- root validates at the document's own
time (pyca's X.509 path validation: signatures, CA constraints, validity of every certificate), and
every certificate is also valid at the time checked (the leaf lives a few hours, so an old document
stops verifying); the document is not dated after the time checked. No collateral is used.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification

from confide.attest.anchors import (
    cert_name,
    chain_cert,
    check_validity,
    parse_der_certificate,
    parse_pem_certificates,
    public_key,
    utc_iso,
    window,
)
from confide.attest.claims import ChainCert, Claims, TrustAnchors, VerifierBase
from confide.enclave.errors import EvidenceError

__all__ = ["NitroVerifier"]

COSE_ALG_ES384 = -35
COSE_SIGN1_TAG = 18
MAX_DOC_LEN = 64 * 1024
MAX_CERT_LEN = 1024
MAX_BLOB_LEN = 1024  # public_key, user_data, nonce (the NSM caps each at 1024 bytes)
PCR_LEN = 48  # SHA-384
DEBUG_PCRS = (0, 1, 2)
CLOCK_SKEW_SECONDS = 60
_WHERE = "nitro attestation document"


def _fail(message: str) -> EvidenceError:
    return EvidenceError(message, where=_WHERE)


def _cbor(data: bytes, what: str) -> Any:
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(fp, allow_duplicate_keys=False, allow_indefinite=False, max_depth=16)
        value = decoder.decode()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # CBORDecodeError, and whatever a semantic-tag decoder raises
        raise _fail(f"{what} is not well-formed CBOR: {e}") from e
    if fp.tell() != len(data):
        raise _fail(f"{what} has {len(data) - fp.tell()} trailing bytes after its CBOR item")
    return value


def _bytes_field(payload: Mapping[Any, Any], key: str, *, optional: bool, lo: int, hi: int) -> bytes | None:
    if key not in payload or payload[key] is None:
        if optional:
            return None
        raise _fail(f"payload field {key!r} is missing")
    value = payload[key]
    if not isinstance(value, bytes):
        raise _fail(f"payload field {key!r} is {type(value).__name__}, expected a byte string")
    if not lo <= len(value) <= hi:
        raise _fail(f"payload field {key!r} is {len(value)} bytes, expected {lo}..{hi}")
    return value


class NitroVerifier(VerifierBase):
    """AWS Nitro Enclaves attestation document (COSE_Sign1, ES384) chained to the AWS Nitro root."""

    name = "nitro"
    where = _WHERE
    backends: tuple[str, ...] = ("nitro",)

    def sniff(self, evidence: bytes) -> bool:
        try:
            head = bytes(evidence[:3])
        except TypeError:
            return False
        if head[:2] == b"\xd2\x84":  # tag 18, array(4)
            head = head[1:]
        # array(4) whose first item is a byte string (the protected header)
        return len(head) >= 2 and head[0] == 0x84 and 0x40 <= head[1] <= 0x5B

    def _verify(self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None) -> Claims:
        doc = evidence
        if len(doc) > MAX_DOC_LEN:
            raise _fail(f"document is {len(doc)} bytes, more than {MAX_DOC_LEN}")
        protected, payload_bytes, signature = self._cose(doc)
        payload = self._payload(payload_bytes)

        leaf = parse_der_certificate(payload["certificate"], "payload field 'certificate'", where=_WHERE)
        self._check_signature(leaf, protected, payload_bytes, signature)
        chain = self._check_chain(leaf, payload["cabundle"], payload["timestamp"] // 1000, at, anchors)
        return self._claims(payload, chain)

    # -- structure -------------------------------------------------------------------------------

    @staticmethod
    def _cose(doc: bytes) -> tuple[bytes, bytes, bytes]:
        obj = _cbor(doc, "document")
        if isinstance(obj, cbor2.CBORTag):
            if obj.tag != COSE_SIGN1_TAG:
                raise _fail(f"document is CBOR tag {obj.tag}, expected COSE_Sign1 (tag 18) or untagged")
            obj = obj.value
        if not isinstance(obj, list | tuple) or len(obj) != 4:
            raise _fail(
                "document is not a COSE_Sign1 array of 4 items [protected, unprotected, payload, sig]"
            )
        protected, unprotected, payload, signature = obj
        if not isinstance(protected, bytes):
            raise _fail("COSE protected header is not a byte string")
        if not isinstance(unprotected, Mapping):
            raise _fail("COSE unprotected header is not a map")
        if not isinstance(payload, bytes):
            raise _fail("COSE payload is not a byte string (detached payloads are not used by Nitro)")
        if not isinstance(signature, bytes):
            raise _fail("COSE signature is not a byte string")
        header = _cbor(protected, "COSE protected header")
        if not isinstance(header, Mapping):
            raise _fail("COSE protected header is not a map")
        alg = header.get(1)
        if alg != COSE_ALG_ES384 or isinstance(alg, bool):
            raise _fail(f"COSE algorithm (protected header 1) is {alg!r}, expected -35 (ES384)")
        if 1 in unprotected:
            raise _fail("COSE unprotected header must not carry the algorithm")
        return protected, payload, signature

    @staticmethod
    def _payload(data: bytes) -> dict[str, Any]:
        payload = _cbor(data, "COSE payload")
        if not isinstance(payload, Mapping):
            raise _fail("COSE payload is not a CBOR map")
        module_id = payload.get("module_id")
        if not isinstance(module_id, str) or not module_id:
            raise _fail("payload field 'module_id' is missing or not a non-empty text string")
        if payload.get("digest") != "SHA384":
            raise _fail(f"payload field 'digest' is {payload.get('digest')!r}, expected 'SHA384'")
        timestamp = payload.get("timestamp")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 < timestamp < 1 << 63:
            raise _fail(f"payload field 'timestamp' is {timestamp!r}, expected milliseconds since 1970")
        pcrs = payload.get("pcrs")
        if not isinstance(pcrs, Mapping) or not 1 <= len(pcrs) <= 32:
            raise _fail("payload field 'pcrs' is missing or not a map of 1..32 PCRs")
        for index, value in pcrs.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 32:
                raise _fail(f"PCR index {index!r} is not an integer in 0..31")
            if not isinstance(value, bytes) or len(value) != PCR_LEN:
                raise _fail(f"PCR{index} is not a {PCR_LEN}-byte SHA-384 value")
        for index in DEBUG_PCRS:
            if index not in pcrs:
                raise _fail(f"payload has no PCR{index}")
        _bytes_field(payload, "certificate", optional=False, lo=1, hi=MAX_CERT_LEN)
        cabundle = payload.get("cabundle")
        if not isinstance(cabundle, list | tuple) or not cabundle:
            raise _fail("payload field 'cabundle' is missing or not a non-empty array")
        for i, cert in enumerate(cabundle):
            if not isinstance(cert, bytes) or not 1 <= len(cert) <= MAX_CERT_LEN:
                raise _fail(f"cabundle[{i}] is not a byte string of 1..{MAX_CERT_LEN} bytes")
        return {
            "module_id": module_id,
            "timestamp": timestamp,
            "pcrs": {int(k): bytes(v) for k, v in pcrs.items()},
            "certificate": payload["certificate"],
            "cabundle": list(cabundle),
            "public_key": _bytes_field(payload, "public_key", optional=True, lo=1, hi=MAX_BLOB_LEN),
            "user_data": _bytes_field(payload, "user_data", optional=True, lo=0, hi=MAX_BLOB_LEN),
            "nonce": _bytes_field(payload, "nonce", optional=True, lo=0, hi=MAX_BLOB_LEN),
        }

    # -- checks ----------------------------------------------------------------------------------

    @staticmethod
    def _check_signature(leaf: x509.Certificate, protected: bytes, payload: bytes, signature: bytes) -> None:
        key = public_key(leaf, "leaf", where=_WHERE)
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise _fail(f"leaf certificate {cert_name(leaf)!r} does not hold an ECDSA P-384 key")
        if len(signature) != 96:
            raise _fail(f"COSE signature is {len(signature)} bytes, expected 96 (ES384 r||s)")
        r = int.from_bytes(signature[:48], "big")
        s = int.from_bytes(signature[48:], "big")
        sig_structure = cbor2.dumps(["Signature1", protected, b"", payload])
        try:
            key.verify(encode_dss_signature(r, s), sig_structure, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise _fail(
                f"COSE_Sign1 ES384 signature does not verify with the key of leaf certificate "
                f"{cert_name(leaf)!r} (document altered)"
            ) from None

    @staticmethod
    def _check_chain(
        leaf: x509.Certificate, cabundle: list[bytes], doc_time: int, at: int, anchors: TrustAnchors
    ) -> tuple[ChainCert, ...]:
        if not anchors.nitro_roots:
            raise _fail("no AWS Nitro root in the trust anchors (TrustAnchors.nitro_roots is empty)")
        roots = [
            c
            for i, pem in enumerate(anchors.nitro_roots)
            for c in parse_pem_certificates(pem, f"Nitro trust anchor #{i + 1}", where="trust anchors")
        ]
        bundle = [parse_der_certificate(c, f"cabundle[{i}]", where=_WHERE) for i, c in enumerate(cabundle)]
        root_ders = {r.public_bytes(Encoding.DER) for r in roots}
        if bundle[0].public_bytes(Encoding.DER) not in root_ders:
            raise _fail(
                f"cabundle[0] {cert_name(bundle[0])!r} is not a trusted AWS Nitro root "
                f"(trusted: {', '.join(cert_name(r) for r in roots)})"
            )
        # Clear messages for the common failure (a certificate outside its window) before path validation:
        # first at the time checked, then at the document's own time (when the NSM signed it).
        for when_checked, label in ((at, ""), (doc_time, " (at the document's time)")):
            for i, cert in enumerate(bundle):
                check_validity(cert, when_checked, f"cabundle[{i}]{label}", where=_WHERE)
            check_validity(leaf, when_checked, f"leaf{label}", where=_WHERE)
        if doc_time > at + CLOCK_SKEW_SECONDS:
            raise _fail(f"document is dated {utc_iso(doc_time)}, after the verification time {utc_iso(at)}")
        try:
            when = datetime.fromtimestamp(doc_time, UTC)
        except (OverflowError, OSError, ValueError) as e:
            raise _fail(f"document time {doc_time} is out of range") from e
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(roots))
            .time(when)
            .max_chain_depth(len(bundle) + 1)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
        )
        try:
            builder.build_client_verifier().verify(leaf, bundle[1:])
        except verification.VerificationError as e:
            raise _fail(
                f"leaf certificate {cert_name(leaf)!r} does not chain to the AWS Nitro root: {e}"
            ) from e
        intermediates = [
            chain_cert(c, f"cabundle[{i}]") for i, c in reversed(list(enumerate(bundle))) if i > 0
        ]
        return (chain_cert(leaf, "leaf"), *intermediates, chain_cert(bundle[0], "root"))

    # -- claims ----------------------------------------------------------------------------------

    @staticmethod
    def _claims(p: dict[str, Any], chain: tuple[ChainCert, ...]) -> Claims:
        pcrs: dict[int, bytes] = p["pcrs"]
        user_data: bytes = p["user_data"] or b""
        pcr8 = pcrs.get(8, b"")
        valid_from, valid_until = window(chain)
        extra: dict[str, Any] = {
            "module_id": p["module_id"],
            "timestamp_ms": p["timestamp"],
            "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())},
            "user_data": user_data.hex() if p["user_data"] is not None else None,
            "nonce": p["nonce"].hex() if p["nonce"] is not None else None,
            "public_key": p["public_key"].hex() if p["public_key"] is not None else None,
        }
        return Claims(
            backend="nitro",
            measurement=pcrs[0].hex(),
            signer=pcr8.hex() if any(pcr8) else "",  # PCR8: hash of the EIF signing certificate
            product_id=0,
            security_version=0,
            # Debug-mode enclaves report PCR0, PCR1 and PCR2 as all zeros.
            debug=all(not any(pcrs[i]) for i in DEBUG_PCRS),
            # The NSM's user_data is the enclave-chosen binding: its first 64 bytes, zero-padded.
            report_data=user_data[:64].ljust(64, b"\0"),
            simulated=False,
            issued_at=p["timestamp"] // 1000,
            extra=extra,
            measurements={f"pcr{i}": v.hex() for i, v in sorted(pcrs.items())},
            signing_chain=chain,
            valid_from=valid_from,
            valid_until=valid_until,
        )
