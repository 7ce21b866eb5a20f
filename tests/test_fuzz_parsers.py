"""Hypothesis fuzzing of every parser that reads hostile input: only Confide errors may escape."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.attest import TrustAnchors, verify_evidence
from confide.client.policy import Policy, check_endorsement
from confide.enclave import channel
from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend
from confide.enclave.errors import ConfideError, EvidenceError, FormatError
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.report_data import report_data_for
from confide.enclave.request import open_request
from confide.enclave.sim_platform import SimPlatform

ENCLAVE = Identity.generate("enclave")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_parse_call_random_bytes(frame: bytes) -> None:
    with contextlib.suppress(FormatError):
        channel.parse_call(frame)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"id": json_values, "call": st.sampled_from([*channel.CALLS, "x"]), "args": json_values}
    )
)
def test_parse_call_structured(obj: dict) -> None:
    import json

    try:
        call = channel.parse_call(json.dumps(obj).encode())
    except FormatError:
        return
    assert call.name in channel.CALLS and isinstance(call.args, dict)


@pytest.fixture(scope="module")
def sim_evidence(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, TrustAnchors]:
    plat = SimPlatform.create(tmp_path_factory.mktemp("p") / "platform")
    backend = SimBackend(plat, EnclaveIdentity("sim", "ab" * 32, SIM_SIGNER, 1, 1, False))
    ev = backend.evidence(report_data_for(ENCLAVE.public, b"n"), extra={"enclave": ENCLAVE.public.to_line()})
    return ev, TrustAnchors(sim_roots=(plat.root_der,))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_sim_evidence_mutations(sim_evidence: tuple[bytes, TrustAnchors], data: st.DataObject) -> None:
    ev, anchors = sim_evidence
    blob = bytearray(ev)
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    try:
        claims = verify_evidence(bytes(blob), at=int(time.time()), anchors=anchors)
    except EvidenceError:
        return
    # a mutation that still verifies must not have changed anything signed
    assert claims == verify_evidence(ev, at=int(time.time()), anchors=anchors)


def test_sim_evidence_certificate_with_unused_signature_bits_is_refused(
    tmp_path: Path,
) -> None:
    """The fuzz test's find: the platform certificate's signature BIT STRING re-encoded with a
    non-zero unused-bits count (possible when its last bit is zero) still parsed and verified, under
    another fingerprint. Every certificate reaching a verifier must be the one DER encoding."""
    import base64
    import json

    for attempt in range(64):  # each platform's signature ends in a zero bit with probability 1/2
        plat = SimPlatform.create(tmp_path / f"platform{attempt}")
        backend = SimBackend(plat, EnclaveIdentity("sim", "ab" * 32, SIM_SIGNER, 1, 1, False))
        ev = backend.evidence(report_data_for(ENCLAVE.public, b"n"), extra={})
        outer = json.loads(ev)
        der = bytearray(base64.b64decode(outer["certificates"][0]))
        if not der[-1] & 1:
            break
    else:
        raise AssertionError("64 platforms in a row had a signature ending in a one bit")
    anchors = TrustAnchors(sim_roots=(plat.root_der,))
    sig_at = len(der) - 64  # Ed25519: ... 03 41 00 <64 bytes>
    assert der[sig_at - 3 : sig_at] == b"\x03\x41\x00"
    verify_evidence(ev, at=int(time.time()), anchors=anchors)  # the original verifies
    der[sig_at - 1] = 1  # "one unused bit": the same 64 signature bytes to a lenient parser
    outer["certificates"][0] = base64.b64encode(bytes(der)).decode()
    with pytest.raises(EvidenceError, match="not canonical DER"):
        verify_evidence(json.dumps(outer).encode(), at=int(time.time()), anchors=anchors)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_run_request_random(blob: bytes) -> None:
    with pytest.raises(ConfideError):
        open_request(blob, ENCLAVE)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_policy_random_text(text: str) -> None:
    with contextlib.suppress(FormatError):
        Policy.from_toml(text, where="fuzz")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_identity_endorsement_and_public_line_random(blob: bytes) -> None:
    for parse in (
        lambda: Identity.from_private_bytes(blob, where="fuzz"),
        lambda: check_endorsement(blob, where="fuzz"),
        lambda: PublicIdentity.from_line(blob.decode("utf-8", "replace")),
    ):
        with contextlib.suppress(ConfideError):
            parse()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "memory_budget_mib",
                "sandbox",
                "debug",
                "cpu_seconds",
                "wall_seconds",
                "product_id",
                "security_version",
                "x",
            ]
        ),
        json_values,
        max_size=4,
    )
)
def test_enclave_config_random_settings(data: dict) -> None:
    from confide.enclave.config import EnclaveConfig

    try:
        cfg = EnclaveConfig.from_dict(data, where="fuzz")
    except FormatError:
        return
    assert cfg.memory_budget_mib > 0 and cfg.sandbox in ("strict", "weak") and isinstance(cfg.debug, bool)
    assert isinstance(cfg.security_version, int) and not isinstance(cfg.security_version, bool)
