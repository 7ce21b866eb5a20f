"""Evidence providers `gramine-sgx` and `tsm`, run against directories laid out like Gramine's
/dev/attestation and the kernel's /sys/kernel/config/tsm/report, filled from the real vectors; the
evidence they return is then verified by the verifiers, as a client would."""

from __future__ import annotations

import ctypes
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from confide.attest import verify_evidence
from confide.attest.anchors import default_anchors
from confide.attest.envelope import unwrap
from confide.attest.sev_snp import build_cert_table
from confide.cli.main import main
from confide.client.policy import Policy, evaluate
from confide.enclave import backend as backend_module
from confide.enclave.backend import create_backend
from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity
from confide.enclave.providers import tsm as tsm_module
from confide.enclave.providers.gramine_sgx import GramineSgxBackend
from confide.enclave.providers.tsm import (
    SNP_GET_DERIVED_KEY,
    SnpDerivedKeyReq,
    SnpDerivedKeyResp,
    SnpGuestRequestIoctl,
    TsmBackend,
)
from confide.enclave.report_data import report_data_for
from confide.enclave.runtime import load_or_create_keys

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"
AT = 1750377600
SGX_QUOTE = (TV / "sgx/sgx_quote.bin").read_bytes()
SGX_COL = (TV / "sgx/sgx_quote_collateral.json").read_bytes()
TDX_QUOTE = (TV / "tdx/tdx_quote.bin").read_bytes()
TDX_COL = (TV / "tdx/tdx_quote_collateral.json").read_bytes()
SNP_REPORT = (TV / "snp/snp_report_milan.bin").read_bytes()
SNP_VCEK = (TV / "snp/snp_vcek_milan.der").read_bytes()
SGX_REPORT_DATA = SGX_QUOTE[48 + 320 : 48 + 384]
TDX_REPORT_DATA = TDX_QUOTE[48 + 520 : 48 + 584]
SNP_REPORT_DATA = SNP_REPORT[0x50:0x90]


# ---- Gramine's /dev/attestation ---------------------------------------------------------------------


def gramine_dir(root: Path, *, quote: bytes = SGX_QUOTE, kind: str = "dcap") -> Path:
    """/dev/attestation as Gramine lays it out, the SGX report and quote taken from the real quote."""
    d = root / "attestation"
    (d / "keys").mkdir(parents=True)
    (d / "attestation_type").write_text(kind)
    (d / "my_target_info").write_bytes(b"\x5a" * 512)
    (d / "target_info").write_bytes(b"")
    (d / "user_report_data").write_bytes(b"")
    (d / "report").write_bytes(quote[48 : 48 + 384] + bytes(32) + bytes(16))  # body, key id, MAC
    (d / "quote").write_bytes(quote)
    (d / "keys" / "_sgx_mrenclave").write_bytes(b"\x01" * 16)
    (d / "keys" / "_sgx_mrsigner").write_bytes(b"\x02" * 16)
    return d


def test_gramine_identity_and_evidence_verify(tmp_path: Path) -> None:
    d = gramine_dir(tmp_path)
    b = GramineSgxBackend(EnclaveConfig(), base=d)
    assert b.simulated is False
    ident = b.identity
    assert ident.backend == "sgx" and ident.debug is False
    assert ident.measurement.startswith("33d8736db756ed49") and ident.signer.startswith("815f42f11cf64430")
    assert (d / "target_info").read_bytes() == b"\x5a" * 512  # EREPORT addressed to itself
    ev = b.evidence(SGX_REPORT_DATA, extra={"enclave": "confide-pub1:test"})
    assert (d / "user_report_data").read_bytes() == SGX_REPORT_DATA
    env = unwrap(ev)
    assert env.kind == "dcap-quote" and env.provider == "gramine-sgx" and env.evidence == SGX_QUOTE
    claims = verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SGX_COL)
    assert claims.backend == "sgx" and claims.measurement == ident.measurement
    assert claims.extra["enclave"] == "confide-pub1:test" and claims.extra["provider"] == "gramine-sgx"
    assert claims.report_data == SGX_REPORT_DATA


