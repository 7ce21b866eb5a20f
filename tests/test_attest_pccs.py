"""DCAP collateral fetched from a PCCS and cached on disk, against a PCCS on loopback that serves the
real test collateral through the Intel PCS v4 API (no internet is used)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from confide.attest import verify_evidence
from confide.attest.anchors import default_anchors
from confide.attest.pccs import CACHE_FORMAT, PCCS_URL_ENV, PccsClient, pccs_from_env
from confide.cli.main import main
from confide.enclave.errors import EvidenceError, FormatError

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"
AT = 1750377600
SGX_QUOTE = (TV / "sgx/sgx_quote.bin").read_bytes()
TDX_QUOTE = (TV / "tdx/tdx_quote.bin").read_bytes()
COLLATERAL = {
    "sgx": json.loads((TV / "sgx/sgx_quote_collateral.json").read_text()),
    "tdx": json.loads((TV / "tdx/tdx_quote_collateral.json").read_text()),
}


class FakePccs:
    """What a PCCS answers, from the captured collateral: PCK CRL, root CA CRL, TCB info, QE identity."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.delay = 0.0
        self.tamper = False
        self.fail = False

    def answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        tee = "tdx" if url.path.startswith("/tdx/") else "sgx"
        if self.fail:
            return 503, {}, b"unavailable"
        if url.path.endswith("/pckcrl"):
            col = COLLATERAL["sgx" if query.get("ca") == "processor" else "tdx"]
            chain = urllib.parse.quote(col["pck_crl_issuer_chain"])
            return 200, {"SGX-PCK-CRL-Issuer-Chain": chain}, bytes.fromhex(col["pck_crl"])
        col = COLLATERAL[tee]
        if url.path.endswith("/rootcacrl"):
            return 200, {}, col["root_ca_crl"].encode()
        if url.path.endswith("/tcb"):
            info = col["tcb_info"].replace('"version":3', '"version": 3') if self.tamper else col["tcb_info"]
            info = info.replace("UpToDate", "OutOfDate", 1) if self.tamper else info
            body = '{"tcbInfo":' + info + ',"signature":"' + col["tcb_info_signature"] + '"}'
            return (
                200,
                {"TCB-Info-Issuer-Chain": urllib.parse.quote(col["tcb_info_issuer_chain"])},
                body.encode(),
            )
        if url.path.endswith("/qe/identity"):
            body = (
                '{"enclaveIdentity":'
                + col["qe_identity"]
                + ',"signature":"'
                + col["qe_identity_signature"]
                + '"}'
            )
            chain = urllib.parse.quote(col["qe_identity_issuer_chain"])
            return 200, {"SGX-Enclave-Identity-Issuer-Chain": chain}, body.encode()
        return 404, {}, b"not found"


@pytest.fixture
def pccs() -> Iterator[tuple[str, FakePccs]]:
    state = FakePccs()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            if state.delay:
                time.sleep(state.delay)
            status, headers, body = state.answer(self.path)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        block_on_close = False

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that gave up (the timeout test) is not an error here

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("quote", "tee", "status"),
    [(SGX_QUOTE, "sgx", "ConfigurationAndSWHardeningNeeded"), (TDX_QUOTE, "tdx", "UpToDate")],
)
def test_collateral_from_pccs_verifies_and_is_cached(
    pccs: tuple[str, FakePccs], tmp_path: Path, quote: bytes, tee: str, status: str
) -> None:
    url, state = pccs
    client = PccsClient(url, cache_dir=tmp_path / "cache")
    claims = verify_evidence(quote, at=AT, anchors=default_anchors(), pccs=client)
    assert claims.backend == tee and claims.tcb_status == status
    assert client.fetches == 1
    assert any(p.startswith(f"/{tee}/certification/v4/tcb?fmspc=") for p in state.requests)
    cached = client.cache_path(quote)
    assert cached is not None and cached.is_file()
    entry = json.loads(cached.read_text())
    assert entry["format"] == CACHE_FORMAT and entry["tee"] == tee
    assert entry["valid_from"] == claims.valid_from and entry["valid_until"] == claims.valid_until
    # inside the window the cache answers; a second client on the same directory shares it
    again = PccsClient(url, cache_dir=tmp_path / "cache")
    assert verify_evidence(quote, at=AT + 3600, anchors=default_anchors(), pccs=again).tcb_status == status
    assert again.fetches == 0


