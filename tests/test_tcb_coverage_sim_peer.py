"""confide.enclave.backend SimBackend.verify_peer (mutual attestation on the simulated backend) and the
provider pseudo-file helpers, facing forged, foreign or malformed evidence and unusable paths."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend, parse_sim_body
from confide.enclave.errors import ConfideError, EvidenceError
from confide.enclave.providers import read_attribute, write_attribute
from confide.enclave.sim_platform import SimPlatform

MEAS = "ab" * 32


@pytest.fixture
def plat(tmp_path: Path) -> SimPlatform:
    return SimPlatform.create(tmp_path / "platform")


def _backend(plat: SimPlatform) -> SimBackend:
    return SimBackend(plat, EnclaveIdentity("sim", MEAS, SIM_SIGNER, 1, 3, False))


def test_a_peers_evidence_verifies_and_yields_its_identity_and_report_data(plat: SimPlatform) -> None:
    b = _backend(plat)
    ident, rd = b.verify_peer(b.evidence(b"r" * 64, extra={}))
    assert ident.measurement == MEAS and rd == b"r" * 64
    with pytest.raises(ValueError, match="report data must be 64 bytes"):
        b.evidence(b"short", extra={})


def _edit(evidence: bytes, **kw: object) -> bytes:
    obj = json.loads(evidence)
    obj.update(kw)
    return json.dumps(obj).encode()


def test_forged_foreign_and_oversized_evidence_is_refused(plat: SimPlatform, tmp_path: Path) -> None:
    b = _backend(plat)
    good = b.evidence(b"r" * 64, extra={})
    other = _backend(SimPlatform.create(tmp_path / "other")).evidence(b"r" * 64, extra={})
    cases = [
        (b"{" + b" " * (1 << 21) + b"}", "longer than"),
        (_edit(good, format="sgx-quote"), "not sim evidence"),
        (other, "not certified by this simulated platform's attestation key"),
        (_edit(good, certificates=[]), "not certified"),
        (_edit(good, signature=base64.b64encode(b"\0" * 64).decode()), "signature does not verify"),
    ]
    for evidence, message in cases:
        with pytest.raises(EvidenceError) as info:
            b.verify_peer(evidence)
        assert message in str(info.value) and "peer evidence" in str(info.value)


def test_a_sim_body_claiming_another_backend_is_refused(plat: SimPlatform) -> None:
    body = json.loads(base64.b64decode(json.loads(_backend(plat).evidence(b"r" * 64, extra={}))["body"]))
    body["simulated"] = False
    with pytest.raises(EvidenceError, match="must declare backend 'sim' and simulated true"):
        parse_sim_body(json.dumps(body).encode(), where="b")


def test_pseudo_file_helpers_name_the_path(tmp_path: Path) -> None:
    f = tmp_path / "attr"
    f.write_bytes(b"x" * 10)
    assert read_attribute(f, "report") == b"x" * 10
    with pytest.raises(ConfideError, match="report is larger than 4 bytes"):
        read_attribute(f, "report", limit=4)
    with pytest.raises(ConfideError, match="cannot read report"):
        read_attribute(tmp_path / "absent", "report")
    with pytest.raises(ConfideError, match="cannot open inblob for writing"):
        write_attribute(tmp_path / "absent", b"x", "inblob")
    write_attribute(f, b"abc", "inblob")
    assert f.read_bytes()[:3] == b"abc"
    with pytest.raises(ConfideError, match="cannot write inblob"):
        write_attribute(Path("/dev/full"), b"x", "inblob")
