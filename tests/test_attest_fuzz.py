"""Fuzzing the real-evidence verifiers: random bytes, and random mutations of real vectors.

Properties checked for every input:
- only EvidenceError escapes verify() (and sniff() never raises);
- the error came from a check, not from the verifier's last-resort net for unexpected exceptions;
- if a mutated vector is still accepted, its claims are exactly the original's (the mutation hit
  bytes no claim depends on, e.g. the PEM text of an embedded certificate); in particular a
  certificate's unsigned outer signatureAlgorithm cannot be altered (it must equal the signed one).
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.attest import verify_evidence
from confide.attest.anchors import default_test_anchors
from confide.attest.claims import Claims, TrustAnchors
from confide.attest.nitro import NitroVerifier
from confide.attest.sev_snp import SevSnpVerifier, build_cert_table, parse_cert_table
from confide.attest.sgx_dcap import DcapVerifier
from confide.client.policy import Policy
from confide.enclave.errors import ConfideError, EvidenceError
from confide.enclave.providers.envelope import wrap_evidence

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"
ANCHORS: TrustAnchors = default_test_anchors(TV)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _vec(rel: str) -> bytes:
    return (TV / rel).read_bytes()


# name -> (verifier, evidence, collateral, at)
CASES: dict[str, tuple[Any, bytes, bytes | None, int]] = {
    "sgx": (DcapVerifier(), _vec("sgx/sgx_quote.bin"), _vec("sgx/sgx_quote_collateral.json"), 1750377600),
    "tdx": (DcapVerifier(), _vec("tdx/tdx_quote.bin"), _vec("tdx/tdx_quote_collateral.json"), 1750377600),
    "sev-snp": (
        SevSnpVerifier(),
        _vec("snp/snp_report_milan.bin"),
        _vec("snp/snp_vcek_milan.der"),
        1750377600,
    ),
    "nitro": (NitroVerifier(), base64.b64decode(_vec("nitro/nitro_attestation.b64")), None, 1725720000),
}
ORIGINAL: dict[str, Claims] = {
    name: v.verify(ev, at=at, anchors=ANCHORS, collateral=col) for name, (v, ev, col, at) in CASES.items()
}


def _check(name: str, evidence: bytes, collateral: bytes | None = None, at: int | None = None) -> None:
    verifier, _, real_collateral, real_at = CASES[name]
    col = real_collateral if collateral is None else collateral
    try:
        claims = verifier.verify(evidence, at=real_at if at is None else at, anchors=ANCHORS, collateral=col)
    except EvidenceError as e:
        assert "unexpected" not in e.message, f"a library exception reached the last-resort net: {e}"
        return
    assert claims == ORIGINAL[name], "a mutated input was accepted with different claims"


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        b[pos % len(b)] = value
    return bytes(b)


_edits = st.lists(
    st.tuples(st.integers(min_value=0, max_value=1 << 20), st.integers(0, 255)), min_size=1, max_size=4
)


@pytest.mark.parametrize("name", list(CASES))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_only_raise_evidence_error(name: str, data: bytes) -> None:
    verifier = CASES[name][0]
    assert isinstance(verifier.sniff(data), bool)
    _check(name, data)


@pytest.mark.parametrize("name", list(CASES))
@FUZZ
@given(edits=_edits)
def test_mutated_vectors_only_raise_evidence_error(name: str, edits: list[tuple[int, int]]) -> None:
    evidence = CASES[name][1]
    mutated = _mutate(evidence, edits)
    assert isinstance(CASES[name][0].sniff(mutated), bool)
    _check(name, mutated)


@pytest.mark.parametrize("name", list(CASES))
@FUZZ
@given(cut=st.integers(min_value=0, max_value=1 << 16), insert=st.binary(max_size=16))
def test_cut_and_spliced_vectors_only_raise_evidence_error(name: str, cut: int, insert: bytes) -> None:
    evidence = CASES[name][1]
    pos = cut % (len(evidence) + 1)
    _check(name, evidence[:pos])
    if insert:
        _check(name, evidence[:pos] + insert + evidence[pos:])


@pytest.mark.parametrize("name", ["sgx", "sev-snp"])
@FUZZ
@given(edits=_edits)
def test_mutated_collateral_only_raises_evidence_error(name: str, edits: list[tuple[int, int]]) -> None:
    _, evidence, collateral, _ = CASES[name]
    assert collateral is not None
    _check(name, evidence, collateral=_mutate(collateral, edits))


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(at=st.integers(min_value=-(1 << 70), max_value=1 << 70))
def test_any_verification_time_only_raises_evidence_error(name: str, at: int) -> None:
    _check(name, CASES[name][1], at=at)


# ---- the new parsers: certificate tables, envelopes, policy files ---------------------------------


_SNP_REPORT, _VCEK = CASES["sev-snp"][1], CASES["sev-snp"][2] or b""
AUX = build_cert_table({"vcek": _VCEK}, pad_to=2048)
ENVELOPES = {
    "sgx": (
        wrap_evidence(
            kind="dcap-quote", provider="gramine-sgx", evidence=CASES["sgx"][1], extra={"enclave": "k"}
        ),
        CASES["sgx"][2],
    ),
    "sev-snp": (
        wrap_evidence(
            kind="sev-snp-report", provider="tsm", evidence=_SNP_REPORT, extra={}, certificates=AUX
        ),
        None,
    ),
}


def _clean(e: EvidenceError) -> None:
    assert "unexpected" not in e.message, f"a library exception reached the last-resort net: {e}"


@FUZZ
@given(edits=_edits)
def test_mutated_cert_table_only_raises_evidence_error(edits: list[tuple[int, int]]) -> None:
    blob = _mutate(AUX, edits)
    try:
        parsed = parse_cert_table(blob)
        assert isinstance(parsed, dict) and all(isinstance(v, bytes) for v in parsed.values())
    except EvidenceError as e:
        _clean(e)
    try:
        c = SevSnpVerifier().verify(_SNP_REPORT, at=1750377600, anchors=ANCHORS, collateral=blob)
    except EvidenceError as e:
        _clean(e)
        return
    assert (
        c.measurement == ORIGINAL["sev-snp"].measurement and c.report_data == ORIGINAL["sev-snp"].report_data
    )


@pytest.mark.parametrize("name", list(ENVELOPES))
@FUZZ
@given(edits=_edits)
def test_mutated_envelopes_only_raise_evidence_error(name: str, edits: list[tuple[int, int]]) -> None:
    envelope, col = ENVELOPES[name]
    try:
        c = verify_evidence(_mutate(envelope, edits), at=1750377600, anchors=ANCHORS, collateral=col)
    except EvidenceError as e:
        _clean(e)
        return
    assert c.measurement == ORIGINAL[name].measurement and c.report_data == ORIGINAL[name].report_data


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(text=st.text(max_size=300))
def test_random_policy_text_only_raises_confide_errors(text: str) -> None:
    with contextlib.suppress(ConfideError):
        Policy.from_toml(text, where="fuzz.toml")


_TOML_ATOMS = st.sampled_from(
    [
        "[sgx]",
        "[tdx]",
        "[sev-snp]",
        "[nitro]",
        "measurements = {",
        "mrtd = ",
        "pcr0 = ",
        "min_tcb = { snp = ",
        "tolerated_advisories = [",
        '"ab"',
        "]",
        "}",
        "\n",
        "1",
        "true",
        '"' + "ab" * 48 + '"',
        "x = ",
    ]
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(parts=st.lists(_TOML_ATOMS, max_size=20))
def test_policy_shaped_text_only_raises_confide_errors(parts: list[str]) -> None:
    with contextlib.suppress(ConfideError):
        Policy.from_toml("".join(parts), where="fuzz.toml")