def test_gramine_refuses_a_quote_that_does_not_bind_the_report_data(tmp_path: Path) -> None:
    b = GramineSgxBackend(EnclaveConfig(), base=gramine_dir(tmp_path))
    with pytest.raises(ConfideError, match="does not carry the report data"):
        b.evidence(b"\x00" * 64, extra={})
    with pytest.raises(ValueError, match="64 bytes"):
        b.evidence(b"short", extra={})


def test_gramine_refuses_a_quote_of_another_enclave(tmp_path: Path) -> None:
    d = gramine_dir(tmp_path)
    b = GramineSgxBackend(EnclaveConfig(), base=d)
    other = bytearray(SGX_QUOTE)
    other[48 + 64] ^= 0xFF  # another MRENCLAVE
    (d / "quote").write_bytes(bytes(other))
    with pytest.raises(ConfideError, match="not this enclave's"):
        b.evidence(SGX_REPORT_DATA, extra={})
    (d / "quote").write_bytes(TDX_QUOTE)
    with pytest.raises(ConfideError, match="tdx quote, expected SGX"):
        b.evidence(SGX_REPORT_DATA, extra={})


def test_gramine_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfideError, match="needs DCAP"):
        GramineSgxBackend(EnclaveConfig(), base=gramine_dir(tmp_path / "a", kind="epid"))
    with pytest.raises(ConfideError, match="cannot read Gramine attestation type"):
        GramineSgxBackend(EnclaveConfig(), base=tmp_path / "missing")
    d = gramine_dir(tmp_path / "b")
    (d / "my_target_info").write_bytes(b"x" * 10)
    with pytest.raises(ConfideError, match="my_target_info is 10 bytes"):
        GramineSgxBackend(EnclaveConfig(), base=d)
    # a DEBUG enclave (ATTRIBUTES.DEBUG) under a non-debug configuration refuses to start
    d = gramine_dir(tmp_path / "c")
    report = bytearray((d / "report").read_bytes())
    report[48] |= 0x02
    (d / "report").write_bytes(bytes(report))
    with pytest.raises(ConfideError, match="DEBUG mode"):
        GramineSgxBackend(EnclaveConfig(), base=d)
    assert GramineSgxBackend(EnclaveConfig(debug=True), base=d).identity.debug is True


def test_gramine_sealing_keys(tmp_path: Path) -> None:
    d = gramine_dir(tmp_path)
    b = GramineSgxBackend(EnclaveConfig(), base=d)
    k1 = b.sealing_key("measurement", b"x")
    assert len(k1) == 32 and k1 != b"\x01" * 16
    assert k1 == GramineSgxBackend(EnclaveConfig(), base=d).sealing_key("measurement", b"x")
    assert k1 != b.sealing_key("measurement", b"y") and k1 != b.sealing_key("signer", b"x")
    (d / "keys" / "_sgx_mrenclave").write_bytes(b"\x03" * 16)  # another enclave's EGETKEY result
    assert b.sealing_key("measurement", b"x") != k1
    (d / "keys" / "_sgx_mrenclave").write_bytes(b"\x03" * 15)
    with pytest.raises(ConfideError, match="15 bytes"):
        b.sealing_key("measurement", b"x")


