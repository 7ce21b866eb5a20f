"""The confide command: clear errors and exit codes, never a traceback, never lost data."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from confide.cli.main import main


def cli(*args: str, ok: bool = True) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    out = result.output  # click mixes stderr into output
    if ok:
        assert result.exit_code == 0, out
    return result.exit_code, out


@pytest.fixture
def keys(tmp_path: Path, home: Path) -> Path:
    cli("keygen", "alice", "--out-dir", str(tmp_path))
    cli("keygen", "bob", "--out-dir", str(tmp_path))
    return tmp_path


def test_keygen_encrypt_decrypt_round_trip(keys: Path) -> None:
    src = keys / "data.csv"
    src.write_bytes(b"x,y\n" + b"patient-secret-row,2\n" * 10000)
    cli(
        "encrypt",
        str(src),
        "--to",
        str(keys / "bob.pub"),
        "--to",
        str(keys / "alice.pub"),
        "--meta",
        "dataset=d1",
        "--out",
        str(keys / "data.sealed"),
    )
    assert b"patient-secret-row" not in (keys / "data.sealed").read_bytes()
    _, out = cli(
        "decrypt",
        str(keys / "data.sealed"),
        "--identity",
        str(keys / "bob.key"),
        "--out",
        str(keys / "o.csv"),
    )
    assert (keys / "o.csv").read_bytes() == src.read_bytes()
    assert '"dataset": "d1"' in out
    assert oct(os.stat(keys / "alice.key").st_mode & 0o777) == "0o600"


def test_wrong_identity_fails_cleanly_and_writes_nothing(keys: Path) -> None:
    src = keys / "d.txt"
    src.write_text("secret")
    cli("encrypt", str(src), "--to", str(keys / "bob.pub"), "--out", str(keys / "d.sealed"))
    code, out = cli(
        "decrypt",
        str(keys / "d.sealed"),
        "--identity",
        str(keys / "alice.key"),
        "--out",
        str(keys / "o.txt"),
        ok=False,
    )
    assert code == 1 and "not addressed to identity" in out and "Traceback" not in out
    assert not (keys / "o.txt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encrypt", "missing.csv", "--to", "bob.pub", "--out", "x"], "cannot read"),
        (["encrypt", "d.txt", "--to", "confide-pub1:nonsense", "--out", "x"], "64 bytes"),
        (["encrypt", "d.txt", "--to", "bob.pub", "--out", "x", "--meta", "novalue"], "NAME=VALUE"),
        (["decrypt", "d.txt", "--identity", "alice.key", "--out", "x"], "bad magic"),
        (["decrypt", "d.txt", "--identity", "bob.pub", "--out", "x"], "accessible by other users"),
        (["verify", "d.txt"], "unrecognised evidence format"),
        (["verify", "nothere.json"], "cannot read evidence"),
        (["verify", "d.txt", "--nonce", "xyz"], "not valid hex"),
    ],
)
def test_bad_input_gives_clear_error(
    keys: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(keys)
    (keys / "d.txt").write_text("not sealed")
    code, out = cli(*args, ok=False)
    assert code == 1, out
    assert out.startswith("error: ") and message in out and "Traceback" not in out


def test_usage_errors_exit_2(home: Path) -> None:
    assert cli("encrypt", ok=False)[0] == 2
    assert cli("nosuchcommand", ok=False)[0] == 2
    assert cli("encrypt", "a", "--to", "b", "--out", "c", "--chunk-size", "7", ok=False)[0] == 2


def test_measure_prints_a_stable_hex_digest(home: Path, tmp_path: Path) -> None:
    _, a = cli("measure")
    _, b = cli("measure")
    assert a == b and len(a.strip()) == 64
    cfg = tmp_path / "e.toml"
    cfg.write_text("[enclave]\nmemory_budget_mib = 2048\n")
    _, c = cli("measure", "--config", str(cfg))
    assert c != a
    _, j = cli("measure", "--json")
    assert json.loads(j)["measurement"] == a.strip()


def test_policy_init_writes_loadable_policies(home: Path, tmp_path: Path) -> None:
    from confide.client.policy import Policy

    cli("policy", "init", "--dev", "--out", str(tmp_path / "dev.toml"))
    dev = Policy.load(tmp_path / "dev.toml")
    assert dev.allow_simulation and dev.backends == ("sim",) and len(dev.measurements) == 1
    cli("policy", "init", "--out", str(tmp_path / "prod.toml"))
    assert Policy.load(tmp_path / "prod.toml").allow_simulation is False


def test_real_process_never_prints_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "CONFIDE_HOME": str(tmp_path / "h")}
    bad = tmp_path / "bad.sealed"
    bad.write_bytes(b"CNFSEAL1\xff\xff\xff\xff")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "confide.cli.main",
            "decrypt",
            str(bad),
            "--identity",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


# ---- `confide verify` on real evidence captured on real hardware -----------------------------------

from conftest import TESTVECTORS  # noqa: E402

SGX_AT = "1750377600"


def write_policy(path: Path, **values: object) -> Path:
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {str(v).lower()}")
        elif isinstance(v, list):
            lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
        else:
            lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


def verify_vector(
    vector: str,
    *,
    at: str,
    policy: Path,
    collateral: str | None = None,
    ok: bool = False,
    json_out: bool = False,
) -> tuple[int, str]:
    """`confide verify` on one of ../shared/testvectors, against the vendors' roots, at a fixed time."""
    args = ["verify", str(TESTVECTORS / vector), "--roots", str(TESTVECTORS / "roots"), "--at", at]
    args += ["--policy", str(policy)] + (
        ["--collateral", str(TESTVECTORS / collateral)] if collateral else []
    )
    return cli(*args, *(["--json"] if json_out else []), ok=ok)


