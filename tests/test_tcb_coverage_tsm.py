"""confide.enclave.providers.tsm against a configfs-tsm directory a hostile host controls: a generation
that is not a number, report data of the wrong size, a privlevel floor, TDX asked for a sealing key,
an unknown sealing policy, mutual attestation (not built for tsm) all fail closed, naming the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import ConfideError, EnclaveError
from confide.enclave.providers.tsm import TsmBackend
from test_providers import SNP_REPORT, SNP_REPORT_DATA, TDX_QUOTE, tsm_dir

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")


def _snp(tmp_path: Path) -> tuple[Path, TsmBackend]:
    base = tsm_dir(tmp_path, provider="sev_guest", outblob=SNP_REPORT, auxblob=bytes(4096))
    return base / "confide-test", TsmBackend(EnclaveConfig(debug=True), base=base, entry="confide-test")


def test_a_generation_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    entry, b = _snp(tmp_path)
    assert b.report_dir == entry
    (entry / "generation").write_text("seven\n")
    with pytest.raises(ConfideError, match="generation is not a number: 'seven"):
        b.evidence(SNP_REPORT_DATA, extra={})


def test_report_data_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    _, b = _snp(tmp_path)
    with pytest.raises(ValueError, match="report data must be 64 bytes"):
        b.evidence(b"short", extra={})


def test_a_privlevel_floor_is_honoured(tmp_path: Path) -> None:
    entry, b = _snp(tmp_path)
    (entry / "privlevel_floor").write_text("2\n")
    b.evidence(SNP_REPORT_DATA, extra={})
    assert (entry / "privlevel").read_bytes() == b"2\n"


def test_sealing_keys_and_peer_verification_fail_closed(tmp_path: Path) -> None:
    _, snp = _snp(tmp_path / "snp")
    with pytest.raises(ValueError, match="unknown sealing policy 'anyone'"):
        snp.sealing_key("anyone", b"l")  # type: ignore[arg-type]
    with pytest.raises(EnclaveError, match="mutual attestation not supported by backend 'sev-snp'"):
        snp.verify_peer(b"{}")
    base = tsm_dir(tmp_path / "tdx", provider="tdx_guest", outblob=TDX_QUOTE)
    tdx = TsmBackend(EnclaveConfig(), base=base, entry="confide-test")
    with pytest.raises(ConfideError, match="TDX gives a guest no sealing key"):
        tdx.sealing_key("measurement", b"l")
