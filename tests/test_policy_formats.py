"""Per-format policy: expected registers (measurements, RTMRs, PCRs, host data), TCB statuses and
tolerated Intel advisories, SEV-SNP minimum TCB, debug per format, and the production defaults,
evaluated on the claims of the real vectors."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from confide.attest import Claims, verify_evidence
from confide.attest.anchors import default_anchors
from confide.client.policy import POLICY_FORMAT_EXAMPLES, FormatPolicy, Policy, evaluate
from confide.enclave.errors import FormatError, PolicyError

pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

TV = Path(__file__).resolve().parents[1].parent / "shared" / "testvectors"


def _claims(name: str) -> Claims:
    if name == "sgx":
        ev, col, at = "sgx/sgx_quote.bin", "sgx/sgx_quote_collateral.json", 1750377600
    elif name == "tdx":
        ev, col, at = "tdx/tdx_quote.bin", "tdx/tdx_quote_collateral.json", 1750377600
    elif name == "sev-snp":
        ev, col, at = "snp/snp_report_milan.bin", "snp/snp_vcek_milan.der", 1750377600
    else:
        data = base64.b64decode((TV / f"nitro/{name}.b64").read_bytes())
        return verify_evidence(data, at=1725720000, anchors=default_anchors())
    return verify_evidence(
        (TV / ev).read_bytes(), at=at, anchors=default_anchors(), collateral=(TV / col).read_bytes()
    )


@pytest.fixture(scope="module")
def claims() -> dict[str, Claims]:
    return {n: _claims(n) for n in ("sgx", "tdx", "sev-snp", "nitro_attestation", "nitro_attestation_debug")}


def _policy(text: str) -> Policy:
    return Policy.from_toml("require_nonce = false\nmax_age_seconds = 0\n" + text, where="test.toml")


def _refused(policy: Policy, c: Claims, *words: str) -> str:
    with pytest.raises(PolicyError) as info:
        evaluate(policy, c, at=c.issued_at or 1750377600)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    return str(info.value)


def test_production_defaults_per_vector(claims: dict[str, Claims]) -> None:
    """Each real vector under the built-in production policy with its measurement pinned."""
    for name, c in claims.items():
        policy = dataclasses.replace(
            Policy(), measurements=(c.measurement,), require_nonce=False, max_age_seconds=0
        )
        if name == "tdx":
            evaluate(policy, c, at=1750377600)  # UpToDate, not debug: accepted
        elif name == "sgx":
            _refused(policy, c, "ConfigurationAndSWHardeningNeeded", "INTEL-SA-00289")
        elif name in ("sev-snp", "nitro_attestation_debug"):
            _refused(policy, c, "DEBUG enclave")
        else:
            evaluate(policy, c, at=c.issued_at or 0)


def test_sgx_table_pins_mrenclave_mrsigner_and_product(claims: dict[str, Claims]) -> None:
    c = claims["sgx"]
    mrenclave, mrsigner = c.measurements["mrenclave"], c.measurements["mrsigner"]
    ok = _policy(
        f'[sgx]\nmeasurements = {{ mrsigner = "{mrsigner}" }}\nproduct_id = 0\n'
        'accepted_tcb_status = ["ConfigurationAndSWHardeningNeeded"]\n'
    )
    evaluate(ok, c, at=1750377600)  # pinned by MRSIGNER alone: an identity register
    bad = _policy(
        f'[sgx]\nmeasurements = {{ mrenclave = ["{"00" * 32}", "{"11" * 32}"] }}\nproduct_id = 3\n'
        'accepted_tcb_status = ["ConfigurationAndSWHardeningNeeded"]\n'
    )
    _refused(bad, c, f"mrenclave {mrenclave} not accepted", "product id 0 is not the policy's 3")


def test_tolerated_advisories(claims: dict[str, Claims]) -> None:
    c = claims["sgx"]
    base = (
        f'measurements = ["{c.measurement}"]\naccepted_tcb_status = ["ConfigurationAndSWHardeningNeeded"]\n'
    )
    evaluate(_policy(base), c, at=1750377600)  # no list: the accepted level's advisories are accepted
    evaluate(
        _policy(base + 'tolerated_advisories = ["INTEL-SA-00289", "intel-sa-00615"]\n'), c, at=1750377600
    )
    _refused(
        _policy(base + 'tolerated_advisories = ["INTEL-SA-00289"]\n'),
        c,
        "does not tolerate: INTEL-SA-00615",
    )
    evaluate(_policy(base + 'tolerated_advisories = ["*"]\n'), c, at=1750377600)
    # per-format table overrides the top level
    per_format = _policy(
        f'measurements = ["{c.measurement}"]\n[sgx]\naccepted_tcb_status = ["ConfigurationAndSWHardeningNeeded"]\n'
        "tolerated_advisories = []\n"
    )
    _refused(per_format, c, "INTEL-SA-00289, INTEL-SA-00615")


def test_tdx_table_pins_mrtd_and_rtmrs(claims: dict[str, Claims]) -> None:
    c = claims["tdx"]
    m = c.measurements
    evaluate(
        _policy(
            f'[tdx]\nmeasurements = {{ mrtd = "{m["mrtd"]}", rtmr0 = "{m["rtmr0"]}", rtmr1 = "{m["rtmr1"]}" }}\n'
        ),
        c,
        at=1750377600,
    )
    _refused(
        _policy(f'[tdx]\nmeasurements = {{ mrtd = "{m["mrtd"]}", rtmr2 = "{"00" * 48}" }}\n'),
        c,
        "rtmr2 d833feef",
    )
    # an RTMR pinned without MRTD does not name the code: the identity is still unaccepted
    _refused(_policy(f'[tdx]\nmeasurements = {{ rtmr0 = "{m["rtmr0"]}" }}\n'), c, "measurement 91eb2b44")


def test_snp_table_pins_measurement_host_data_and_min_tcb(claims: dict[str, Claims]) -> None:
    c = claims["sev-snp"]
    head = f'[sev-snp]\nallow_debug = true\nmeasurements = {{ measurement = "{c.measurement}", host_data = "{"00" * 32}" }}\n'
    evaluate(_policy(head + "min_tcb = { bootloader = 2, snp = 5, microcode = 68 }\n"), c, at=1750377600)
    _refused(_policy(head + "min_tcb = { snp = 6 }\n"), c, "REPORTED_TCB snp 5 is below the minimum 6")
    _refused(_policy(head + "min_tcb = { fmc = 1 }\n"), c, "no fmc component")
    _refused(
        _policy(f'[sev-snp]\nallow_debug = true\nmeasurements = {{ id_key_digest = "{"00" * 48}" }}\n'),
        c,
        "sev-snp evidence has no id_key_digest",
    )
    # debug allowed only in the SNP table: other formats keep refusing debug evidence
    p = _policy(
        f'measurements = ["{c.measurement}", "{claims["nitro_attestation_debug"].measurement}"]\n[sev-snp]\nallow_debug = true\n'
    )
    evaluate(p, c, at=1750377600)
    _refused(p, claims["nitro_attestation_debug"], "DEBUG enclave")


def test_nitro_table_pins_pcrs(claims: dict[str, Claims]) -> None:
    c = claims["nitro_attestation"]
    m = c.measurements
    assert set(m) >= {"pcr0", "pcr1", "pcr2", "pcr8"}
    evaluate(
        _policy(
            f'[nitro]\nmeasurements = {{ pcr0 = "{m["pcr0"]}", pcr1 = "{m["pcr1"]}", pcr2 = "{m["pcr2"]}" }}\n'
        ),
        c,
        at=c.issued_at or 0,
    )
    _refused(
        _policy(f'[nitro]\nmeasurements = {{ pcr0 = "{m["pcr0"]}", pcr4 = "{"00" * 48}" }}\n'), c, "pcr4 "
    )
    dbg = claims["nitro_attestation_debug"]
    _refused(_policy(f'[nitro]\nmeasurements = {{ pcr0 = "{"00" * 48}" }}\n'), dbg, "DEBUG enclave")
    evaluate(
        _policy(f'[nitro]\nallow_debug = true\nmeasurements = {{ pcr0 = "{"00" * 48}" }}\n'),
        dbg,
        at=dbg.issued_at or 0,
    )


def test_primary_measurements_of_48_bytes_are_accepted(claims: dict[str, Claims]) -> None:
    c = claims["tdx"]
    evaluate(_policy(f'measurements = ["{c.measurement.upper()}"]\n'), c, at=1750377600)
    with pytest.raises(FormatError, match="is 20 bytes"):
        _policy(f'measurements = ["{"ab" * 20}"]\n')


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[sgx]\nmeasurements = { mrtd = "00" }\n', "unknown sgx register 'mrtd'"),
        ('[tdx]\nmeasurements = { mrtd = "00" }\n', "must be 48 bytes"),
        ("[nitro]\nmeasurements = { pcr0 = [] }\n", "non-empty list"),
        ("[nitro]\naccepted_tcb_status = []\n", "unknown key(s) accepted_tcb_status"),
        ("[sev-snp]\nmin_tcb = { bl = 1 }\n", "unknown min_tcb part 'bl'"),
        ("[sev-snp]\nmin_tcb = { snp = 300 }\n", "0..255"),
        ("[sgx]\nproduct_id = -1\n", "non-negative integer"),
        ('[sgx]\nallow_debug = "no"\n', "true or false"),
        ("[tpm]\nx = 1\n", "unknown policy key(s) tpm"),
        ("sgx = 3\n", "[sgx] must be a table"),
        ('tolerated_advisories = "INTEL-SA-1"\n', "list of strings"),
    ],
)
def test_policy_file_errors_name_the_key(text: str, words: str) -> None:
    with pytest.raises(FormatError) as info:
        _policy(text)
    assert words in str(info.value)


def test_to_toml_round_trip_with_format_tables(tmp_path: Path) -> None:
    p = Policy(
        backends=("sgx", "sev-snp"),
        tolerated_advisories=("INTEL-SA-00615",),
        formats={
            "sgx": FormatPolicy(
                measurements={"mrsigner": ("ab" * 32,)}, product_id=2, accepted_tcb_status=("UpToDate",)
            ),
            "sev-snp": FormatPolicy(
                measurements={"measurement": ("cd" * 48,)}, allow_debug=False, min_tcb={"snp": 8}
            ),
        },
    )
    f = tmp_path / "p.toml"
    f.write_text(p.to_toml())
    assert Policy.load(f) == p
    # the commented examples `confide policy init` appends are a valid policy once uncommented and filled in
    lines = [line.removeprefix("# ") for line in POLICY_FORMAT_EXAMPLES.splitlines() if line.startswith("# ")]
    body = "\n".join(line.split("  #")[0] for line in lines if not line.startswith(("Per-format", "every")))
    body = body.replace("<64 hex>", "ab" * 32).replace("<96 hex>", "cd" * 48)
    parsed = Policy.from_toml(body, where="examples")
    assert set(parsed.formats) == {"sgx", "tdx", "sev-snp", "nitro"}
    assert parsed.formats["sgx"].tolerated_advisories == ("INTEL-SA-00615",)
