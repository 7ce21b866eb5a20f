"""Intel SGX and TDX ECDSA (DCAP) quotes, verified with Phala's dcap-qvl.

dcap-qvl does the whole DCAP check: the PCK certificate chain embedded in the quote up to the Intel
SGX root we pass in, the CRLs, TCB info and QE identity (signatures, issuer chains, validity at the
given time), the QE report signature and its binding of the attestation key, the quote signature
over header + report body, and the TCB level matching that yields the TCB status and advisories.
This module only adds: a strict outer length check (no trailing bytes), clear error messages (with
the collateral's validity windows when the failure is about time), and the mapping into `Claims`.

Evidence: the raw quote bytes. Collateral: the JSON of dcap-qvl's `QuoteCollateralV3`
(pck_crl_issuer_chain, root_ca_crl, pck_crl, tcb_info_issuer_chain, tcb_info, tcb_info_signature,
qe_identity_issuer_chain, qe_identity, qe_identity_signature), as fetched from a PCCS.
"""

from __future__ import annotations

import json
import struct
from datetime import datetime
from typing import Any

import dcap_qvl  # type: ignore[import-untyped]  # ships .pyi stubs but no py.typed
from cryptography import x509

from confide.attest.anchors import (
    cert_fingerprint,
    chain_cert,
    parse_der_certificate,
    parse_pem_certificates,
    utc_iso,
    window,
)
from confide.attest.claims import ChainCert, Claims, TrustAnchors, VerifierBase
from confide.enclave.errors import EvidenceError

__all__ = ["DcapVerifier", "collateral_validity"]

TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
HEADER_LEN = 48
SGX_BODY_LEN = 384  # sgx_report_body_t
TD10_BODY_LEN = 584  # TDREPORT 1.0 body in quote v4 / v5 body type 2
TD15_BODY_LEN = 648  # TDREPORT 1.5 body in quote v5 body type 3
V5_BODY_LENS = {1: SGX_BODY_LEN, 2: TD10_BODY_LEN, 3: TD15_BODY_LEN}
ATT_KEY_ECDSA_P256 = 2
ATT_KEY_ECDSA_P384 = 3
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
MAX_QUOTE_LEN = 1 << 20  # real quotes are ~5 KiB; anything this big is not one
MAX_COLLATERAL_LEN = 16 << 20


_WHERE = "dcap quote"


def _fail(message: str) -> EvidenceError:
    return EvidenceError(message, where=_WHERE)


def _layout(q: bytes) -> tuple[int, int, int]:
    """Check the header and the declared lengths; return (version, tee_type, body_len).

    dcap-qvl decodes the quote itself; this only rejects what it tolerates: a quote whose declared
    signature-data length does not end exactly at the end of the input (trailing bytes).
    """
    if len(q) < HEADER_LEN:
        raise _fail(f"quote is {len(q)} bytes, shorter than the {HEADER_LEN}-byte DCAP quote header")
    version, key_type, tee_type = struct.unpack_from("<HHI", q, 0)
    if version not in (3, 4, 5):
        raise _fail(f"unsupported DCAP quote version {version} (header offset 0; supported: 3, 4, 5)")
    if key_type not in (ATT_KEY_ECDSA_P256, ATT_KEY_ECDSA_P384):
        raise _fail(f"unsupported attestation key type {key_type} (header offset 2)")
    if tee_type not in (TEE_SGX, TEE_TDX) or (version == 3 and tee_type != TEE_SGX):
        raise _fail(f"unsupported TEE type 0x{tee_type:08x} for quote version {version} (header offset 4)")
    if version == 5:
        if len(q) < HEADER_LEN + 6:
            raise _fail(f"quote v5 is {len(q)} bytes, too short for its body descriptor")
        body_type, body_size = struct.unpack_from("<HI", q, HEADER_LEN)
        expected = V5_BODY_LENS.get(body_type)
        # Body type 4 (TDREPORT 1.5 "ex") varies in size; dcap-qvl decodes it and the quote signature covers it.
        if (expected is None and body_type != 4) or (expected is not None and body_size != expected):
            raise _fail(f"quote v5 body type {body_type} with size {body_size} is not a known report body")
        if (body_type == 1) != (tee_type == TEE_SGX):
            raise _fail(f"quote v5 body type {body_type} does not match TEE type 0x{tee_type:08x}")
        body_end = HEADER_LEN + 6 + body_size
    else:
        body_end = HEADER_LEN + (SGX_BODY_LEN if tee_type == TEE_SGX else TD10_BODY_LEN)
    if len(q) < body_end + 4:
        raise _fail(f"quote is truncated: {len(q)} bytes, the report body alone needs {body_end + 4}")
    (sig_len,) = struct.unpack_from("<I", q, body_end)
    end = body_end + 4 + sig_len
    if len(q) < end:
        raise _fail(
            f"quote is truncated: signature data declares {sig_len} bytes at offset {body_end + 4}, "
            f"so the quote needs {end} bytes, got {len(q)}"
        )
    # Quotes read from a fixed-size buffer (TDX via configfs-tsm / QGS) carry zero padding after the
    # signature data; anything else after it is not part of the quote and is rejected.
    if any(q[end:]):
        raise _fail(
            f"quote has {len(q) - end} non-zero trailing bytes after its signature data (ends at offset {end})"
        )
    return version, tee_type, body_end - HEADER_LEN


