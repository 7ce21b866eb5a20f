"""`confide verify` on real evidence with the shipped roots: --cert (DER, PEM, several files, a
configfs-tsm auxblob), --collateral, --at, --policy, the printed claims; `confide policy init`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from confide.attest.sev_snp import build_cert_table
from confide.cli.main import main
from confide.client.policy import Policy

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"
AT = "1750377600"
SNP = str(TV / "snp/snp_report_milan.bin")
VCEK = TV / "snp/snp_vcek_milan.der"
SNP_MEASUREMENT = "b07af9620f3b839b"


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONFIDE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONFIDE_PCCS_URL", raising=False)
    return tmp_path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def snp_policy(tmp_path: Path, measurement: str) -> Path:
    p = tmp_path / "snp.toml"
    p.write_text(
        'backends = ["sev-snp"]\nrequire_nonce = false\nmax_age_seconds = 0\n'
        f'[sev-snp]\nallow_debug = true\nmeasurements = {{ measurement = "{measurement}" }}\n'
    )
    return p


def full_snp_measurement(tmp_path: Path) -> str:
    code, out = run(
        "verify",
        SNP,
        "--cert",
        str(VCEK),
        "--at",
        AT,
        "--policy",
        str(snp_policy(tmp_path, "00" * 48)),
        "--json",
    )
    assert code == 1
    return out.split("measurement ")[1].split(" ")[0]


def test_verify_snp_with_cert_variants_and_shipped_roots(cli_home: Path, tmp_path: Path) -> None:
    meas = full_snp_measurement(tmp_path)
    assert meas.startswith(SNP_MEASUREMENT) and len(meas) == 96
    policy = str(snp_policy(tmp_path, meas))
    ask, ark = x509.load_pem_x509_certificates((TV / "roots/amd_ask_ark_milan.pem").read_bytes())
    chain = tmp_path / "ask_ark.pem"
    chain.write_bytes(ask.public_bytes(Encoding.PEM) + ark.public_bytes(Encoding.PEM))
    aux = tmp_path / "auxblob"
    aux.write_bytes(build_cert_table({"vcek": VCEK.read_bytes()}, pad_to=4096))
    for certs, source in (
        ([str(VCEK)], "DER certificate"),
        ([str(VCEK), str(chain)], "PEM bundle"),
        ([str(aux)], "certificate table"),
    ):
        args = ["verify", SNP, "--at", AT, "--policy", policy, "--json"]
        for c in certs:
            args += ["--cert", c]
        code, out = run(*args)
        assert code == 0, out
        claims = json.loads(out)["claims"]
        assert claims["extra"]["certificates_from"] == source
        assert [c["role"] for c in claims["signing_chain"]] == ["VCEK", "ASK", "ARK (root)"]
        assert claims["measurements"]["measurement"] == meas
    # the human output names the chain and the window
    code, out = run("verify", SNP, "--cert", str(VCEK), "--at", AT, "--policy", policy)
    assert code == 0 and "signing_chain (leaf first):" in out
    assert "valid: 2022-09-24" in out and "ARK (root): " in out
    # outside the VCEK's window
    code, out = run("verify", SNP, "--cert", str(VCEK), "--at", "1900000000", "--policy", policy)
    assert code == 1 and "expired" in out


def test_cert_option_errors(cli_home: Path, tmp_path: Path) -> None:
    aux = tmp_path / "aux"
    aux.write_bytes(build_cert_table({"vcek": VCEK.read_bytes()}))
    cases = [
        (["--cert", str(VCEK), "--collateral", str(VCEK)], "not both"),
        (["--cert", str(aux), "--cert", str(VCEK)], "must be the only --cert"),
        (["--cert", str(tmp_path / "missing.der")], "cannot read certificate"),
    ]
    for extra, words in cases:
        code, out = run("verify", SNP, "--at", AT, *extra)
        assert code == 1 and words in out, out
    code, out = run("verify", str(TV / "sgx/sgx_quote.bin"), "--at", AT, "--cert", str(VCEK))
    assert code == 1 and "--cert applies to SEV-SNP evidence only" in out


def test_dcap_quote_verifies_with_shipped_roots_and_needs_collateral(cli_home: Path, tmp_path: Path) -> None:
    quote = str(TV / "tdx/tdx_quote.bin")
    policy = tmp_path / "p.toml"
    policy.write_text('require_nonce = false\nmax_age_seconds = 0\nmeasurements = ["' + "00" * 48 + '"]\n')
    code, out = run("verify", quote, "--at", AT, "--policy", str(policy))
    assert code == 1 and "needs collateral" in out
    code, out = run(
        "verify",
        quote,
        "--at",
        AT,
        "--policy",
        str(policy),
        "--collateral",
        str(TV / "tdx/tdx_quote_collateral.json"),
    )
    assert (
        code == 1 and "measurement 91eb2b44d141d4ec" in out and "not accepted" in out
    )  # authentic, not pinned


def test_policy_init_writes_format_examples(cli_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "prod.toml"
    code, _ = run("policy", "init", "--out", str(out))
    assert code == 0
    text = out.read_text()
    assert "# [sev-snp]" in text and "# tolerated_advisories" in text
    assert Policy.load(out) == Policy()


def test_verify_provider_envelopes(cli_home: Path, tmp_path: Path) -> None:
    from confide.enclave.providers.envelope import wrap_evidence

    report = (TV / "snp/snp_report_milan.bin").read_bytes()
    snp_env = tmp_path / "snp.json"
    snp_env.write_bytes(
        wrap_evidence(
            kind="sev-snp-report",
            provider="tsm",
            evidence=report,
            extra={"enclave": "confide-pub1:x"},
            certificates=build_cert_table({"vcek": VCEK.read_bytes()}),
        )
    )
    meas = full_snp_measurement(tmp_path)
    code, out = run("verify", str(snp_env), "--at", AT, "--policy", str(snp_policy(tmp_path, meas)))
    assert code == 0, out
    assert "provider: tsm" in out and "enclave: confide-pub1:x" in out
    sgx_env = tmp_path / "sgx.json"
    sgx_env.write_bytes(
        wrap_evidence(
            kind="dcap-quote",
            provider="gramine-sgx",
            evidence=(TV / "sgx/sgx_quote.bin").read_bytes(),
            extra={},
        )
    )
    code, out = run("verify", str(sgx_env), "--at", AT, "--cert", str(VCEK))
    assert code == 1 and "--cert applies to SEV-SNP evidence only" in out