def test_cache_outside_its_window_or_damaged_is_fetched_again(
    pccs: tuple[str, FakePccs], tmp_path: Path
) -> None:
    url, _ = pccs
    client = PccsClient(url, cache_dir=tmp_path)
    client.collateral(SGX_QUOTE, at=AT)
    assert client.fetches == 1
    client.collateral(SGX_QUOTE, at=AT - 30 * 86400)  # before the cached copy's window: ask again
    assert client.fetches == 2
    path = client.cache_path(SGX_QUOTE)
    assert path is not None
    path.write_text("{not json")
    client.collateral(SGX_QUOTE, at=AT)
    assert client.fetches == 3 and json.loads(path.read_text())["format"] == CACHE_FORMAT


def test_tampered_cache_cannot_make_verification_pass(pccs: tuple[str, FakePccs], tmp_path: Path) -> None:
    url, _ = pccs
    client = PccsClient(url, cache_dir=tmp_path)
    client.collateral(SGX_QUOTE, at=AT)
    path = client.cache_path(SGX_QUOTE)
    assert path is not None
    entry = json.loads(path.read_text())
    entry["collateral"]["tcb_info"] = entry["collateral"]["tcb_info"].replace(
        '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18', 1
    )
    path.write_text(json.dumps(entry))
    with pytest.raises(EvidenceError, match="(?i)signature is invalid for tcb_info"):
        verify_evidence(SGX_QUOTE, at=AT, anchors=default_anchors(), pccs=client)


def test_pccs_serving_altered_collateral_fails_verification(
    pccs: tuple[str, FakePccs], tmp_path: Path
) -> None:
    url, state = pccs
    state.tamper = True
    with pytest.raises(EvidenceError, match="(?i)signature|tcb"):
        verify_evidence(TDX_QUOTE, at=AT, anchors=default_anchors(), pccs=PccsClient(url, cache_dir=tmp_path))


def test_pccs_errors_are_clean(pccs: tuple[str, FakePccs], tmp_path: Path) -> None:
    url, state = pccs
    state.fail = True
    with pytest.raises(EvidenceError, match="cannot fetch collateral from PCCS"):
        PccsClient(url, cache_dir=tmp_path).collateral(SGX_QUOTE, at=AT)
    state.fail = False
    state.delay = 1.0
    with pytest.raises(EvidenceError, match="did not answer within"):
        PccsClient(url, timeout=0.2).collateral(SGX_QUOTE, at=AT)
    with pytest.raises(EvidenceError, match="cannot read FMSPC"):
        PccsClient(url).collateral(SGX_QUOTE[:100], at=AT)


def test_no_pccs_by_default_and_url_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(PCCS_URL_ENV, raising=False)
    assert pccs_from_env(None, cache_dir=tmp_path) is None
    with pytest.raises(EvidenceError, match="needs collateral"):
        verify_evidence(SGX_QUOTE, at=AT, anchors=default_anchors())
    monkeypatch.setenv(PCCS_URL_ENV, "https://pccs.example.internal:8081")
    client = pccs_from_env(None, cache_dir=tmp_path)
    assert client is not None and client.url == "https://pccs.example.internal:8081"
    for bad in ("ftp://x", "pccs.example", "http://"):
        with pytest.raises(FormatError, match="PCCS URL"):
            PccsClient(bad)


def test_cli_verify_with_pccs(
    pccs: tuple[str, FakePccs], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = pccs
    monkeypatch.setenv("CONFIDE_HOME", str(tmp_path / "home"))
    policy = tmp_path / "p.toml"
    policy.write_text(
        'backends = ["tdx"]\nrequire_nonce = false\nmax_age_seconds = 0\n'
        '[tdx]\nmeasurements = { mrtd = "' + "91eb2b44d141d4ec" + "0" * 80 + '" }\n'
    )
    args = ["verify", str(TV / "tdx/tdx_quote.bin"), "--at", str(AT), "--policy", str(policy), "--pccs", url]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "mrtd 91eb2b44d141d4ec" in result.output  # authentic; pin differs
    assert (tmp_path / "home" / "cache" / "pccs").is_dir()
    before = len(state.requests)
    result = CliRunner().invoke(main, args)
    assert len(state.requests) == before  # served from the cache
