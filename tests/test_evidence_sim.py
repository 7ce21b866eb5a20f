"""Sim evidence: authenticity (verifier) and acceptability (policy), with every negative case."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from confide.attest import TrustAnchors, verify_evidence
from confide.client.policy import Policy, check_endorsement, evaluate, make_endorsement
from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend
from confide.enclave.errors import EvidenceError, PolicyError
from confide.enclave.keys import Identity
from confide.enclave.report_data import report_data_for
from confide.enclave.sim_platform import SimPlatform

MEAS = "ab" * 32


@pytest.fixture
def platform(tmp_path: Path) -> SimPlatform:
    return SimPlatform.create(tmp_path / "platform")


def backend(
    platform: SimPlatform, *, debug: bool = False, svn: int = 3, measurement: str = MEAS
) -> SimBackend:
    return SimBackend(platform, EnclaveIdentity("sim", measurement, SIM_SIGNER, 1, svn, debug))


def anchors(platform: SimPlatform) -> TrustAnchors:
    return TrustAnchors(sim_roots=(platform.root_der,))


def dev_policy(**kw: object) -> Policy:
    base = {"backends": ("sim",), "measurements": (MEAS,), "allow_simulation": True}
    return Policy(**{**base, **kw})  # type: ignore[arg-type]


def make(platform: SimPlatform, enclave: Identity, nonce: bytes, **kw: object) -> bytes:
    return backend(platform, **kw).evidence(  # type: ignore[arg-type]
        report_data_for(enclave.public, nonce), extra={"enclave": enclave.public.to_line()}
    )


def test_authentic_evidence_verifies_and_says_it_is_simulated(platform: SimPlatform, alice: Identity) -> None:
    ev = make(platform, alice, b"n1")
    claims = verify_evidence(ev, at=int(time.time()), anchors=anchors(platform))
    assert claims.backend == "sim" and claims.simulated is True
    assert "NO protection against the host" in claims.extra["notice"]
    assert claims.measurement == MEAS and claims.signer == SIM_SIGNER and claims.security_version == 3
    assert claims.report_data == report_data_for(alice.public, b"n1")
    evaluate(dev_policy(), claims, at=int(time.time()), nonce=b"n1", enclave_keys=alice.public)


def test_default_policy_rejects_simulated_evidence(platform: SimPlatform, alice: Identity) -> None:
    claims = verify_evidence(make(platform, alice, b"n"), at=int(time.time()), anchors=anchors(platform))
    with pytest.raises(PolicyError, match="SIMULATED.*allow_simulation = false"):
        evaluate(Policy(measurements=(MEAS,)), claims, at=int(time.time()), nonce=b"n")


@pytest.mark.parametrize(
    ("kw", "policy_kw", "nonce", "message"),
    [
        ({"debug": True}, {}, b"n", "DEBUG enclave"),
        ({"measurement": "cd" * 32}, {}, b"n", "measurement cdcd.* not accepted"),
        ({"svn": 1}, {"min_security_version": 2}, b"n", "security version 1 below the minimum 2"),
        ({}, {}, b"other", "nonce mismatch"),
        ({}, {}, None, "requires a nonce"),
        ({}, {"measurements": ()}, b"n", "no measurements or auditor keys"),
    ],
)
def test_policy_mismatches(platform, alice, kw, policy_kw, nonce, message) -> None:
    claims = verify_evidence(
        make(platform, alice, b"n", **kw), at=int(time.time()), anchors=anchors(platform)
    )
    with pytest.raises(PolicyError, match=message):
        evaluate(dev_policy(**policy_kw), claims, at=int(time.time()), nonce=nonce)


def test_debug_allowed_only_when_policy_says_so(platform: SimPlatform, alice: Identity) -> None:
    claims = verify_evidence(
        make(platform, alice, b"n", debug=True), at=int(time.time()), anchors=anchors(platform)
    )
    evaluate(dev_policy(allow_debug=True), claims, at=int(time.time()), nonce=b"n")


def test_stale_and_future_evidence(platform: SimPlatform, alice: Identity) -> None:
    now = int(time.time())
    claims = verify_evidence(make(platform, alice, b"n"), at=now, anchors=anchors(platform))
    with pytest.raises(PolicyError, match="s old; policy allows 60 s"):
        evaluate(dev_policy(max_age_seconds=60), claims, at=now + 3600, nonce=b"n")
    with pytest.raises(PolicyError, match="in the future"):
        evaluate(dev_policy(), claims, at=now - 3600, nonce=b"n")


def test_keys_not_bound_in_report_data_are_rejected(
    platform: SimPlatform, alice: Identity, bob: Identity
) -> None:
    claims = verify_evidence(make(platform, alice, b"n"), at=int(time.time()), anchors=anchors(platform))
    with pytest.raises(PolicyError, match="not the keys bound"):
        evaluate(dev_policy(), claims, at=int(time.time()), nonce=b"n", enclave_keys=bob.public)


def _mutate(ev: bytes, **changes: object) -> bytes:
    outer = json.loads(ev)
    body = json.loads(base64.b64decode(outer["body"]))
    body.update(changes)
    outer["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(outer).encode()


@pytest.mark.parametrize(
    "change",
    [{"debug": False, "measurement": "00" * 32}, {"report_data": "00" * 64}, {"security_version": 99}],
)
def test_tampered_body_fails_signature(platform: SimPlatform, alice: Identity, change: dict) -> None:
    ev = make(platform, alice, b"n", debug=True)
    with pytest.raises(EvidenceError, match="signature does not verify"):
        verify_evidence(_mutate(ev, **change), at=int(time.time()), anchors=anchors(platform))


def test_tampered_signature_and_certificate(platform: SimPlatform, alice: Identity) -> None:
    ev = json.loads(make(platform, alice, b"n"))
    sig = bytearray(base64.b64decode(ev["signature"]))
    sig[0] ^= 1
    bad = {**ev, "signature": base64.b64encode(bytes(sig)).decode()}
    with pytest.raises(EvidenceError, match="signature does not verify"):
        verify_evidence(json.dumps(bad).encode(), at=int(time.time()), anchors=anchors(platform))
    cert = bytearray(base64.b64decode(ev["certificates"][0]))
    cert[-5] ^= 1  # inside the certificate's signature
    bad = {**ev, "certificates": [base64.b64encode(bytes(cert)).decode()]}
    with pytest.raises(EvidenceError, match="certificate"):
        verify_evidence(json.dumps(bad).encode(), at=int(time.time()), anchors=anchors(platform))


def test_evidence_from_another_platform_is_not_trusted(
    platform: SimPlatform, alice: Identity, tmp_path: Path
) -> None:
    other = SimPlatform.create(tmp_path / "other")
    ev = make(other, alice, b"n")
    with pytest.raises(EvidenceError, match="issuer|does not verify"):
        verify_evidence(ev, at=int(time.time()), anchors=anchors(platform))
    with pytest.raises(EvidenceError, match="no simulated vendor root"):
        verify_evidence(ev, at=int(time.time()), anchors=TrustAnchors())


def test_expired_platform_certificate(platform: SimPlatform, alice: Identity) -> None:
    ev = make(platform, alice, b"n")
    with pytest.raises(EvidenceError, match="platform certificate .* expired: .*checked at 2050"):
        verify_evidence(ev, at=2524608000, anchors=anchors(platform))  # 2050-01-01
    with pytest.raises(EvidenceError, match="not yet valid.*checked at 2000"):
        verify_evidence(ev, at=946684800, anchors=anchors(platform))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"{",
        b"[]",
        b'{"format":"confide-sim-evidence-v1"}',
        b"\x00" * 100,
        b'{"format":"confide-sim-evidence-v1","body":"!!","signature":"","certificates":[]}',
    ],
)
def test_malformed_evidence(platform: SimPlatform, blob: bytes) -> None:
    with pytest.raises(EvidenceError):
        verify_evidence(blob, at=int(time.time()), anchors=anchors(platform))


def test_unknown_body_field_rejected(platform: SimPlatform, alice: Identity) -> None:
    # re-sign a body with an extra field using the platform key: authentic but not our format
    ev = json.loads(make(platform, alice, b"n"))
    body = json.loads(base64.b64decode(ev["body"]))
    body["surprise"] = 1
    raw = json.dumps(body).encode()
    ev["body"] = base64.b64encode(raw).decode()
    ev["signature"] = base64.b64encode(platform.pak_key.sign(b"confide-sim-evidence-v1\0" + raw)).decode()
    with pytest.raises(EvidenceError, match="unknown field.*surprise"):
        verify_evidence(json.dumps(ev).encode(), at=int(time.time()), anchors=anchors(platform))


def test_auditor_endorsement(platform: SimPlatform, alice: Identity, bob: Identity) -> None:
    auditor = Identity.generate("auditor")
    claims = verify_evidence(make(platform, alice, b"n"), at=int(time.time()), anchors=anchors(platform))
    pol = dev_policy(measurements=(), auditor_keys=(auditor.public.to_line(),))
    endorsement = check_endorsement(make_endorsement(MEAS, auditor, "reviewed v0.1"), where="e")
    evaluate(pol, claims, at=int(time.time()), nonce=b"n", endorsements=(endorsement,))
    # an endorsement by someone the policy does not list does not count
    stranger = check_endorsement(make_endorsement(MEAS, bob), where="e")
    with pytest.raises(PolicyError, match="not endorsed"):
        evaluate(pol, claims, at=int(time.time()), nonce=b"n", endorsements=(stranger,))
    # a forged endorsement (measurement swapped after signing) does not verify
    forged = json.loads(make_endorsement("cd" * 32, auditor))
    forged["measurement"] = MEAS
    with pytest.raises(Exception, match="does not verify"):
        check_endorsement(json.dumps(forged).encode(), where="e")


def test_policy_file_parsing(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(dev_policy().to_toml())
    assert Policy.load(p) == dev_policy()
    p.write_text("allow_simulation = true\nallow_smulation = true\n")
    with pytest.raises(Exception, match="unknown policy key.*allow_smulation"):
        Policy.load(p)
    p.write_text('measurements = ["zz"]\n')
    with pytest.raises(Exception, match="not valid hex"):
        Policy.load(p)
    p.write_text("max_age_seconds = -1\n")
    with pytest.raises(Exception, match="non-negative integer"):
        Policy.load(p)
    p.write_text("allow_debug = 1\n")
    with pytest.raises(Exception, match="true or false"):
        Policy.load(p)
    assert Policy().allow_simulation is False and Policy().allow_debug is False and Policy().require_nonce


def test_sealing_keys_bound_to_identity(platform: SimPlatform) -> None:
    a = backend(platform, measurement=MEAS)
    b = backend(platform, measurement="cd" * 32)
    assert a.sealing_key("measurement", b"x") == backend(platform, measurement=MEAS).sealing_key(
        "measurement", b"x"
    )
    assert a.sealing_key("measurement", b"x") != b.sealing_key("measurement", b"x")
    assert a.sealing_key("signer", b"x") == b.sealing_key("signer", b"x")  # same signer: upgrade-safe
    assert a.sealing_key("measurement", b"x") != a.sealing_key("measurement", b"y")
