"""Evidence verification time per format; results in bench/results/attest.json.

Each format's real vector (../shared/testvectors) is verified N times at its stated time with the
vendor roots shipped in the package, the way `confide verify` does (collateral already at hand, no
network). Also measured: the sim backend's evidence, and an SEV-SNP report in a provider envelope
with its certificate table (the configfs-tsm path). Times are per verification, in milliseconds.

Usage: python bench/attest.py [--runs 200] [--out bench/results/attest.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import machine, percentiles
from confide.attest import verify_evidence
from confide.attest.anchors import default_anchors, merge_anchors
from confide.attest.claims import TrustAnchors
from confide.attest.sev_snp import build_cert_table
from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend
from confide.enclave.providers.envelope import wrap_evidence
from confide.enclave.sim_platform import SimPlatform

HERE = Path(__file__).resolve().parent
TV = HERE.parent.parent / "shared" / "testvectors"


def _ms(samples: list[float]) -> dict[str, float]:
    return {**percentiles(samples, scale=1e3, digits=3), "min": round(min(samples) * 1e3, 3)}


def _time(fn: Callable[[], Any], runs: int) -> list[float]:
    fn()  # warm-up: imports, caches, first parse
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def cases(tmp: Path) -> dict[str, tuple[bytes, bytes | None, int, TrustAnchors, str]]:
    roots = default_anchors()
    snp_report = (TV / "snp/snp_report_milan.bin").read_bytes()
    vcek = (TV / "snp/snp_vcek_milan.der").read_bytes()
    plat = SimPlatform.create(tmp / "platform")
    sim = SimBackend(plat, EnclaveIdentity("sim", "ab" * 32, SIM_SIGNER, 1, 1, False))
    sim_ev = sim.evidence(bytes(64), extra={})
    envelope = wrap_evidence(
        kind="sev-snp-report",
        provider="tsm",
        evidence=snp_report,
        extra={},
        certificates=build_cert_table({"vcek": vcek}),
    )
    return {
        "sgx-dcap-quote-v3": (
            (TV / "sgx/sgx_quote.bin").read_bytes(),
            (TV / "sgx/sgx_quote_collateral.json").read_bytes(),
            1750377600,
            roots,
            "dcap-qvl: PCK chain + CRLs, TCB info, QE identity, QE report, quote signature, TCB level",
        ),
        "tdx-dcap-quote-v4": (
            (TV / "tdx/tdx_quote.bin").read_bytes(),
            (TV / "tdx/tdx_quote_collateral.json").read_bytes(),
            1750377600,
            roots,
            "as SGX, TDX TCB levels",
        ),
        "sev-snp-report-v2": (
            snp_report,
            vcek,
            1750377600,
            roots,
            "ECDSA P-384 report signature, VCEK <- ASK <- ARK RSA-PSS, TCB/hwid extensions",
        ),
        "sev-snp-envelope-auxblob": (
            envelope,
            None,
            1750377600,
            roots,
            "as SEV-SNP, VCEK from the envelope's certificate table (configfs-tsm auxblob)",
        ),
        "nitro-cose-sign1": (
            base64.b64decode((TV / "nitro/nitro_attestation.b64").read_bytes()),
            None,
            1725720000,
            roots,
            "CBOR decode, ES384 COSE signature, X.509 path validation to the AWS root",
        ),
        "sim": (
            sim_ev,
            None,
            int(time.time()),
            merge_anchors(roots, TrustAnchors(sim_roots=(plat.root_der,))),
            "Ed25519 signature, platform certificate <- simulated root (no protection)",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "attest.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # AMD's VCEK has serial number 0 (RFC 5280 wants it positive)
    results: dict[str, Any] = {
        "machine": machine(),
        "unit": "milliseconds per verification (authenticity only; policy evaluation is microseconds)",
        "runs": args.runs,
        "formats": {},
    }
    t0 = time.perf_counter()
    default_anchors.cache_clear()
    default_anchors()
    results["load_shipped_roots_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (evidence, collateral, at, anchors, what) in cases(Path(tmp)).items():

            def once(
                ev: bytes = evidence, col: bytes | None = collateral, t: int = at, a: TrustAnchors = anchors
            ) -> Any:
                return verify_evidence(ev, at=t, anchors=a, collateral=col)

            claims = once()
            results["formats"][name] = {
                **_ms(_time(once, args.runs)),
                "evidence_bytes": len(evidence),
                "backend": claims.backend,
                "checks": what,
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