def _iso_date(s: Any) -> float | None:
    if not isinstance(s, str):
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _collateral_windows(doc: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Validity windows of the time-bound collateral items, best effort (for error messages only)."""
    out: list[tuple[str, float, float]] = []
    for key, label in (("tcb_info", "TCB info"), ("qe_identity", "QE identity")):
        try:
            item = json.loads(doc[key])
            # dcap-qvl's collateral holds the signed body itself ({"id":..., "issueDate":...}).
            body = item.get("tcbInfo") or item.get("enclaveIdentity") or item
            start, end = _iso_date(body.get("issueDate")), _iso_date(body.get("nextUpdate"))
            if start is not None and end is not None:
                out.append((label, start, end))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    for key, label in (("pck_crl", "PCK CRL"), ("root_ca_crl", "root CA CRL")):
        try:
            raw = doc[key]
            der = bytes.fromhex(raw) if isinstance(raw, str) else bytes(raw)
            crl = x509.load_der_x509_crl(der)
            if crl.next_update_utc is not None:
                out.append((label, crl.last_update_utc.timestamp(), crl.next_update_utc.timestamp()))
        except (KeyError, TypeError, ValueError):
            continue
    return out


# TDX registers named in Claims.measurements (underscores dropped: "rt_mr0" -> "rtmr0").
_TDX_REGISTERS = (
    "rt_mr0",
    "rt_mr1",
    "rt_mr2",
    "rt_mr3",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
    "mr_seam",
    "mr_signer_seam",
    "mr_service_td",
)


def _crl_windows(doc: dict[str, Any]) -> list[tuple[int, int]]:
    """The CRLs' windows as dcap-qvl applies them: a CRL is stale from its nextUpdate second on."""
    return [
        (int(start), int(end) - 1)
        for label, start, end in _collateral_windows(doc)
        if label in ("PCK CRL", "root CA CRL")
    ]


def collateral_validity(doc: dict[str, Any]) -> tuple[int | None, int | None]:
    """(latest issue date, earliest next update) over the TCB info, QE identity and CRLs of a
    collateral document; (None, None) when none of them can be read."""
    windows = [
        (start, end - 1 if label.endswith("CRL") else end) for label, start, end in _collateral_windows(doc)
    ]
    if not windows:
        return None, None
    return int(max(w[0] for w in windows)), int(min(w[1] for w in windows))


_TIME_WORDS = ("expired", "in the future", "not yet valid", "not valid at", "outdated collateral")


def _explain(lib_message: str, doc: dict[str, Any], at: int) -> str:
    msg = " ".join(lib_message.split())  # dcap-qvl's messages span lines ("Caused by: ...")
    msg = msg.removeprefix("Verification failed: ")
    if "no matching tcb level" in msg.lower():
        msg += (
            " (the platform's CPU SVNs, PCE SVN or TDX module SVNs are below every TCB level in the"
            " collateral's TCB info: the platform is out of date for this TCB evaluation)"
        )
    if any(w in msg.lower() for w in _TIME_WORDS):
        windows = _collateral_windows(doc)
        if windows:
            lo = max(w[1] for w in windows)
            hi = min(w[2] for w in windows)
            bad = [w for w in windows if not (w[1] <= at <= w[2])]
            detail = "; ".join(f"{n} valid {utc_iso(s)} … {utc_iso(e)}" for n, s, e in (bad or windows))
            state = "expired" if at > hi else "not yet valid" if at < lo else "outside its validity"
            msg += (
                f" — collateral {state}: usable {utc_iso(lo)} … {utc_iso(hi)}, checked at {utc_iso(at)}"
                f" ({detail})"
            )
        else:
            msg += f" (checked at {utc_iso(at)})"
    return msg


def _legacy_detail(quote: bytes, col: Any, root_der: bytes, at: int) -> str | None:
    """dcap-qvl's claims API drops the error's cause ("Failed to verify certificate chain" without
    "CrlExpired ..."); its one-shot verify keeps it. Only called after a failure, to explain it."""
    try:
        dcap_qvl.verify_with_root_ca(quote, col, root_der, at)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        return str(e)
    return None


def _hex_field(report: dict[str, Any], name: str) -> bytes:
    value = report.get(name)
    if not isinstance(value, str):
        raise _fail(f"dcap-qvl's verified report has no field {name!r}")
    try:
        return bytes.fromhex(value)
    except ValueError as e:
        raise _fail(f"dcap-qvl's verified report field {name!r} is not hex") from e


def _int_field(report: dict[str, Any], name: str) -> int:
    value = report.get(name)
    if not isinstance(value, int):
        raise _fail(f"dcap-qvl's verified report has no integer field {name!r}")
    return value


class DcapVerifier(VerifierBase):
    """Intel DCAP ECDSA quotes: SGX (quote v3/v4/v5) and TDX (v4 TDREPORT 1.0, v5 TDREPORT 1.0/1.5)."""

    name = "dcap"
    where = "dcap quote"
    backends: tuple[str, ...] = ("sgx", "tdx")

    def sniff(self, evidence: bytes) -> bool:
        try:
            if len(evidence) < HEADER_LEN:
                return False
            version, key_type, tee_type = struct.unpack_from("<HHI", evidence, 0)
            return (
                version in (3, 4, 5)
                and key_type in (ATT_KEY_ECDSA_P256, ATT_KEY_ECDSA_P384)
                and tee_type in (TEE_SGX, TEE_TDX)
                and bytes(evidence[12:28]) == INTEL_QE_VENDOR_ID
            )
        except (TypeError, struct.error):
            return False

    def _verify(self, evidence: bytes, *, at: int, anchors: TrustAnchors, collateral: bytes | None) -> Claims:
        quote = evidence
        if len(quote) > MAX_QUOTE_LEN:
            raise _fail(f"quote is {len(quote)} bytes, larger than any DCAP quote ({MAX_QUOTE_LEN})")
        version, tee_type, _ = _layout(quote)
        kind = "TDX" if tee_type == TEE_TDX else "SGX"

        col, doc = self._collateral(collateral)
        if not anchors.intel_sgx_roots:
            raise _fail("no Intel SGX root CA in the trust anchors (TrustAnchors.intel_sgx_roots is empty)")

        errors: list[str] = []
        claims_doc: dict[str, Any] | None = None
        trusted_root: x509.Certificate | None = None
        for i, root_der in enumerate(anchors.intel_sgx_roots):
            root = parse_der_certificate(root_der, f"Intel SGX trust anchor #{i + 1}", where="trust anchors")
            try:
                verifier = dcap_qvl.QuoteVerifier(root_der)
                result = verifier.verify_with_policy(quote, col, at, dcap_qvl.QuotePolicy.claims_only(at))
                claims_doc = json.loads(result.to_json())
                trusted_root = root
                break
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # dcap-qvl raises ValueError; a Rust panic is a BaseException
                detail = _legacy_detail(quote, col, root_der, at) or str(e)
                errors.append(f"root {cert_fingerprint(root)[:16]}: {_explain(detail, doc, at)}")
        if claims_doc is None:
            if len(errors) == 1:
                raise _fail(
                    f"{kind} quote v{version} failed DCAP verification: {errors[0].split(': ', 1)[1]}"
                )
            raise _fail(
                f"{kind} quote v{version} failed DCAP verification under every Intel root: "
                + "; ".join(errors)
            )
        assert trusted_root is not None
        chain = self._chain(quote, trusted_root)
        try:
            return self._claims(claims_doc, version, tee_type, chain, _crl_windows(doc))
        except EvidenceError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _fail(f"unexpected shape of dcap-qvl's verified claims: {e!r}") from e

    @staticmethod
    def _collateral(collateral: bytes | None) -> tuple[Any, dict[str, Any]]:
        if collateral is None:
            raise _fail("DCAP quote verification needs collateral (QuoteCollateralV3 JSON from a PCCS)")
        if not isinstance(collateral, bytes | bytearray | memoryview | str):
            raise _fail(f"collateral must be JSON bytes, got {type(collateral).__name__}")
        if len(collateral) > MAX_COLLATERAL_LEN:
            raise _fail(f"collateral is {len(collateral)} bytes, more than {MAX_COLLATERAL_LEN}")
        try:
            text = collateral if isinstance(collateral, str) else bytes(collateral).decode("utf-8")
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("top level is not an object")
            col = dcap_qvl.QuoteCollateralV3.from_json(text)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise _fail(f"collateral is not valid DCAP collateral JSON: {' '.join(str(e).split())}") from e
        return col, doc

    @staticmethod
    def _chain(quote: bytes, root: x509.Certificate) -> tuple[ChainCert, ...]:
        """The PCK certificate chain dcap-qvl verified (leaf, PCK CA) and the trusted Intel root."""
        try:
            pem = dcap_qvl.parse_quote(quote).cert_chain_pem_bytes()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # already verified by dcap-qvl: this only fails if it changed its mind
            raise _fail(f"cannot read the PCK certificate chain of a verified quote: {e}") from e
        if not pem:
            raise _fail("the quote carries no PCK certificate chain (certification data type 5 expected)")
        certs = parse_pem_certificates(bytes(pem), "PCK certificate chain", where=_WHERE)
        # The quote's copy of the root is not what was trusted (dcap-qvl checks the chain up to the
        # pinned root): report the pinned root, and only the non-self-issued certificates before it.
        body = [c for c in certs if c.subject != c.issuer and cert_fingerprint(c) != cert_fingerprint(root)]
        roles = ["PCK leaf", "PCK CA"] + ["intermediate"] * max(0, len(body) - 2)
        return (*(chain_cert(c, r) for c, r in zip(body, roles, strict=False)), chain_cert(root, "root"))

    @staticmethod
    def _claims(
        doc: dict[str, Any],
        version: int,
        tee_type: int,
        chain: tuple[ChainCert, ...],
        crl_windows: list[tuple[int, int]],
    ) -> Claims:
        tcb = doc["tcb"]
        status = str(tcb["status"])
        advisories = tuple(str(a) for a in tcb.get("advisory_ids") or ())
        if status == "Revoked":
            raise _fail("the platform's TCB level is Revoked in Intel's TCB info")
        reports = doc["report"]
        if not isinstance(reports, dict) or len(reports) != 1:
            raise _fail("dcap-qvl's verified claims hold no single report body")
        ((body_kind, report),) = reports.items()
        if not isinstance(report, dict):
            raise _fail("dcap-qvl's verified report body is not an object")
        if isinstance(report.get("base"), dict):  # TD15: {"base": TD10 fields, "tee_tcb_svn2", ...}
            report = {**report["base"], **{k: v for k, v in report.items() if k != "base"}}
        header = doc.get("header") or {}
        platform = doc.get("platform") or {}
        pck = platform.get("pck") or {}
        qe = doc.get("qe") or {}
        extra: dict[str, Any] = {
            "quote_version": version,
            "report_body": body_kind,
            "attestation_key_type": header.get("attestation_key_type"),
            "qe_svn": header.get("qe_svn"),
            "pce_svn": header.get("pce_svn"),
            "tcb_eval_data_number": tcb.get("eval_data_number"),
            "platform_tcb_status": (platform.get("tcb_level") or {}).get("tcbStatus"),
            "platform_tcb_date": (platform.get("tcb_level") or {}).get("tcbDate"),
            "qe_tcb_status": (qe.get("tcb_level") or {}).get("tcbStatus"),
            "fmspc": bytes(pck.get("fmspc") or b"").hex(),
            "collateral_issued_at": doc.get("latest_issue_date"),
            "collateral_expires_at": doc.get("earliest_expiration_date"),
        }
        report_data = _hex_field(report, "report_data")
        if len(report_data) != 64:
            raise _fail(f"report_data is {len(report_data)} bytes, expected 64")
        collateral_window = list(crl_windows)
        issued, expires = doc.get("latest_issue_date"), doc.get("earliest_expiration_date")
        if isinstance(issued, int) and isinstance(expires, int):
            collateral_window.append((issued, expires))
        valid_from, valid_until = window(chain, *collateral_window)
        common: dict[str, Any] = {
            "signing_chain": chain,
            "valid_from": valid_from,
            "valid_until": valid_until,
        }

        if tee_type == TEE_SGX:
            attributes = _hex_field(report, "attributes")
            flags = int.from_bytes(attributes[:8], "little")
            extra.update(
                cpu_svn=_hex_field(report, "cpu_svn").hex(),
                misc_select=_int_field(report, "misc_select"),
                attributes=attributes.hex(),
            )
            mr_enclave = _hex_field(report, "mr_enclave").hex()
            mr_signer = _hex_field(report, "mr_signer").hex()
            return Claims(
                backend="sgx",
                measurement=mr_enclave,
                signer=mr_signer,
                product_id=_int_field(report, "isv_prod_id"),
                security_version=_int_field(report, "isv_svn"),
                debug=bool(flags & 0x2),  # SGX ATTRIBUTES.DEBUG is bit 1 of the flags
                report_data=report_data,
                simulated=False,
                tcb_status=status,
                advisories=advisories,
                extra=extra,
                measurements={"mrenclave": mr_enclave, "mrsigner": mr_signer},
                **common,
            )

        td_attributes = _hex_field(report, "td_attributes")
        tee_tcb_svn = _hex_field(report, "tee_tcb_svn")
        for name in (
            "mr_seam",
            "mr_signer_seam",
            "seam_attributes",
            "td_attributes",
            "xfam",
            "mr_config_id",
            "mr_owner",
            "mr_owner_config",
            "rt_mr0",
            "rt_mr1",
            "rt_mr2",
            "rt_mr3",
            "tee_tcb_svn",
            "tee_tcb_svn2",
            "mr_service_td",
        ):
            if name in report:
                extra[name] = _hex_field(report, name).hex()
        measurements = {"mrtd": _hex_field(report, "mr_td").hex()}
        for name in _TDX_REGISTERS:
            if name in report:
                measurements[name.replace("_", "")] = extra[name]
        return Claims(
            backend="tdx",
            measurement=_hex_field(report, "mr_td").hex(),
            signer="",  # TDX has no signer identity; MRCONFIGID/MROWNER/RTMRs are in extra
            product_id=0,
            # The TD itself has no SVN. We report TEE_TCB_SVN[0], the TDX module's SVN byte (the first
            # TDX TCB component Intel's TCB info compares), so a policy can ask for a minimum module SVN.
            security_version=tee_tcb_svn[0] if tee_tcb_svn else 0,
            debug=bool(td_attributes[:1] and td_attributes[0] & 0x1),  # TD ATTRIBUTES.DEBUG is bit 0
            report_data=report_data,
            simulated=False,
            tcb_status=status,
            advisories=advisories,
            extra=extra,
            measurements=measurements,
            **common,
        )