SGX = {"vector": "sgx/sgx_quote.bin", "collateral": "sgx/sgx_quote_collateral.json"}


def sgx_measurement(tmp_path: Path) -> str:
    """The quote's MRENCLAVE, read from the policy's refusal (authentic, but not pinned yet)."""
    _, out = verify_vector(**SGX, at=SGX_AT, policy=write_policy(tmp_path / "empty.toml"))
    return out.split("measurement ")[1].split(" ")[0]


def test_verify_real_sgx_quote_with_a_matching_policy(home: Path, tmp_path: Path) -> None:
    meas = sgx_measurement(tmp_path)
    assert meas.startswith("33d8736db756ed49")
    pin = {"backends": ["sgx"], "measurements": [meas], "require_nonce": False, "max_age_seconds": 0}
    policy = write_policy(
        tmp_path / "sgx.toml", **pin, accepted_tcb_status=["UpToDate", "ConfigurationAndSWHardeningNeeded"]
    )
    _, out = verify_vector(**SGX, at=SGX_AT, policy=policy, ok=True, json_out=True)
    claims = json.loads(out)["claims"]
    assert claims["backend"] == "sgx" and claims["debug"] is False
    assert bytes.fromhex(claims["report_data"]).startswith(b"Hello, world!")
    assert claims["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    # after the collateral window: fails closed
    code, out = verify_vector(**SGX, at="1760000000", policy=policy)
    assert code == 1 and "expired" in out.lower()
    # a policy accepting only UpToDate refuses it, naming the advisories
    code, out = verify_vector(**SGX, at=SGX_AT, policy=write_policy(tmp_path / "strict.toml", **pin))
    assert code == 1 and "INTEL-SA-00289" in out


def test_verify_real_snp_report_debug_rejected_by_production_policy(home: Path, tmp_path: Path) -> None:
    snp = {"vector": "snp/snp_report_milan.bin", "collateral": "snp/snp_vcek_milan.der", "at": "1750377600"}
    code, out = verify_vector(**snp, policy=write_policy(tmp_path / "p.toml", require_nonce=False))
    assert code == 1 and "DEBUG enclave" in out
    debug_ok = write_policy(
        tmp_path / "dbg.toml",
        require_nonce=False,
        allow_debug=True,
        backends=["sev-snp"],
        measurements=["b07af9620f3b839b" + "0" * 48],
    )
    code, out = verify_vector(**snp, policy=debug_ok)
    assert code == 1 and "DEBUG" not in out
    assert "measurement b07af9620f3b839b" in out  # authentic; only the measurement pin differs


def test_verify_real_nitro_document(home: Path, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p.toml", backends=["nitro"], require_nonce=False, max_age_seconds=0)
    code, out = verify_vector("nitro/nitro_attestation.b64", at="1725720000", policy=policy)
    assert code == 1 and "measurement" in out and "not accepted" in out and "DEBUG" not in out
    code, out = verify_vector("nitro/nitro_attestation_debug.b64", at="1725720000", policy=policy)
    assert code == 1 and "DEBUG enclave" in out


# ---- the local flow through the real command ---------------------------------------------------------


def test_enclave_evidence_and_verify_debug_enclave_rejected(keys: Path, tmp_path: Path) -> None:
    debug_cfg = tmp_path / "debug.toml"
    debug_cfg.write_text("[enclave]\ndebug = true\n")
    nonce = os.urandom(32).hex()
    for cfg, name in ((None, "prod"), (debug_cfg, "debug")):
        extra = ["--config", str(cfg)] if cfg else []
        cli("enclave", "evidence", "--nonce", nonce, "--out", str(tmp_path / f"{name}.json"), *extra)
        cli("policy", "init", "--dev", "--out", str(tmp_path / f"{name}.toml"), *extra)
    _, out = cli(
        "verify", str(tmp_path / "prod.json"), "--nonce", nonce, "--policy", str(tmp_path / "prod.toml")
    )
    assert "OK: sim evidence verified" in out
    code, out = cli(
        "verify",
        str(tmp_path / "debug.json"),
        "--nonce",
        nonce,
        "--policy",
        str(tmp_path / "debug.toml"),
        ok=False,
    )
    assert code == 1 and "DEBUG enclave" in out
    code, out = cli(
        "verify",
        str(tmp_path / "prod.json"),
        "--nonce",
        "00" * 32,
        "--policy",
        str(tmp_path / "prod.toml"),
        ok=False,
    )
    assert code == 1 and "nonce mismatch" in out
    # tampered evidence file
    ev = json.loads((tmp_path / "prod.json").read_text())
    sig = bytearray(base64.b64decode(ev["signature"]))
    sig[10] ^= 1
    ev["signature"] = base64.b64encode(bytes(sig)).decode()
    (tmp_path / "bad.json").write_text(json.dumps(ev))
    code, out = cli(
        "verify",
        str(tmp_path / "bad.json"),
        "--nonce",
        nonce,
        "--policy",
        str(tmp_path / "prod.toml"),
        ok=False,
    )
    assert code == 1 and "signature does not verify" in out


def test_confide_run_success_and_failure(keys: Path, tmp_path: Path) -> None:
    data = keys / "d.csv"
    data.write_text("a,b\n1,2\n3,4\n")
    cli("encrypt", str(data), "--to", str(keys / "alice.pub"), "--out", str(keys / "d.sealed"))
    cli("policy", "init", "--dev", "--out", str(tmp_path / "dev.toml"))
    fn = tmp_path / "sum.py"
    fn.write_text(
        "import pandas as pd\n"
        "def run(ctx):\n"
        "    df = pd.read_csv(ctx.inputs['data'])\n"
        "    ctx.outputs['total'].write(str(int(df[ctx.params['col']].sum()) * ctx.params['times']).encode())\n"
    )
    common = [
        "--input",
        f"data={keys / 'd.sealed'}",
        "--to",
        str(keys / "bob.pub"),
        "--identity",
        str(keys / "alice.key"),
        "--policy",
        str(tmp_path / "dev.toml"),
    ]
    _, out = cli(
        "run",
        str(fn),
        *common,
        "--output",
        f"total={tmp_path / 't.sealed'}",
        "--param",
        "col=b",
        "--param",
        "times=10",
    )
    assert "receipt" in out
    cli(
        "decrypt",
        str(tmp_path / "t.sealed"),
        "--identity",
        str(keys / "bob.key"),
        "--out",
        str(tmp_path / "t.txt"),
    )
    assert (tmp_path / "t.txt").read_text() == "60"
    assert json.loads((tmp_path / "t.receipt.json").read_text())["body"]["outputs"]["total"]
    # a failing function: exit 1, no output, details sealed to the caller and recipients
    code, out = cli(
        "run",
        str(fn),
        *common,
        "--output",
        f"total={tmp_path / 'u.sealed'}",
        "--param",
        "col=zzz",
        "--param",
        "times=1",
        ok=False,
    )
    assert code == 1 and "function failed (exception)" in out and not (tmp_path / "u.sealed").exists()
    cli(
        "decrypt",
        str(tmp_path / "u.receipt.error.sealed"),
        "--identity",
        str(keys / "alice.key"),
        "--out",
        str(tmp_path / "e.txt"),
    )
    assert "KeyError: 'zzz'" in (tmp_path / "e.txt").read_text()
    # the default (production) policy refuses the simulated enclave before any key leaves the client
    code, out = cli("run", str(fn), *common[:-2], "--output", f"total={tmp_path / 'v.sealed'}", ok=False)
    assert code == 1 and "SIMULATED" in out and not (tmp_path / "v.sealed").exists()
    assert "confide policy init --dev" in out  # the refusal names the fix
    code, out = cli("run", str(fn), *common, "--input", "bad", "--output", "x=y", ok=False)
    assert code == 1 and "NAME=VALUE" in out