def test_gramine_backend_runs_the_runtime_key_setup(tmp_path: Path) -> None:
    """The runtime's start-up (seal the enclave keys, unseal them on the next start) on this backend,
    then a client-side check that the evidence binds exactly those keys."""
    d = gramine_dir(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    b = GramineSgxBackend(EnclaveConfig(), base=d)
    keys = load_or_create_keys(b, state)
    assert load_or_create_keys(GramineSgxBackend(EnclaveConfig(), base=d), state).public == keys.public
    rd = report_data_for(keys.public, b"nonce")
    # the captured quote binds other report data: the provider notices, as real hardware never would
    with pytest.raises(ConfideError, match="does not carry the report data"):
        b.evidence(rd, extra={"enclave": keys.public.to_line()})


# ---- configfs-tsm ----------------------------------------------------------------------------------------


def tsm_dir(root: Path, *, provider: str, outblob: bytes, auxblob: bytes | None = None) -> Path:
    """/sys/kernel/config/tsm/report with one report entry, as the kernel lays it out."""
    base = root / "tsm" / "report"
    entry = base / "confide-test"
    entry.mkdir(parents=True)
    (entry / "provider").write_text(provider + "\n")
    (entry / "generation").write_text("1\n")
    (entry / "inblob").write_bytes(b"")
    (entry / "outblob").write_bytes(outblob)
    if provider == "sev_guest":
        (entry / "privlevel").write_bytes(b"")
        (entry / "privlevel_floor").write_text("0\n")
        (entry / "auxblob").write_bytes(auxblob or b"")
    return base


def test_tsm_snp_evidence_with_auxblob_verifies(tmp_path: Path) -> None:
    aux = build_cert_table({"vcek": SNP_VCEK}, pad_to=16384)
    base = tsm_dir(tmp_path, provider="sev_guest", outblob=SNP_REPORT, auxblob=aux)
    b = TsmBackend(EnclaveConfig(debug=True), base=base, entry="confide-test")
    assert b.identity.backend == "sev-snp" and b.identity.measurement.startswith("b07af9620f3b839b")
    assert b.identity.debug is True  # guest policy bit 19
    ev = b.evidence(SNP_REPORT_DATA, extra={"enclave": "confide-pub1:snp"})
    assert (base / "confide-test" / "inblob").read_bytes() == SNP_REPORT_DATA
    env = unwrap(ev)
    assert env.kind == "sev-snp-report" and env.certificates == aux
    claims = verify_evidence(ev, at=AT, anchors=default_anchors())  # no collateral: the auxblob is used
    assert claims.extra["certificates_from"] == "certificate table" and claims.debug is True
    assert claims.extra["enclave"] == "confide-pub1:snp"
    with pytest.raises(Exception, match="DEBUG enclave"):
        evaluate(Policy(measurements=(claims.measurement,), require_nonce=False), claims, at=AT)


def test_tsm_snp_without_auxblob_needs_the_vcek(tmp_path: Path) -> None:
    base = tsm_dir(tmp_path, provider="sev_guest", outblob=SNP_REPORT, auxblob=bytes(4096))
    b = TsmBackend(EnclaveConfig(debug=True), base=base, entry="confide-test")
    ev = b.evidence(SNP_REPORT_DATA, extra={})
    assert unwrap(ev).certificates is None
    with pytest.raises(Exception, match="needs the VCEK"):
        verify_evidence(ev, at=AT, anchors=default_anchors())
    assert verify_evidence(ev, at=AT, anchors=default_anchors(), collateral=SNP_VCEK).backend == "sev-snp"


def test_tsm_tdx_evidence_verifies(tmp_path: Path) -> None:
    base = tsm_dir(tmp_path, provider="tdx_guest", outblob=TDX_QUOTE)
    b = TsmBackend(EnclaveConfig(), base=base, entry="confide-test")
    assert b.identity.backend == "tdx" and b.identity.measurement.startswith("91eb2b44d141d4ec")
    assert b.identity.security_version == 6
    claims = verify_evidence(
        b.evidence(TDX_REPORT_DATA, extra={}), at=AT, anchors=default_anchors(), collateral=TDX_COL
    )
    assert (
        claims.backend == "tdx"
        and claims.tcb_status == "UpToDate"
        and claims.measurement == b.identity.measurement
    )
    with pytest.raises(ConfideError, match="no sealing key"):
        b.sealing_key("measurement", b"x")


def test_tsm_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tsm_dir(tmp_path / "a", provider="sev_guest", outblob=SNP_REPORT)
    with pytest.raises(ConfideError, match="DEBUG allowed"):
        TsmBackend(EnclaveConfig(), base=base, entry="confide-test")
    b = TsmBackend(EnclaveConfig(debug=True), base=base, entry="confide-test")
    with pytest.raises(ConfideError, match="does not carry the report data"):
        b.evidence(bytes(64), extra={})
    # another writer between inblob and outblob: the generation moves
    real_read = tsm_module.read_attribute

    def racing_read(path: Path, what: str, **kw: Any) -> bytes:
        data = real_read(path, what, **kw)
        if path.name == "outblob":
            (path.parent / "generation").write_text("7\n")
        return data

    monkeypatch.setattr(tsm_module, "read_attribute", racing_read)
    with pytest.raises(ConfideError, match="another writer"):
        b.evidence(SNP_REPORT_DATA, extra={})
    monkeypatch.undo()
    bad = tsm_dir(tmp_path / "b", provider="arm_cca_guest", outblob=SNP_REPORT)
    with pytest.raises(ConfideError, match="unknown configfs-tsm provider"):
        TsmBackend(EnclaveConfig(), base=bad, entry="confide-test")
    wrong = tsm_dir(tmp_path / "c", provider="tdx_guest", outblob=SGX_QUOTE)
    with pytest.raises(ConfideError, match="returned a sgx quote"):
        TsmBackend(EnclaveConfig(), base=wrong, entry="confide-test")
    short = tsm_dir(tmp_path / "d", provider="sev_guest", outblob=SNP_REPORT[:1000])
    with pytest.raises(ConfideError, match="expected 1184"):
        TsmBackend(EnclaveConfig(debug=True), base=short, entry="confide-test")
    with pytest.raises(ConfideError, match="cannot create a configfs-tsm report entry"):
        TsmBackend(EnclaveConfig(), base=tmp_path / "no" / "such" / "dir")


def test_tsm_snp_sealing_key_from_the_firmware(tmp_path: Path) -> None:
    """SNP_GET_DERIVED_KEY through /dev/sev-guest, with the ioctl answered the way the kernel does."""
    base = tsm_dir(tmp_path, provider="sev_guest", outblob=SNP_REPORT)
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    seen: list[tuple[int, int]] = []

    def fake_ioctl(fd: int, request: int, arg: Any) -> int:
        assert request == SNP_GET_DERIVED_KEY == 0xC0205301
        assert isinstance(arg, SnpGuestRequestIoctl) and arg.msg_version == 1
        req = SnpDerivedKeyReq.from_address(arg.req_data)
        seen.append((req.guest_field_select, req.vmpl))
        resp = SnpDerivedKeyResp.from_address(arg.resp_data)
        payload = bytes(32) + bytes([req.guest_field_select]) * 32  # status 0, reserved, DERIVED_KEY
        ctypes.memmove(resp.data, payload, 64)
        return 0

    b = TsmBackend(
        EnclaveConfig(debug=True), base=base, entry="confide-test", sev_guest_device=device, ioctl=fake_ioctl
    )
    k_meas = b.sealing_key("measurement", b"x")
    k_signer = b.sealing_key("signer", b"x")
    assert len(k_meas) == 32 and k_meas != k_signer and k_meas != b.sealing_key("measurement", b"y")
    assert seen[0] == (0b1001, 0) and seen[1] == (0b0111, 0)  # MEASUREMENT|POLICY; FAMILY|IMAGE|POLICY

    def failing_ioctl(fd: int, request: int, arg: Any) -> int:
        arg.exitinfo2 = 0x16
        raise OSError(5, "Input/output error")

    b2 = TsmBackend(
        EnclaveConfig(debug=True),
        base=base,
        entry="confide-test",
        sev_guest_device=device,
        ioctl=failing_ioctl,
    )
    with pytest.raises(ConfideError, match="SNP_GET_DERIVED_KEY failed"):
        b2.sealing_key("measurement", b"x")

    def refusing_ioctl(fd: int, request: int, arg: Any) -> int:
        ctypes.memmove(SnpDerivedKeyResp.from_address(arg.resp_data).data, b"\x16" + bytes(63), 64)
        return 0

    b3 = TsmBackend(
        EnclaveConfig(debug=True),
        base=base,
        entry="confide-test",
        sev_guest_device=device,
        ioctl=refusing_ioctl,
    )
    with pytest.raises(ConfideError, match="status 0x16"):
        b3.sealing_key("measurement", b"x")
    b4 = TsmBackend(
        EnclaveConfig(debug=True), base=base, entry="confide-test", sev_guest_device=tmp_path / "none"
    )
    with pytest.raises(ConfideError, match="cannot open the SEV-SNP guest device"):
        b4.sealing_key("measurement", b"x")


# ---- the registry and the enclave runtime ----------------------------------------------------------


def test_backends_registry_names_the_providers(tmp_path: Path) -> None:
    assert set(backend_module.BACKENDS) >= {"sim", "gramine-sgx", "tsm"}
    if not Path("/dev/attestation").exists():
        with pytest.raises(ConfideError, match="attestation"):
            create_backend("gramine-sgx", platform_dir=tmp_path, config=EnclaveConfig())
    with pytest.raises(ConfideError, match="this build provides: sim, gramine-sgx, tsm"):
        create_backend("sgx-sdk", platform_dir=tmp_path, config=EnclaveConfig())


def test_report_data_binds_the_enclave_keys_for_every_provider(tmp_path: Path) -> None:
    """The same binding for every format: a policy given the enclave's keys refuses evidence whose
    report data does not hash exactly those keys (here: the captured vectors, which bind other data)."""
    keys = Identity.generate("enclave").public
    cases = [
        (GramineSgxBackend(EnclaveConfig(), base=gramine_dir(tmp_path / "g")), SGX_REPORT_DATA, SGX_COL),
        (
            TsmBackend(
                EnclaveConfig(),
                base=tsm_dir(tmp_path / "t", provider="tdx_guest", outblob=TDX_QUOTE),
                entry="confide-test",
            ),
            TDX_REPORT_DATA,
            TDX_COL,
        ),
    ]
    for provider, rd, col in cases:
        claims = verify_evidence(
            provider.evidence(rd, extra={"enclave": keys.to_line()}),
            at=AT,
            anchors=default_anchors(),
            collateral=col,
        )
        policy = Policy(
            measurements=(claims.measurement,),
            require_nonce=False,
            max_age_seconds=0,
            accepted_tcb_status=(claims.tcb_status,),
        )
        evaluate(policy, claims, at=AT)  # authentic and accepted...
        with pytest.raises(Exception, match="not the keys bound"):
            evaluate(policy, claims, at=AT, enclave_keys=keys)  # ...but does not vouch for these keys


# ---- `confide gramine manifest` ------------------------------------------------------------------------


def test_gramine_manifest_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIDE_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "enclave.toml"
    cfg.write_text('[enclave]\nmemory_budget_mib = 3000\nsandbox = "weak"\n')
    out = tmp_path / "confide.manifest.template"
    result = CliRunner().invoke(
        main,
        ["gramine", "manifest", "--out", str(out), "--config", str(cfg), "--state-dir", str(tmp_path / "st")],
    )
    assert result.exit_code == 0, result.output
    manifest = tomllib.loads(out.read_text())  # the template is TOML before Jinja rendering, too
    sgx = manifest["sgx"]
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap"
    assert sgx["enclave_size"] == "4096M"  # 3000 MiB budget + interpreter, a power of two
    assert sgx["isvprodid"] == 1 and sgx["isvsvn"] == 1
    trusted = sgx["trusted_files"]
    assert "file:{{ gramine.libos }}" in trusted
    assert any(t.endswith("/confide/enclave/") for t in trusted)
    for dist in ("cryptography/", "numpy/", "xgboost/", "pyseccomp"):
        assert any(dist in t for t in trusted), dist
    assert f"file:{cfg.resolve()}" in trusted
    assert sgx["allowed_files"] == [f"file:{tmp_path / 'st'}/"]
    argv = manifest["loader"]["argv"]
    assert argv[1:7] == ["-m", "confide.enclave", "--fd", "0", "--backend", "gramine-sgx"]
    assert argv[-2:] == ["--config", str(cfg.resolve())]
    assert "2048M" not in out.read_text()
    # debug configuration: sgx.debug follows, with a warning
    cfg.write_text("[enclave]\ndebug = true\n")
    result = CliRunner().invoke(
        main, ["gramine", "manifest", "--out", str(tmp_path / "d.toml"), "--config", str(cfg)]
    )
    assert result.exit_code == 0 and "WARNING" in result.output
    assert tomllib.loads((tmp_path / "d.toml").read_text())["sgx"]["debug"] is True
    assert "refuses to start" in result.output  # strict sandbox note


def test_envelope_is_canonical_json(tmp_path: Path) -> None:
    ev = GramineSgxBackend(EnclaveConfig(), base=gramine_dir(tmp_path)).evidence(
        SGX_REPORT_DATA, extra={"enclave": "k"}
    )
    doc = json.loads(ev)
    assert doc["format"] == "confide-evidence-v1" and doc["certificates"] is None
    assert os.fsencode(json.dumps(doc, sort_keys=True, separators=(",", ":"))) == ev
